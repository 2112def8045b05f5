"""`axolotl-upft` commands as a user runs them: output on success, a usage error (no traceback) otherwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_axolotl_e2e import qwen3_thinking_off_config, write_config

from axolotl_upft import generation
from axolotl_upft.cli import main
from axolotl_upft.evaluate import arm_name

pytestmark = pytest.mark.slow


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def last_json(text: str) -> dict:
    """The last JSON object printed (a command prints one per dataset or benchmark)."""
    lines, found = text.splitlines(), None
    for i, line in enumerate(lines):
        if line.startswith("{"):
            found = json.JSONDecoder().raw_decode("\n".join(lines[i:]))[0]
    return found


def usage_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Error" in result.output and message in result.output, result.output
    assert isinstance(result.exception, SystemExit), "a usage error, not a traceback"


def test_sample_prints_the_summary_and_report_finds_the_samples(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions)
    result = invoke("sample", config)
    assert result.exit_code == 0, result.output
    summary = last_json(result.stdout)
    assert (summary["questions"], summary["prefix"], summary["full"]) == (24, 18, 6)
    report = invoke("report", config, "--started", "0")
    assert report.exit_code == 0, report.output
    found = json.loads(report.stdout)
    assert Path(found["samples_dir"]).parent == tmp_path / "prepared" / "upft_samples"
    assert found["sampling"]["key"].startswith(Path(found["samples_dir"]).name)
    assert found["sampling"]["tokens_generated"] == summary["tokens_generated"]
    assert found["wall_seconds"] > 0 and found["prepared_dir"] is None


def test_sample_turns_a_bad_row_into_a_usage_error(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions)
    rows = [{"question": "How many ?"}, {"body": "x"}]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    usage_error(invoke("sample", config), "row 1: the question (field 'question') is empty")
    assert not (tmp_path / "prepared" / "upft_samples").exists(), "nothing was sampled"


def test_sample_without_a_upft_dataset_is_a_usage_error(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions)
    cfg = yaml.safe_load(config.read_text())
    cfg["datasets"][0]["type"] = "alpaca"
    config.write_text(yaml.safe_dump(cfg))
    usage_error(invoke("sample", config), "no dataset with `type: upft`")


def test_eval_grades_a_jsonl_benchmark_and_prints_its_summary(tmp_path, tiny_model, questions):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in questions[:3]))
    result = invoke(
        "eval",
        "--model",
        tiny_model,
        "--benchmark",
        bench,
        "--limit",
        "2",
        "--max-new-tokens",
        "6",
        "--output",
        tmp_path / "eval",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["benchmark"], summary["n"]) == ("bench", 2)
    arm = tmp_path / "eval" / arm_name(str(tiny_model), None)
    assert len((arm / "bench.jsonl").read_text().splitlines()) == 2
    assert "| bench | 2 |" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--benchmark", "gsm9k"], "unknown benchmark 'gsm9k'"),
        (["--benchmark", "missing.jsonl"], "no file at"),
        (["--benchmark", "gsm8k", "--limit", "0"], "Invalid value for '--limit'"),
    ],
)
def test_eval_usage_errors(args, message, tmp_path, tiny_model):
    usage_error(invoke("eval", "--model", tiny_model, "--output", tmp_path, *args), message)


def test_eval_without_model_or_config_and_with_an_empty_adapter_are_usage_errors(tmp_path, tiny_model):
    usage_error(invoke("eval", "--benchmark", "gsm8k"), "give --model (or --config")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({}, str(adapter / "adapter_model.safetensors"))
    result = invoke("eval", "--model", tiny_model, "--adapter", adapter, "--benchmark", "gsm8k")
    usage_error(result, "stage3_gather_16bit_weights_on_model_save")


def test_analyze_prints_the_table_and_a_suggested_k(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions)
    result = invoke(
        "analyze",
        config,
        "--questions",
        "2",
        "--samples",
        "2",
        "--lengths",
        "2,4",
        "--max-new-tokens",
        "6",
        "--output",
        tmp_path / "analysis",
    )
    assert result.exit_code == 0, result.output
    assert "suggested: upft.prefix_length:" in result.output
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert [row["length"] for row in saved["table"]] == [2, 4]


def test_analyze_usage_error_names_the_bad_option(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions)
    result = invoke("analyze", config, "--questions", "2", "--lengths", "4,16", "--max-new-tokens", "8")
    usage_error(result, "max_new_tokens (8) must be >= the longest length (16)")


def test_convert_gguf_usage_error_for_a_missing_file(tmp_path):
    result = invoke("convert-gguf", "--gguf", tmp_path / "none.gguf", "--out", tmp_path / "m")
    usage_error(result, "does not exist")


def test_axolotl_runs_upft_sample_and_upft_eval_from_the_entry_points(tmp_path, tiny_model, questions):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def axolotl(*args):
        return subprocess.run(
            [sys.executable, "-m", "axolotl.cli.main", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    bad = axolotl("upft-eval", "--model", tiny_model, "--benchmark", "gsm9k", "--output", tmp_path)
    assert bad.returncode == 2 and "unknown benchmark 'gsm9k'" in bad.stderr, bad.stderr[-2000:]
    config = write_config(tmp_path, tiny_model, questions)
    sampled = axolotl("upft-sample", config)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert last_json(sampled.stdout)["questions"] == 24


def test_eval_with_the_training_config_renders_its_prompts_and_takes_its_sampling_keys(
    tmp_path, tiny_model, tiny_tokenizer, questions
):
    from axolotl_upft.cache import ids_digest

    config = qwen3_thinking_off_config(tmp_path, tiny_model, questions)
    cfg = yaml.safe_load(config.read_text())
    cfg["upft"] |= {"system_prompt": "You are a careful math tutor .", "question_field": "query"}
    cfg["upft"]["sampling"] |= {"max_new_tokens": 7, "dtype": "float32"}
    config.write_text(yaml.safe_dump(cfg))
    bench = tmp_path / "mine.jsonl"
    bench.write_text(json.dumps({"query": "How many ?", "answer": "#### 18"}) + "\n")
    result = invoke("eval", "--config", config, "--benchmark", bench, "--output", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    summary = last_json(result.stdout)
    assert summary["model"] == str(tiny_model), "--model defaults to the config's base_model"
    assert (summary["max_new_tokens"], summary["backend"]) == (7, "hf"), "upft.sampling, not eval's defaults"
    assert summary["system_prompt"] == "You are a careful math tutor ."
    (part,) = (tmp_path / "eval" / "parts" / "mine").glob("*/part-*.jsonl")
    (record,) = [json.loads(line) for line in part.read_text().splitlines()[1:]]
    assert len(record["ids"]) <= 7, "the sampler generated at most the config's max_new_tokens"
    meta = json.loads(part.with_name("meta.json").read_text())
    assert (meta["engine"], meta["max_new_tokens"]) == (["hf", generation.DRAW_VERSION, "float32"], 7)
    system = f"<|im_start|>system\n{summary['system_prompt']}<|im_end|>\n"
    expected = (
        system + "<|im_start|>user\nHow many ?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    prompt = tiny_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert record["q"] == ids_digest(prompt), (
        "the question from upft.question_field, in the config's template"
    )


def test_eval_reads_the_question_and_answer_fields_it_is_told(tmp_path, tiny_model):
    bench = tmp_path / "mine.jsonl"
    bench.write_text(json.dumps({"query": "How many ?", "question": "not this", "solution": "18"}) + "\n")
    result = invoke(
        "eval", "--model", tiny_model, "--benchmark", bench, "--output", tmp_path / "eval",
        "--question-field", "query", "--answer-field", "solution", "--max-new-tokens", 3, "--backend", "hf",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = last_json(result.stdout)
    rows = (tmp_path / "eval").glob("*/mine.jsonl")
    (row,) = [json.loads(line) for path in rows for line in path.read_text().splitlines()]
    assert (row["question"], row["gold"], summary["max_new_tokens"]) == ("How many ?", "18", 3)


def test_the_plugins_commands_turn_off_axolotls_telemetry_unless_the_user_set_it(monkeypatch):
    """Axolotl's telemetry flush waits for its server at exit: without internet a command hung for minutes."""
    monkeypatch.delenv("AXOLOTL_DO_NOT_TRACK", raising=False)
    assert invoke("write-benchmark", "--help").exit_code == 0
    assert os.environ["AXOLOTL_DO_NOT_TRACK"] == "1"
    monkeypatch.setenv("AXOLOTL_DO_NOT_TRACK", "0")
    assert invoke("write-benchmark", "--help").exit_code == 0
    assert os.environ["AXOLOTL_DO_NOT_TRACK"] == "0", "a user's own setting wins"
