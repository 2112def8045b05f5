"""Prefix analysis: exact coverage / prefix-accuracy / k math, then end to end on the tiny random Llama."""

import json

import pytest
from tiny import build_model, gsm8k_questions

from axolotl_upft import analyze as an
from axolotl_upft import generation
from axolotl_upft.analyze import K_BOUNDS, length_table, prefix_accuracy, prefix_coverage, suggest_k

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Four samples of one question: all share token 1, three share [1, 2], two share [1, 2, 3].
RUNS = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 8, 9, 9]]
CORRECT = [True, False, True, False]


@pytest.mark.parametrize(
    ("length", "coverage", "distinct"), [(1, 1.0, 1), (2, 0.75, 2), (3, 0.5, 3), (4, 0.25, 4), (9, 0.25, 4)]
)
def test_coverage_is_the_share_of_the_most_common_prefix(length, coverage, distinct):
    assert prefix_coverage(RUNS, length) == (coverage, distinct)


def test_a_trajectory_shorter_than_the_length_is_its_own_prefix():
    assert prefix_coverage([[1, 2], [1, 2, 3], [1, 2, 3]], 3) == (2 / 3, 2)


@pytest.mark.parametrize(
    ("length", "from_correct", "from_incorrect"),
    [
        (1, 0.5, 0.5),  # one shared prefix: both sides see the question's accuracy
        (2, 2 / 3, (2 / 3 + 0) / 2),  # [1,2] holds runs 0,1,2 (2 of 3 correct); [1,8] only run 3
        (3, (0.5 + 1) / 2, (0.5 + 0) / 2),  # [1,2,3] holds runs 0,1; runs 2 and 3 are alone
        (4, 1.0, 0.0),  # every prefix unique: each sees only its own outcome
    ],
)
def test_prefix_accuracy_averages_the_outcomes_of_samples_sharing_each_prefix(
    length, from_correct, from_incorrect
):
    assert prefix_accuracy(RUNS, CORRECT, length) == pytest.approx((from_correct, from_incorrect))


def test_prefix_accuracy_needs_both_outcomes():
    assert prefix_accuracy(RUNS, [True] * 4, 2) is None
    assert prefix_accuracy(RUNS, [False] * 4, 2) is None


def test_length_table_averages_over_questions_and_prefix_accuracy_over_mixed_ones():
    other = [[5, 6], [5, 7], [5, 6], [5, 6]]
    table = length_table([RUNS, other], [CORRECT, [True] * 4], [1, 2])
    assert table == [
        {"length": 1, "coverage": 1.0, "distinct": 1, "from_correct": 0.5, "from_incorrect": 0.5},
        {
            "length": 2,
            "coverage": (0.75 + 0.75) / 2,
            "distinct": 2,
            "from_correct": pytest.approx(2 / 3),
            "from_incorrect": pytest.approx(1 / 3),
        },
    ]
    assert "from_correct" not in length_table([RUNS], None, [1])[0]


@pytest.mark.parametrize(
    ("coverage", "k", "words"),
    [
        ({4: 1.0, 8: 0.9, 16: 0.5, 32: 0.49, 64: 0.2}, 16, "at 32 tokens it drops to 49%"),
        ({4: 0.9, 8: 0.3, 16: 0.6}, 8, "clamped to 8"),  # only the first drop counts
        ({4: 0.4, 8: 0.3}, 8, "the shortest length tried; clamped to 8"),
        ({8: 1.0, 128: 0.9, 256: 0.8}, 128, "the longest length tried; clamped to 128"),
    ],
)
def test_suggested_k_is_the_longest_length_before_coverage_drops_below_half(coverage, k, words):
    found, reason = suggest_k(coverage)
    assert found == k
    assert words in reason


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rows = gsm8k_questions(90, "train") + gsm8k_questions(10, "test")
    corpus = [row["question"] + " " + row["answer"] for row in rows] + ["The answer is 18 ."]
    return str(build_model(tmp_path_factory.mktemp("tiny"), corpus))


def read_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    return imread(path)


def expected_k(table, threshold):
    kept = []
    for row in table:
        if row["coverage"] < threshold:
            break
        kept.append(row["length"])
    length = kept[-1] if kept else table[0]["length"]
    return min(max(length, K_BOUNDS[0]), K_BOUNDS[1])


def test_analysis_samples_the_model_and_writes_json_and_png(model_dir, tmp_path):
    questions = gsm8k_questions(3, "test")
    options = {
        "samples": 4,
        "lengths": (32, 4, 8, 16),
        "max_new_tokens": 32,
        "temperature": 0.05,
        "seed": 7,
        "batch_size": 6,
    }
    result = an.analyze(model_dir, questions, output_dir=tmp_path, **options)

    assert json.loads((tmp_path / "analysis.json").read_text()) == result
    table = result["table"]
    assert [row["length"] for row in table] == [4, 8, 16, 32]
    coverages = [row["coverage"] for row in table]
    assert all(0.25 <= c <= 1 for c in coverages)
    assert coverages == sorted(coverages, reverse=True)  # a prefix shared at L is shared at every shorter L
    assert all(1 <= row["distinct"] <= 4 for row in table)
    for i, coverage in enumerate(coverages):
        assert sum(q["coverage"][i] for q in result["per_question"]) / 3 == pytest.approx(coverage)
    assert result["sample_accuracy"] == pytest.approx(sum(q["accuracy"] for q in result["per_question"]) / 3)
    assert (
        result["sampling"]["top_p"] == 0.95 and result["sampling"]["top_k"] == 20
    )  # tiny's generation config
    assert K_BOUNDS[0] <= result["suggested_k"] <= K_BOUNDS[1]
    assert result["suggested_k"] == expected_k(table, result["threshold"])
    assert f"{result['suggested_k']}-token prefix" in result["reason"] or "clamped" in result["reason"]
    image = read_png(tmp_path / "analysis.png")
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 100

    # Seeded: the same call draws the same samples.
    assert an.analyze(model_dir, questions, output_dir=tmp_path / "again", **options)["table"] == table


def test_analysis_with_mixed_outcomes_draws_the_prefix_accuracy_panel(model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    right, wrong = (
        tokenizer(f"The answer is {n} .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for n in (18, 7)
    )
    # Half the samples of every question say 18 (its gold), half say 7: they part at token 4.
    monkeypatch.setattr(
        generation,
        "generate_batch",
        lambda model, prompts, **kw: [(right if i % 2 == 0 else wrong, True) for i in range(len(prompts))],
    )
    questions = [{"question": f"Janet has {n} eggs .", "answer": "18"} for n in (3, 4)]
    result = an.analyze(
        model_dir,
        questions,
        samples=4,
        lengths=(2, 4, 8),
        max_new_tokens=8,
        output_dir=tmp_path,
        batch_size=4,
    )

    assert result["table"] == [
        {"length": 2, "coverage": 1.0, "distinct": 1, "from_correct": 0.5, "from_incorrect": 0.5},
        {"length": 4, "coverage": 0.5, "distinct": 2, "from_correct": 1.0, "from_incorrect": 0.0},
        {"length": 8, "coverage": 0.5, "distinct": 2, "from_correct": 1.0, "from_incorrect": 0.0},
    ]
    assert (result["sample_accuracy"], result["mixed_questions"]) == (0.5, 2)
    assert result["suggested_k"] == 8 and "the longest length tried" in result["reason"]
    height, width = read_png(tmp_path / "analysis.png").shape[:2]
    assert width > 2 * height  # two panels side by side


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 1}, "samples must be >= 2"),
        ({"lengths": (0, 4)}, "lengths must be positive"),
        ({"max_new_tokens": 64}, r"max_new_tokens \(64\) must be >= the longest length \(128\)"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"threshold": 1.5}, "threshold must be in"),
    ],
)
def test_bad_arguments_fail_before_any_model_is_loaded(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        an.analyze("no-such-model", [{"question": "q"}], output_dir=tmp_path, **kwargs)


def test_rows_without_a_question_field_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no question found"):
        an.analyze("no-such-model", [{"text": "q"}], output_dir=tmp_path)
