"""Grading: answer extraction, gold answers, and equivalence on real GSM8K / MATH500 / AIME / AMC formats."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from math_verify.errors import TimeoutException

from axolotl_upft import grading
from axolotl_upft.grading import (
    BENCHMARKS,
    benchmark_path,
    extract_answer,
    extract_answer_flexible,
    extract_last_number,
    gold_answer,
    is_equivalent,
    normalize,
)
from axolotl_upft.prompts import question_text

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# (gold as the data set writes it, a model's answer, expected verdict)
ANSWER_PAIRS = [
    # GSM8K golds
    ("18", "18", True),
    ("18", "18.00", True),
    ("18", "\\$18", True),
    ("1,450,000", "1450000", True),
    ("1450000", "1,450,000", True),
    ("10,800", "10800.0", True),
    ("2880000", "2,880,000", True),
    ("70000", "7 \\times 10^4", True),
    ("18", "19", False),
    ("1,450,000", "145,000", False),
    ("5", "-5", False),
    ("60", "60\\%", True),
    ("25", "25 \\text{ dollars}", True),
    ("3", "3 \\text{ hours}", True),
    # MATH500 numbers and fractions
    ("\\frac{14}{3}", "\\dfrac{14}{3}", True),
    ("\\frac{14}{3}", "14/3", True),
    ("\\frac{14}{3}", "4\\frac{2}{3}", True),
    ("\\frac43", "\\frac{4}{3}", True),
    ("\\frac 59", "\\frac{5}{9}", True),
    ("\\frac9{19}", "\\frac{9}{19}", True),
    ("\\frac{3}{2}", "1.5", True),
    ("\\dfrac{17}{50}", "0.34", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("\\frac{3}{56}", "\\frac{56}{3}", False),
    ("-\\frac{35}{9}", "\\frac{35}{9}", False),
    ("-\\frac{35}{9}", "-\\frac{35}{9}", True),
    (".0000672", "0.0000672", True),
    (".35625", "0.35625", True),
    ("1.25", "\\frac{5}{4}", True),
    ("1\\frac{4}{5}", "\\frac{9}{5}", True),
    ("137 \\frac{1}{2}", "137.5", True),
    ("-50", "-50", True),
    ("-50", "50", False),
    ("10,\\!080", "10080", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    ("\\$32,\\!348", "32348", True),
    ("\\$18.90", "18.9", True),
    ("\\$36", "36", True),
    # degrees, units, text
    ("90^\\circ", "90", True),
    ("90^\\circ", "90^{\\circ}", True),
    ("145^\\circ", "145", True),
    ("120^\\circ", "60^\\circ", False),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("864 \\mbox{ inches}^2", "864", True),
    ("15\\mbox{ cm}^2", "15", True),
    ("5.4 \\text{ cents}", "5.4", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "\\text{Navin}", False),
    ("\\text{east}", "\\text{east}", True),
    ("\\text{(C)}", "(C)", True),
    ("\\text{(C)}", "\\text{(E)}", False),
    # roots, pi, complex, bases
    ("3\\sqrt{13}", "3\\sqrt{13}", True),
    ("11\\sqrt2", "11\\sqrt{2}", True),
    ("\\sqrt{51}", "\\sqrt{50}", False),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("2\\sqrt{5}", "\\sqrt{20}", True),
    ("\\pi", "\\pi", True),
    ("288 \\pi", "288\\pi", True),
    ("-\\frac{\\pi}{6}", "\\frac{\\pi}{6}", False),
    ("\\frac{20000}{\\pi}", "20000/\\pi", True),
    ("6 - 5i", "6-5i", True),
    ("6 - 5i", "6+5i", False),
    ("52_8", "52_{8}", True),
    # tuples, intervals, sets, lists
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    ("(6,31,-1)", "(6, 31, -1)", True),
    ("(15,-29)", "(-29,15)", False),
    ("(1,2)", "(2,1)", False),
    ("[0,1)", "[0,1]", False),
    ("(3,4]", "(3,4]", True),
    ("(3,4]", "(3,4)", False),
    ("(2,\\infty)", "(2, \\infty)", True),
    ("(-\\infty, 0]", "(-\\infty, 0)", False),
    ("(0,9) \\cup (9,36)", "(0,9)\\cup(9,36)", True),
    ("x \\in [-2,7]", "[-2,7]", True),
    ("1,-2", "-2, 1", True),
    ("3, 5, 7", "7, 5, 3", True),
    ("3, 5, 7", "3, 5", False),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    # expressions, equations, matrices, padded AIME / float AMC golds
    ("p - q", "-q + p", True),
    ("2k+2", "2(k+1)", True),
    ("x^3+3x-6", "x^3+3x+6", False),
    ("x=5", "5", True),
    ("y = 2x + 3", "y=3+2x", True),
    (
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}",
        True,
    ),
    (
        "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}",
        "\\begin{pmatrix} -2 \\\\ -7 \\\\ -14 \\end{pmatrix}",
        False,
    ),
    # separate numbers, or numbers with their units, never merge into one number
    ("130", "1 \\text{ hour } 30 \\text{ minutes}", False),
    ("35", "3 \\text{ or } 5", False),
    ("5 \\text{ cm}", "5 \\text{ meters}", False),
    ("215", "2 \\text{ hours and } 15 \\text{ minutes}", False),
    ("34", "3 \\text{ and } 4", False),
    ("520", "5 \\text{ m } 20 \\text{ cm}", False),
    ("12", "1\\text{ to }2", False),
    ("250", "\\$2 \\text{ and } \\$50", False),
    ("3015", "30^\\circ 15", False),
    ("23", "2\\;3", False),
    ("12", "1\\ 2", False),
    ("12", "1 2", False),
    ("15\\mbox{ cm}^2", "15 \\text{ cm}", False),
    ("15\\mbox{ cm}^2", "15 \\text{ cm}^2", True),
    ("3 \\text{ hours}", "3 \\text{ hour}", True),
    ("4 \\text{ inches}", "4 \\text{ inch}", True),
    ("5 \\text{ cm}", "5", True),
    ("1000", "1\\,000", True),
    ("1000", "1{,}000", True),
    ("025", "25", True),
    ("073", "37", False),
    ("27", "27.0", True),
]


@pytest.mark.parametrize(
    ("gold", "pred", "expected"), ANSWER_PAIRS, ids=[f"{g} vs {p}" for g, p, _ in ANSWER_PAIRS]
)
def test_answers_are_graded_equal_exactly_when_they_mean_the_same_number_or_object(gold, pred, expected):
    assert is_equivalent(pred, gold) is expected


ODD = [None, "", "   ", "}}{", "\\boxed{", "\\frac{", "((((", "\x00", "1/0", "x" * 3000]


@pytest.mark.parametrize("pred", ODD, ids=lambda pred: repr(pred)[:16])
def test_odd_predictions_are_wrong_answers_not_crashes(pred):
    assert is_equivalent(pred, "5") is False


def test_an_empty_gold_never_matches_anything_so_a_broken_row_cannot_score():
    assert is_equivalent("", "") is False
    assert is_equivalent("5", "  ") is False


def test_grading_in_a_worker_thread_works_although_math_verify_timeouts_need_the_main_thread():
    pairs = [("0.5", "\\frac{1}{2}"), ("(2,1)", "(1,2)"), ("1,450,000", "1450000")]
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda pair: is_equivalent(*pair), pairs))
    assert verdicts == [True, False, True]


def test_a_hung_math_verify_in_a_worker_thread_is_abandoned_after_the_timeout(monkeypatch):
    monkeypatch.setattr(grading, "_math_verify", lambda pred, gold, timeout_s: time.sleep(3) or True)
    verdicts = []
    start = time.monotonic()
    worker = threading.Thread(
        target=lambda: verdicts.append(is_equivalent("0.5", "\\frac{1}{2}", timeout_s=0.2))
    )
    worker.start()
    worker.join()
    assert verdicts == [False]
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("error", [TimeoutException("timed out"), RecursionError(), ValueError("bad")])
def test_a_math_verify_failure_falls_back_to_the_normalized_text_compare(monkeypatch, error):
    def fail(pred, gold, timeout_s):
        raise error

    monkeypatch.setattr(grading, "_math_verify", fail)
    assert is_equivalent("\\dfrac{1}{2}", "\\frac12") is True  # equal as text, math-verify not needed
    assert is_equivalent("0.5", "\\frac{1}{2}") is False
    assert is_equivalent("1 \\text{ hour } 30 \\text{ minutes}", "130") is False
    assert is_equivalent("3 \\text{ or } 5", "35") is False


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\frac34", "\\frac{3}{4}"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("10,\\!080", "10080"),
        ("\\$1,234.50", "1234.50"),
        ("5.4 \\text{ cents}", "5.4"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("(2,12) \\cup (12,102)", "(2,12)\\cup(12,102)"),
        ("42.", "42"),
        ("1 \\text{ hour } 30 \\text{ minutes}", "1 hour 30"),
        ("3 \\text{ or } 5", "3 or 5"),
        ("1\\ 2", "1 2"),
        ("30^\\circ 15", "30 15"),
        ("1\\,000", "1000"),
    ],
)
def test_normalize_strips_only_formatting(answer, expected):
    assert normalize(answer) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("First \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("\\fbox{7}", "7"),
        ("\\boxed {\\text{(C)}}", "\\text{(C)}"),
        ("hence \\boxed 5.", "5"),
        ("We get \\boxed{3} and later \\boxed{\\frac{1", None),
        ("She makes 9 * 2 = $18 a day.\n#### 1,234", "1,234"),
        ("#### 18\nbut then more text", None),
        ("Adding them up, the answer is 42.", "42"),
        ("The answer is 3.5", "3.5"),
        ("Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct.", "\\frac{2}{3}"),
        ("**The final answer is: 17**", "17"),
        ("I computed 12 and then 15 but am not sure.", None),
        ("", None),
    ],
)
def test_extract_answer_takes_the_last_complete_final_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("<think>2 + 3 = \\boxed{5}? No, 3 + 4.</think> The answer is 7.", "7", "7"),
        ("<think>so \\boxed{7}</think> Final: 8", None, "8"),
        ("(pre-filled <think>) 2 + 3 = \\boxed{5}? No.\n</think>\n\nSo \\boxed{7}.", "7", "7"),
        ("<think>a</think> \\boxed{5} <think>b</think> then \\boxed{6}", "6", "6"),
        ("<think>cut while reasoning: \\boxed{5}, or 6", None, None),
        ("Plain: \\boxed{5} then 6", "5", "5"),
    ],
)
def test_an_r1_trace_is_graded_on_what_follows_its_reasoning_block_never_inside_it(text, strict, flexible):
    assert extract_answer(text) == strict
    assert extract_answer_flexible(text) == flexible


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The final answer to this arithmetic problem is 6.", "6"),
        ("3 + 4 = 7, then 7 + 5 = 12", "12"),
        ("It costs $1,234.50 in total.", "1234.50"),
        ("The temperature drops to -3 degrees.", "-3"),
        ("The list is 1,2,3", "3"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_last_number_reads_what_models_write_in_plain_sentences(text, expected):
    assert extract_last_number(text) == expected


def test_flexible_extraction_keeps_the_strict_answer_and_falls_back_to_the_last_number():
    # A boxed answer wins over a later number, so MATH-style answers read as before.
    assert extract_answer_flexible("\\boxed{\\frac{1}{2}} since 2 halves make 1") == "\\frac{1}{2}"
    assert extract_answer_flexible("The answer is 42. Check: 40 + 2") == "42"
    assert extract_answer_flexible("The final answer to this arithmetic problem is 6.") == "6"
    assert extract_answer_flexible("I am not sure.") is None


def test_gsm8k_gold_is_the_text_after_the_four_hashes():
    row = {"question": "q", "answer": "9 * 2 = <<9*2=18>>18 dollars.\n#### 1,080"}
    assert gold_answer(row, "gsm8k") == "1,080"
    assert is_equivalent("1080", gold_answer(row, "gsm8k"))


def test_a_gsm8k_row_without_hashes_is_a_data_error_not_a_silent_wrong_gold():
    with pytest.raises(ValueError, match="####"):
        gold_answer({"answer": "18"}, "gsm8k")


def test_other_benchmarks_use_the_answer_field_and_integral_floats_lose_the_dot_zero():
    assert gold_answer({"answer": "\\frac{14}{3}"}, "math500") == "\\frac{14}{3}"
    assert gold_answer({"answer": "025"}, "aime24") == "025"
    assert gold_answer({"answer": 27.0}, "amc23") == "27"
    assert gold_answer({"answer": 2.5}, None) == "2.5"


def test_a_user_chosen_gold_field_is_read_and_a_missing_one_names_the_fields_present():
    assert gold_answer({"final": "7"}, None, field="final") == "7"
    with pytest.raises(ValueError, match="'final'.*answer"):
        gold_answer({"answer": "7"}, None, field="final")
    with pytest.raises(ValueError, match="'answer'"):
        gold_answer({"answer": None}, "math500")


def test_benchmark_questions_are_found_as_in_training_question_then_problem_then_prompt():
    assert question_text({"problem": "p", "question": "q"}, 0) == "q"
    assert question_text({"problem": "p", "prompt": "x"}, 0) == "p"
    assert question_text({"prompt": "x"}, 0) == "x"
    with pytest.raises(ValueError, match="no question found"):
        question_text({"answer": "1"}, 0)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_shipped_benchmark_resolves_and_every_row_has_a_question_and_a_gold(name):
    path = benchmark_path(name, DATA)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        assert question_text(row, 0)
        assert gold_answer(row, name)


def test_benchmark_data_dir_defaults_to_the_env_var_then_the_shared_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("UPFT_DATA_DIR", raising=False)
    assert benchmark_path("gsm8k") == grading.DEFAULT_DATA_DIR / "gsm8k_test.jsonl"
    (tmp_path / "math500.jsonl").write_text("{}\n")
    monkeypatch.setenv("UPFT_DATA_DIR", str(tmp_path))
    assert benchmark_path("MATH500") == tmp_path / "math500.jsonl"


def test_a_missing_benchmark_file_names_the_path_and_the_fixes(tmp_path):
    with pytest.raises(ValueError, match="aime24") as err:
        benchmark_path("aime24", tmp_path)
    assert str(tmp_path / "aime24.jsonl") in str(err.value)
    assert "--data-dir" in str(err.value) and "UPFT_DATA_DIR" in str(err.value)


def test_a_jsonl_path_is_used_as_is_and_an_unknown_name_lists_the_known_ones(tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("{}\n")
    assert benchmark_path(str(mine)) == mine
    with pytest.raises(ValueError, match="gsm8k"):
        benchmark_path("gsm9k")


def test_think_tags_survive_decoding_so_eval_and_rft_grade_the_answer_after_the_reasoning(tmp_path):
    """Through the real decode (`skip_special_tokens=True`) of a tokenizer that adds <think> tokens as
    R1 and Qwen3 do, in eval's `grade` and in `is_correct` (rft, label_filter, analyze)."""
    import tiny

    from axolotl_upft.cache import Record
    from axolotl_upft.evaluate import grade

    tokenizer = tiny.build_tokenizer(tmp_path, ["The answer is 5 7 ."])
    tokenizer.add_tokens(["<think>", "</think>"])
    revised = tokenizer.encode("<think> The answer is 5 </think> The answer is 7 .", add_special_tokens=False)
    wrong = tokenizer.encode("<think> The answer is 7 </think> The answer is 5 .", add_special_tokens=False)
    assert grading.is_correct(tokenizer, revised, "7") and not grading.is_correct(tokenizer, wrong, "7")
    records = [Record(i, "full", "", ids, True) for i, ids in enumerate([revised, wrong])]
    rows = grade(tokenizer, ["q", "q"], ["7", "7"], records)
    assert [(row["answer"], row["correct"]) for row in rows] == [("7", True), ("5", False)]
