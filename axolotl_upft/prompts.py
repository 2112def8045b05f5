"""Pure prompt handling: find the question in a row and render chat prompts to token ids."""

from typing import Any

QUESTION_FIELDS = ("question", "problem", "prompt", "instruction")


def _fields(row: dict[str, Any]) -> str:
    return ", ".join(sorted(row)) or "(none)"


def question_text(
    row: dict[str, Any], index: int, *, field: str | None = None, template: str | None = None
) -> str:
    """The question of one data row, by template, by field, or auto-detected."""
    if template is not None:
        try:
            text = template.format(**row)
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"upft.question_template: row {index} has no field {err} (its fields: {_fields(row)}). "
                "Use only those names in the template."
            ) from None
        source = "upft.question_template"
    elif field is not None:
        if field not in row:
            raise ValueError(
                f"upft.question_field: row {index} has no field '{field}' (its fields: {_fields(row)}). "
                "Set upft.question_field to one of them."
            )
        text, source = row[field], f"field '{field}'"
    else:
        text, source = _auto_question(row, index)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"row {index}: the question ({source}) is empty or not text: {text!r}. "
            "Fix or drop that row, or point upft.question_field / upft.question_template elsewhere."
        )
    return text


def _auto_question(row: dict[str, Any], index: int) -> tuple[Any, str]:
    for name in QUESTION_FIELDS:
        if name in row:
            return row[name], f"field '{name}'"
    for message in row.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            return message.get("content"), "first user turn of 'messages'"
    raise ValueError(
        f"row {index}: no question found (looked for {', '.join(QUESTION_FIELDS)} and a user turn in "
        f"'messages'; the row has: {_fields(row)}). Set upft.question_field or upft.question_template."
    )


def chat_messages(question: str, system_prompt: str | None, instruction: str | None = None) -> list[dict]:
    """The chat turns of one prompt; the prefix instruction ends the user turn after one space, as in the
    reference (`question + " " + instruction`)."""
    user = question if not instruction else f"{question} {instruction}"
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": user}]


def render_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat template with the generation prompt, tokenized once without extra special tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no chat template, and UPFT prompts use one. "
            "Set `chat_template:` in the config (e.g. `chat_template: chatml`) or use an instruct model."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no EOS token, which ends every UPFT sample. "
            'Set it in the config: `special_tokens: {eos_token: "<|im_end|>"}` '
            "(your model's end-of-turn token)."
        )


def pad_token_id(tokenizer) -> int:
    """Left padding for generation; chat models often have no pad token and pad with EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
