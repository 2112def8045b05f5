"""`make compare`'s pipeline end to end on the tiny random Llama: every arm, the report and both plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import build_model

pytest.importorskip("reasoning_gym")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TASK = "chain_sum_2"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from axolotl_upft.args import REFERENCE_INSTRUCTION
    from axolotl_upft.benchmarks import splits

    tmp = tmp_path_factory.mktemp("compare")
    rows = [row for split in splits(TASK).values() for row in split[:40]]
    corpus = [row["question"] + " " + row["answer"] for row in rows] + [REFERENCE_INSTRUCTION]
    model = build_model(tmp / "model", corpus)
    recipe = yaml.safe_load((ROOT / "bench" / "compare.yml").read_text())["recipe"]
    recipe = {
        **recipe,
        "sequence_len": 256,
        "gradient_accumulation_steps": 1,
        "upft": {
            **recipe["upft"],
            "prefix_length": 4,  # below max_new_tokens, as upft: requires
            "sampling": {"temperature": 1.0, "max_new_tokens": 12, "batch_size": 4, "backend": "hf"},
        },
    }
    config = {
        "model": str(model),
        "task": TASK,
        "output": str(tmp / "runs"),
        "results": str(tmp / "results"),
        "max_new_tokens": 8,
        "eval_batch_size": 4,
        "train_questions": 8,
        "validation_questions": 4,
        "test_questions": 6,
        "analyze": {"questions": 4, "samples": 3, "lengths": [2, 4], "max_new_tokens": 8},
        "recipe": recipe,
        "tune": [
            {"prefix_length": "analyze", "structure_ratio": 0.25, "learning_rate": 1.0e-4, "num_epochs": 1},
            {
                "prefix_length": 2,
                "structure_ratio": 0.25,
                "prefix_eos": False,
                "learning_rate": 1.0e-3,
                "num_epochs": 1,
            },
        ],
        "arms": {
            "sft": {"samples": "full", "upft": {"mode": "sft"}},
            "rft": {"samples": "full", "upft": {"mode": "rft", "num_samples": 1}},
            "upft_label_filter": {"samples": "full", "upft": {"label_filter": True, "num_samples": 1}},
        },
    }
    path = tmp / "compare.yml"
    path.write_text(yaml.safe_dump(config))
    return tmp, path


def run_compare(path: Path, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), str(path)],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_every_arm_is_trained_evaluated_and_reported_then_a_rerun_redoes_nothing(setup):
    tmp, path = setup
    run_compare(path, tmp)
    results = tmp / "results"
    report = json.loads((results / "report.json").read_text())
    arms = {entry["arm"]: entry for entry in report["arms"]}
    # RFT and label_filter drop questions with no correct sample; a random model may solve none.
    assert {"base", "upft", "sft"} <= set(arms) and set(arms) | set(report["skipped"]) == {
        "base",
        "upft",
        "sft",
        "rft",
        "upft_label_filter",
    }
    for arm, entry in arms.items():
        rows = [
            json.loads(line) for line in (results / "rows" / f"{arm}.test.jsonl").read_text().splitlines()
        ]
        assert entry["n"] == len(rows) == 6
        assert entry["flexible"]["correct"] == sum(r["correct_flexible"] for r in rows)
        low, high = entry["flexible"]["wilson95"]
        assert 0 <= low <= entry["flexible"]["accuracy"] <= high <= 100
        if arm == "base":
            assert entry["tokens_sampled"] == 0 and "vs_base" not in entry["flexible"]
        else:
            assert entry["tokens_sampled"] > 0 and entry["tokens_trained"] > 0
            assert 0 < entry["flexible"]["vs_base"]["mcnemar_p"] <= 1
            assert entry["wall_s"]["train"] > 0
    tune = json.loads((results / "tune.json").read_text())
    assert len(tune["settings"]) == 2 and tune["best"] in tune["settings"]
    second = json.loads((results / "runs" / f"{tune['settings'][1]['arm']}.json").read_text())["config"]
    assert "eosFalse" in tune["settings"][1]["arm"] and second["upft"]["prefix_eos"] is False
    assert (
        tune["settings"][0]["setting"]["prefix_length"]
        == json.loads((results / "analysis" / "base.json").read_text())["suggested_k"]
    )
    # sft, rft and label_filter drew one full trace per question: one set of draws, made once.
    assert len(list((tmp / "runs" / "samples" / "full").glob("*/summary.json"))) == 1
    samples = {p.name for p in (tmp / "runs" / "samples").iterdir()}
    assert samples == {"full"} | {f"upft-k{s['setting']['prefix_length']}-p0.25" for s in tune["settings"]}
    assert set(report["coverage"]) == {"base", "upft"}
    for png in ("accuracy_vs_tokens.png", "coverage.png"):
        assert (results / png).read_bytes()[:4] == b"\x89PNG"
    table = [line for line in (results / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == len(arms) + 2
    assert "base (" in (results / "report.md").read_text() and "upft (" in (results / "report.md").read_text()
    for run in ["sft"] + [s["arm"] for s in tune["settings"]]:
        losses = json.loads((results / "runs" / f"{run}.json").read_text())["losses"]
        assert losses and all(step["loss"] > 0 for step in losses), run
    assert (results / "losses.png").read_bytes()[:4] == b"\x89PNG"

    timings = (results / "timings.json").read_text()
    run_compare(path, tmp)
    assert (results / "timings.json").read_text() == timings  # every finished step was skipped
