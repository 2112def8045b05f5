"""Exact token ids and labels of UPFT rows, and the structure split."""

import re

import pytest

from axolotl_upft.args import REFERENCE_INSTRUCTION
from axolotl_upft.prompts import chat_messages, render_prompt_ids
from axolotl_upft.rows import FULL, IGNORE_INDEX, PREFIX, full_row, prefix_row, question_kinds

M = IGNORE_INDEX


def ids(tokenizer, words: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in words.split()]


def test_prompt_is_the_chat_template_with_generation_prompt_tokenized_once(tiny_tokenizer):
    prompt = render_prompt_ids(tiny_tokenizer, chat_messages("How many clips ?", None))
    assert prompt == ids(
        tiny_tokenizer, "<|im_start|> user How many clips ? <|im_end|> <|im_start|> assistant"
    )


def test_prefix_prompt_appends_the_reference_instruction_to_the_user_turn(tiny_tokenizer):
    prompt = render_prompt_ids(
        tiny_tokenizer,
        chat_messages("How many clips ?", "You are a careful math tutor .", REFERENCE_INSTRUCTION),
    )
    expected = (
        "<|im_start|> system You are a careful math tutor . <|im_end|> <|im_start|> user How many clips ? "
        + " ".join(w for w in REFERENCE_INSTRUCTION.replace(".", " .").split())
        + " <|im_end|> <|im_start|> assistant"
    )
    assert prompt == ids(tiny_tokenizer, expected)


def whitespace_tokenizer():
    """Word-level, but every space and newline is a token of its own, so the joining shows in the ids."""
    from tiny import CHATML, SPECIALS, chat_tokenizer
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [" ", "\n", "user", "assistant"])}
    for word in tiny_words("How many clips ? " + REFERENCE_INSTRUCTION):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w]"), behavior="isolated")
    return chat_tokenizer(core, CHATML)


def test_instructed_prompt_joins_question_and_instruction_with_one_space_as_the_reference():
    tokenizer = whitespace_tokenizer()
    vocab = tokenizer.get_vocab()
    prompt = render_prompt_ids(tokenizer, chat_messages("How many clips ?", None, REFERENCE_INSTRUCTION))
    # reference train_sft.py: user content = data['question'] + " Please provide the initial step ..."
    reference_user = "How many clips ?" + " " + REFERENCE_INSTRUCTION
    pieces = [
        "<|im_start|>",
        "user",
        "\n",
        *tiny_words_and_spaces(reference_user),
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant",
        "\n",
    ]
    assert prompt == [vocab[p] for p in pieces]
    question_end = pieces.index("?")
    assert prompt[question_end + 1 : question_end + 3] == [vocab[" "], vocab["Please"]]
    assert vocab["<unk>"] not in prompt


def tiny_words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def tiny_words_and_spaces(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w]", text)


def test_prefix_row_keeps_k_generated_ids_then_eos_and_masks_the_prompt(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    prompt = ids(tiny_tokenizer, "<|im_start|> user How many ? <|im_end|> <|im_start|> assistant")
    generated = ids(tiny_tokenizer, "She sold 48 clips in April and May")
    row = prefix_row(prompt, generated, prefix_length=4, stop_ids=frozenset({eos}), eos_token_id=eos)
    response = ids(tiny_tokenizer, "She sold 48 clips") + [eos]
    assert row.kind == PREFIX
    assert row.input_ids == prompt + response
    assert row.labels == [M] * len(prompt) + response
    assert row.num_trained == 5


def test_prefix_row_without_eos_when_prefix_eos_is_off():
    row = prefix_row([1, 2], [7, 8, 9], prefix_length=2, stop_ids=frozenset({3}), eos_token_id=None)
    assert (row.input_ids, row.labels) == ([1, 2, 7, 8], [M, M, 7, 8])


def test_prefix_that_stops_early_keeps_its_own_stop_token_and_gets_no_second_eos():
    row = prefix_row([1, 2], [7, 3, 0, 0], prefix_length=8, stop_ids=frozenset({3}), eos_token_id=3)
    assert (row.input_ids, row.labels) == ([1, 2, 7, 3], [M, M, 7, 3])


def test_prefix_ending_in_another_stop_id_is_not_followed_by_eos():
    row = prefix_row([1], [7, 4], prefix_length=8, stop_ids=frozenset({3, 4}), eos_token_id=3)
    assert row.input_ids == [1, 7, 4]


def test_full_row_keeps_the_whole_trace_to_its_stop_token_and_drops_padding():
    row = full_row([1, 2, 5], [7, 8, 9, 3, 0, 0], stop_ids=frozenset({3}))
    assert row.kind == FULL
    assert (row.input_ids, row.labels) == ([1, 2, 5, 7, 8, 9, 3], [M, M, M, 7, 8, 9, 3])


def test_train_on_inputs_puts_the_prompt_inside_the_loss():
    row = full_row([1, 2], [7, 3], stop_ids=frozenset({3}), train_on_inputs=True)
    assert row.labels == [1, 2, 7, 3]


@pytest.mark.parametrize("n,p", [(1000, 0.1), (817, 0.3), (7, 0.5), (10, 0.0), (10, 1.0)])
def test_structure_share_is_exactly_round_p_n(n, p):
    kinds = question_kinds(n, p, seed=42)
    assert kinds.count(FULL) == round(p * n)
    assert kinds.count(PREFIX) == n - round(p * n)


def test_split_is_stable_for_a_seed_and_changes_with_the_seed():
    assert question_kinds(500, 0.1, seed=42) == question_kinds(500, 0.1, seed=42)
    assert question_kinds(500, 0.1, seed=42) != question_kinds(500, 0.1, seed=43)
