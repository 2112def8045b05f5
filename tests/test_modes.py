"""Baselines from the same YAML: sft (full self-traces), rft (keep a correct sample), upft + label_filter."""

import pytest
import tiny

from axolotl_upft import generation
from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows
from axolotl_upft.prompts import chat_messages, render_prompt_ids
from axolotl_upft.rows import FULL, IGNORE_INDEX, PREFIX

ROWS = [
    {"question": "How many clips ?", "answer": "She sold 18 clips .\n#### 18"},
    {"question": "How many eggs ?", "answer": "#### 9"},
    {"question": "How many cups ?", "answer": "#### 4"},
]
# Scripted samples per question, in sample order: row 0 is first right at sample 1, row 1 never, row 2 at 0.
SCRIPT = {
    "clips": [
        "She sold 7 . The answer is 7 .",
        "She had 18 . The answer is 18 .",
        "He had 18 . The answer is 18 .",
    ],
    "eggs": ["The answer is 7 .", "The answer is 8 .", "The answer is 10 ."],
    "cups": ["He had 4 . The answer is 4 .", "The answer is 5 .", "The answer is 4 ."],
}


@pytest.fixture
def scripted(monkeypatch, tiny_tokenizer):
    vocab, eos, calls = tiny_tokenizer.get_vocab(), tiny_tokenizer.eos_token_id, {}

    def generate(model, prompts, *, max_new_tokens, **kwargs):
        out = []
        for prompt in prompts:
            topic = next(t for t in SCRIPT if vocab[t] in prompt)
            j = calls.setdefault(topic, 0)
            calls[topic] += 1
            ids = [vocab[w] for w in SCRIPT[topic][j % 3].split()] + [eos]
            out.append((ids[:max_new_tokens], len(ids) <= max_new_tokens))
        return out

    monkeypatch.setattr(generation, "generate_batch", generate)
    return lambda topic, j: [vocab[w] for w in SCRIPT[topic][j].split()] + [eos]


def run(tokenizer, model, tmp_path, **upft):
    cfg = tiny.axolotl_cfg(model)
    return build_rows(ROWS, tokenizer, cfg, UPFTConfig(cache_dir=str(tmp_path), num_samples=3, **upft))


def response(row) -> list[int]:
    return [label for label in row.labels if label != IGNORE_INDEX]


def test_rft_keeps_the_first_correct_full_sample_and_drops_unsolved_questions(
    scripted, tiny_tokenizer, tiny_model, tmp_path
):
    rows = run(tiny_tokenizer, tiny_model, tmp_path, mode="rft")
    assert [r.kind for r in rows] == [FULL, FULL]
    assert response(rows[0]) == scripted("clips", 1)
    assert response(rows[1]) == scripted("cups", 0)
    bare = render_prompt_ids(tiny_tokenizer, chat_messages(ROWS[0]["question"], None))
    assert rows[0].input_ids[: len(bare)] == bare


def test_label_filter_trains_on_the_prefix_of_a_correct_sample(
    scripted, tiny_tokenizer, tiny_model, tmp_path
):
    rows = run(tiny_tokenizer, tiny_model, tmp_path, label_filter=True, structure_ratio=0.0, prefix_length=3)
    eos = tiny_tokenizer.eos_token_id
    assert [r.kind for r in rows] == [PREFIX, PREFIX]
    assert response(rows[0]) == scripted("clips", 1)[:3] + [eos]
    assert response(rows[1]) == scripted("cups", 0)[:3] + [eos]


def test_sft_trains_one_full_self_trace_per_question_without_the_instruction(
    scripted, tiny_tokenizer, tiny_model, tmp_path
):
    rows = run(tiny_tokenizer, tiny_model, tmp_path, mode="sft")
    assert [r.kind for r in rows] == [FULL, FULL, FULL]
    for row, source, topic in zip(rows, ROWS, ("clips", "eggs", "cups")):
        bare = render_prompt_ids(tiny_tokenizer, chat_messages(source["question"], None))
        assert row.input_ids == bare + scripted(topic, 0), "the bare question's prompt, then the first sample"
        assert row.labels == [IGNORE_INDEX] * len(bare) + scripted(topic, 0)


def test_rft_where_no_question_has_a_correct_sample_is_an_error_not_an_empty_dataset(
    scripted, tiny_tokenizer, tiny_model, tmp_path
):
    cfg = tiny.axolotl_cfg(tiny_model)
    upft = UPFTConfig(cache_dir=str(tmp_path), num_samples=3, mode="rft")
    with pytest.raises(ValueError, match=r"no question kept a correct sample \(num_samples=3\).*num_samples"):
        build_rows([ROWS[1]], tiny_tokenizer, cfg, upft)  # "eggs": 7, 8, 10 against the gold 9


def test_rft_without_gold_answers_names_the_row_and_the_key(tiny_tokenizer, tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"upft.answer_field: row 0: .*'solution'"):
        run(tiny_tokenizer, tiny_model, tmp_path, mode="rft", answer_field="solution")


def test_label_filter_is_only_for_upft_mode():
    with pytest.raises(ValueError, match="label_filter applies to mode: upft"):
        UPFTConfig(mode="sft", label_filter=True)
