"""Every bad input stops before any sampling, with an error that names the row, key and fix."""

import pytest
import tiny
from pydantic import ValidationError

from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows


def run(rows, tokenizer, model, tmp_path, sequence_len=256, **upft):
    cfg = tiny.axolotl_cfg(model, sequence_len=sequence_len)
    upft = UPFTConfig(cache_dir=str(tmp_path / "samples"), **upft)
    return build_rows(rows, tokenizer, cfg, upft)


@pytest.mark.parametrize(
    "block,key",
    [
        ({"prefix_length": 0}, "prefix_length"),
        ({"structure_ratio": 1.5}, "structure_ratio"),
        ({"structure_ratio": -0.1}, "structure_ratio"),
        ({"prefix_lenght": 8}, "prefix_lenght"),
        ({"sampling": {"temprature": 0.7}}, "temprature"),
    ],
)
def test_bad_upft_values_and_unknown_keys_are_rejected_by_name(block, key):
    with pytest.raises(ValidationError, match=key):
        UPFTConfig.model_validate(block)


def test_question_field_and_template_together_is_an_error():
    with pytest.raises(ValidationError, match="question_field or question_template"):
        UPFTConfig(question_field="q", question_template="{q}")


@pytest.mark.parametrize(
    "rows,options,message",
    [
        ([{"question": "a b"}, {"body": "x"}], {}, r"row 1: no question found .*the row has: body"),
        ([{"question": "a b"}, {"question": "  "}], {}, r"row 1: the question \(field 'question'\) is empty"),
        ([{"question": None}], {}, r"row 0: the question .* is empty or not text"),
        (
            [{"question": "a"}],
            {"question_field": "query"},
            r"upft.question_field: row 0 has no field 'query' .*question",
        ),
        (
            [{"Body": "a"}],
            {"question_template": "{Body} {Question}"},
            r"question_template: row 0 has no field 'Question'",
        ),
    ],
)
def test_bad_rows_name_the_row_and_the_fix_and_sample_nothing(
    rows, options, message, tiny_tokenizer, tiny_model, tmp_path
):
    with pytest.raises(ValueError, match=message):
        run(rows, tiny_tokenizer, tiny_model, tmp_path, **options)
    assert not (tmp_path / "samples").exists()


def test_tokenizer_without_chat_template_says_to_set_chat_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*chat_template:"):
        run([{"question": "a"}], tokenizer, tiny_model, tmp_path)


def test_tokenizer_without_eos_says_to_set_special_tokens(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token.*special_tokens"):
        run([{"question": "a"}], tokenizer, tiny_model, tmp_path)


def test_prompt_longer_than_sequence_len_names_the_row_and_its_length(tiny_tokenizer, tiny_model, tmp_path):
    rows = [{"question": "How many ?"}, {"question": " ".join(["clips"] * 80)}]
    with pytest.raises(ValueError, match=r"row 1: its prompt is \d+ tokens.*sequence_len=40"):
        run(rows, tiny_tokenizer, tiny_model, tmp_path, sequence_len=40, structure_ratio=0.0)


def test_rows_longer_than_sequence_len_lose_their_last_tokens_and_the_log_counts_them(
    tiny_tokenizer, tiny_model, tmp_path, questions, caplog
):
    rows = [{"question": q["question"]} for q in questions[:4]]
    options = {"structure_ratio": 1.0, "sampling": {"max_new_tokens": 24, "batch_size": 4}}
    whole = run(rows, tiny_tokenizer, tiny_model, tmp_path, sequence_len=512, **options)
    sequence_len = max(len(r.input_ids) - r.num_trained for r in whole) + 3  # every prompt fits, whole
    with caplog.at_level("WARNING", logger="axolotl_upft"):
        cut = run(rows, tiny_tokenizer, tiny_model, tmp_path, sequence_len=sequence_len, **options)
    longer = sum(len(r.input_ids) > sequence_len for r in whole)
    assert longer > 0, "some trace is longer than sequence_len, or this test proves nothing"
    for before, after in zip(whole, cut):
        assert after.input_ids == before.input_ids[:sequence_len]
        assert after.labels == before.labels[:sequence_len]
    assert f"{longer} rows were longer than sequence_len={sequence_len}" in caplog.text


@pytest.mark.parametrize(
    ("row", "question"),
    [
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief ."},
                    {"role": "user", "content": "How many clips ?"},
                    {"role": "assistant", "content": "72"},
                ]
            },
            "How many clips ?",
        ),
        ({"instruction": "How many clips ?", "output": "72"}, "How many clips ?"),
        ({"problem": "How many clips ?", "instruction": "Solve ."}, "How many clips ?"),
    ],
    ids=["messages", "instruction", "problem-before-instruction"],
)
def test_questions_come_from_messages_or_instruction_rows(
    row, question, tiny_tokenizer, tiny_model, tmp_path
):
    from axolotl_upft.prompts import chat_messages, render_prompt_ids
    from axolotl_upft.rows import IGNORE_INDEX

    (built,) = run(
        [row],
        tiny_tokenizer,
        tiny_model,
        tmp_path,
        structure_ratio=1.0,
        sampling={"max_new_tokens": 4, "batch_size": 1},
    )
    prompt = render_prompt_ids(tiny_tokenizer, chat_messages(question, None))
    assert built.input_ids[: len(prompt)] == prompt
    assert built.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert built.num_trained == len(built.input_ids) - len(prompt), "only the sampled response is trained"
