"""Pure prompt handling: find the question in a row and render chat prompts to token ids."""

import string
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any

QUESTION_FIELDS = ("question", "problem", "prompt", "instruction")
TEMPLATE_KEY = "upft.question_template"


def _fields(row: dict[str, Any]) -> str:
    """The row's fields that hold a value (the JSON loader gives every row every column, null if absent)."""
    return ", ".join(sorted(k for k, v in row.items() if v is not None)) or "(none)"


def question_text(
    row: dict[str, Any], index: int, *, field: str | None = None, template: str | None = None
) -> str:
    """The question of one data row, by template, by field, or auto-detected."""
    if template is not None:
        text, source = render_template(template, row, index), TEMPLATE_KEY
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


@cache  # parsed once per template, not once per row
def template_fields(template: str) -> tuple[tuple[str, str | None], ...]:
    """The (literal text, field name or None) pieces of a question template. Only plain `{field}` names are
    allowed: no attribute access, index, conversion or format spec; `{{` and `}}` are literal braces."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"{TEMPLATE_KEY}: {template!r} is not a valid template ({err}). Write each field as "
            "{name}, and a literal brace as {{ or }}."
        ) from None
    for _, name, spec, conversion in pieces:
        if name is not None and not (_plain(name) and not spec and not conversion):
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(
                f"{TEMPLATE_KEY}: {{{shown}}} in {template!r} is not a plain field name. Write each field as "
                "{name}, a column of the rows (attribute access, indexing and format specs are not allowed)."
            )
    if all(name is None for _, name, _, _ in pieces):
        raise ValueError(
            f"{TEMPLATE_KEY}: {template!r} names no field, so every question would be the same text. "
            "Write the question's columns as {name}, e.g. '{Body} {Question}'."
        )
    return tuple((literal, name) for literal, name, _, _ in pieces)


def _plain(name: str) -> bool:
    return bool(name.strip()) and not name.isdigit() and not set(name) & set(".[]")


def render_template(template: str, row: dict[str, Any], index: int) -> str:
    """The question of one row by template; a field that is missing or null stops with the row named (the
    JSON loader fills a column some rows lack with null, which would otherwise render as "None")."""
    parts = []
    for literal, name in template_fields(template):
        parts.append(literal)
        if name is None:
            continue
        if row.get(name) is None:
            raise ValueError(
                f"{TEMPLATE_KEY}: row {index} has no field '{name}' (missing or null; the row has: "
                f"{_fields(row)}). "
                f"Fill it in or drop that row, or name in {TEMPLATE_KEY} only fields every row has."
            )
        parts.append(format(row[name]))
    return "".join(parts)


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


def render_prompt_ids(tokenizer, messages: list[dict], chat_template: str | None = None, **template_kwargs):
    """The prompt ids of chat turns, with the generation prompt: the very call Axolotl's `type: chat_template`
    makes (`ChatTemplatePrompter.build_prompt`), so the special tokens come from the template alone."""
    ids = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=False,
        chat_template=chat_template,
        add_generation_prompt=True,
        **template_kwargs,
    )
    return list(ids)


PROBE_QUESTION = "What is 2 + 3?"
PROBE_ANSWER = "UPFTPROBEANSWER"
PROBE_SYSTEM = "UPFTPROBESYSTEM"


@dataclass(frozen=True)
class ChatFormat:
    """How every UPFT prompt is rendered (sampling, rows, eval, analyze): the tokenizer Axolotl built from the
    config, the chat template Axolotl's `type: chat_template` picks, the config's `chat_template_kwargs`
    (e.g. `enable_thinking: false`) and `eot_tokens`. `name` says where the template came from, for errors."""

    tokenizer: Any
    template: str
    name: str
    kwargs: dict = field(default_factory=dict)
    eot_tokens: tuple[str, ...] = ()

    @classmethod
    def own(cls, tokenizer) -> "ChatFormat":
        """The tokenizer's own chat template, no keyword arguments (eval without a training config)."""
        check_tokenizer(tokenizer)
        return cls(tokenizer, tokenizer.chat_template, f"the chat template of {tokenizer.name_or_path!r}")

    def render(self, messages: list[dict], **extra) -> list[int]:
        return render_prompt_ids(self.tokenizer, messages, self.template, **self.kwargs, **extra)

    def prompt_ids(
        self, question: str, system_prompt: str | None, instruction: str | None = None
    ) -> list[int]:
        from jinja2 import TemplateError

        try:
            return self.render(chat_messages(question, system_prompt, instruction))
        except TemplateError as err:
            raise ValueError(
                f"{self.name} cannot render the prompt of question {question[:80]!r}: {err}. "
                "Choose another `chat_template` or fix the question."
            ) from None

    def key(self) -> dict:
        """What changes the rendered prompt and its end, for cache keys."""
        from .cache import digest

        tok = self.tokenizer
        return {
            "tokenizer": [tok.name_or_path, len(tok), tok.eos_token_id, tok.bos_token_id],
            "template": digest(self.template),
            "kwargs": self.kwargs,
            "end_ids": sorted(self.end_ids),
        }

    @cached_property
    def eot_ids(self) -> frozenset[int]:
        """The ids of `eot_tokens`, each a single token, as Axolotl's `type: chat_template` requires."""
        ids = set()
        for token in self.eot_tokens:
            encoded = self.tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"eot_tokens: {token!r} is {len(encoded)} tokens ({encoded}) for this tokenizer, not "
                    "one. List the template's end-of-turn special token, or add it with `special_tokens`."
                )
            ids.add(encoded[0])
        return frozenset(ids)

    @cached_property
    def turn_end_id(self) -> int:
        """The token that ends an assistant turn: the first token the template writes after an assistant
        message, when that is a special token or one of `eot_tokens`; else EOS. For the paper's models
        (Qwen2.5-Math-Instruct, Llama-3.1-Instruct, R1-Distill) this is their EOS, which the reference
        appends; for Gemma it is `<end_of_turn>` (EOS `<eos>`), for a base model under chatml `<|im_end|>`."""
        from jinja2 import TemplateError

        tok = self.tokenizer
        messages = [
            {"role": "user", "content": PROBE_QUESTION},
            {"role": "assistant", "content": PROBE_ANSWER},
        ]
        try:
            text = self.text(messages, add_generation_prompt=False)
        except TemplateError:
            return tok.eos_token_id
        if PROBE_ANSWER not in text:
            return tok.eos_token_id
        after = tok(text[text.rindex(PROBE_ANSWER) + len(PROBE_ANSWER) :], add_special_tokens=False)[
            "input_ids"
        ]
        special = set(tok.all_special_ids) | set(tok.added_tokens_decoder) | self.eot_ids
        return after[0] if after and after[0] in special else tok.eos_token_id

    @property
    def end_ids(self) -> frozenset[int]:
        """Ids that end a generated turn, beside the tokenizer's and the model's EOS."""
        return self.eot_ids | {self.turn_end_id}

    def check(self, system_prompt: str | None, key: str = "upft.system_prompt") -> None:
        """Before any sampling: the system prompt has a place in the template, and the prompt does not
        change with the date. `key` names the setting that holds the system prompt."""
        from jinja2 import TemplateError

        if system_prompt:
            try:
                text = self.text(chat_messages(PROBE_QUESTION, PROBE_SYSTEM))
            except TemplateError as err:
                text, reason = "", f"it fails with a system turn ({err})"
            else:
                reason = "it drops the system turn"
            if PROBE_SYSTEM not in text:
                raise ValueError(
                    f"{key} is set, but {self.name} has no system role: {reason}. Remove {key}, put the "
                    "text into the question (upft.question_template), or use a template with a system turn "
                    "(gemma3 folds it into the first user turn)."
                )
        dated = {self._render_on(day, system_prompt) for day in ("2024-01-01", "2031-12-31")}
        if len(dated) > 1:
            raise ValueError(
                f"{self.name} writes today's date into the prompt (strftime_now), so the prompt changes by "
                "day: samples cached today are not reused tomorrow, and eval sees other prompts than "
                f"training did. Pin it: set {key} if the template dates only its default system message "
                "(as mistral_v7_tekken does), or use `chat_template: jinja` with `chat_template_jinja` "
                "holding the template with a fixed date."
            )

    def text(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The rendered chat as text (for checks; prompts themselves are always `render`ed to ids)."""
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            **self.kwargs,
            **extra,
        )

    def _render_on(self, day: str, system_prompt: str | None) -> str:
        """The probe prompt as if today were `day`: a render variable hides transformers' `strftime_now`."""
        from datetime import datetime

        def strftime_now(fmt: str) -> str:
            return datetime.fromisoformat(day).strftime(fmt)

        return self.text(chat_messages(PROBE_QUESTION, system_prompt), strftime_now=strftime_now)


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
