"""Built-in reasoning-gym benchmarks: fixed splits, disjoint by question text, graded by the library."""

import json

import pytest

pytest.importorskip("reasoning_gym")

from axolotl_upft import benchmarks
from axolotl_upft.benchmarks import SPLITS, TASKS, is_correct, parse_name, splits, write_benchmark


def test_split_sizes_are_the_ones_the_comparison_promises():
    assert SPLITS["train"] >= 1000 and SPLITS["validation"] == 200 and SPLITS["test"] >= 500


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_disjoint_by_question_text_and_hold_no_repeated_question(task):
    parts = splits(task)
    assert {name: len(rows) for name, rows in parts.items()} == SPLITS
    texts = {name: [row["question"] for row in rows] for name, rows in parts.items()}
    for name, questions in texts.items():
        assert len(set(questions)) == len(questions), f"{task}-{name} repeats a question"
    assert not set(texts["test"]) & set(texts["validation"])
    assert not set(texts["test"]) & set(texts["train"])
    assert not set(texts["validation"]) & set(texts["train"])


def test_splits_read_one_seed_in_index_order_so_no_split_is_a_shifted_copy_of_another():
    indices = [row["rg_index"] for split in SPLITS for row in splits("chain_sum_2")[split]]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)


def test_a_small_task_repeats_questions_inside_one_seed_and_the_repeats_are_dropped():
    parts = splits("chain_sum_3")  # 3 one-digit terms: 1,000 distinct sums at most... fewer than items read
    last = parts["train"][-1]["rg_index"]
    assert last + 1 > sum(SPLITS.values())  # some items were skipped as repeats


def test_writing_a_benchmark_twice_gives_the_same_bytes(tmp_path):
    first = write_benchmark("leg_counting_2-validation", tmp_path / "a").read_bytes()
    second = write_benchmark("leg_counting_2-validation", tmp_path / "b").read_bytes()
    assert first == second
    rows = [json.loads(line) for line in first.decode().splitlines()]
    assert len(rows) == SPLITS["validation"] and all(r["question"] and r["answer"] for r in rows)


def test_names_parse_into_task_and_split_and_an_unknown_one_lists_the_known_names(tmp_path):
    assert parse_name("Leg_Counting_2-Test") == ("leg_counting_2", "test")
    assert parse_name("gsm8k") is None and parse_name("leg_counting_2-dev") is None
    with pytest.raises(ValueError, match="leg_counting_2-validation"):
        write_benchmark("leg_counting_2-dev", tmp_path)


def test_answers_are_graded_by_the_libraries_own_checker():
    row = splits("chain_sum_2")["test"][0]
    assert is_correct("chain_sum_2-test", row["answer"], row)
    assert is_correct("chain_sum_2-test", "+0" + row["answer"], row)  # chain_sum's checker reads decimals
    assert not is_correct("chain_sum_2-test", str(int(row["answer"]) + 1), row)
    assert not is_correct("chain_sum_2-test", None, row)
    legs = splits("leg_counting_2")["test"][0]
    assert is_correct("leg_counting_2-test", legs["answer"], legs)
    assert not is_correct("leg_counting_2-test", legs["answer"] + "0", legs)


def test_a_row_that_no_longer_matches_the_library_is_an_error_not_a_silent_grade():
    row = dict(splits("chain_sum_2")["test"][0], question="What is 1 + 1?")
    with pytest.raises(RuntimeError, match="no longer matches"):
        benchmarks.is_correct("chain_sum_2-test", "2", row)
