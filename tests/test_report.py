"""`axolotl-upft report`: where a run's samples, prepared rows and outputs went, with token counts."""

import json
import os
from pathlib import Path

import yaml
from datasets import Dataset

from axolotl_upft.report import decoded_samples, kind_losses, run_report


def write_summary(folder, summary: dict, mtime: int):
    folder.mkdir(parents=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(summary))
    os.utime(path, (mtime, mtime))


def test_report_takes_the_newest_samples_and_rows_and_counts_only_trained_labels(tmp_path):
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    write_summary(prepared / "upft_samples" / "old", {"questions": 1}, mtime=1_000)
    write_summary(prepared / "upft_samples" / "new", {"questions": 2}, mtime=2_000)
    # two prepared datasets: the report must read the newer one
    Dataset.from_dict({"input_ids": [[9]], "labels": [[9]]}).save_to_disk(str(prepared / "older"))
    os.utime(prepared / "older" / "dataset_info.json", (1_000, 1_000))
    rows = {"input_ids": [[1, 2, 3, 4], [5, 6]], "labels": [[-100, -100, 3, 4], [-100, 6]]}
    Dataset.from_dict(rows).save_to_disk(str(prepared / "newer"))
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"")

    report = run_report({"dataset_prepared_path": str(prepared), "output_dir": str(out)})

    assert report == {
        "samples_dir": str(prepared / "upft_samples" / "new"),
        "sampling": {"questions": 2},
        "prepared_dir": str(prepared / "newer"),
        "rows": 2,
        "tokens": 6,
        "tokens_trained": 3,
        "output_dir": str(out),
        "outputs": ["adapter_model.safetensors"],
    }


def test_report_looks_in_upft_cache_dir_and_says_none_where_nothing_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {"upft": {"cache_dir": str(tmp_path / "samples")}}
    assert run_report(raw) == {
        "samples_dir": None,
        "sampling": None,
        "prepared_dir": None,
        "output_dir": "outputs",
        "outputs": [],
    }
    write_summary(tmp_path / "samples" / "key", {"questions": 3}, mtime=1_000)
    write_summary(tmp_path / "last_run_prepared" / "upft_samples" / "key", {"questions": 4}, mtime=2_000)
    assert run_report(raw)["sampling"] == {"questions": 3}, "upft.cache_dir wins over the default folder"
    assert run_report({})["sampling"] == {"questions": 4}, "Axolotl's default dataset_prepared_path"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tiny_run(tmp_path, tokenizer, model) -> tuple[dict, list[list[int]]]:
    """A finished run on disk: three prefix rows (k=2) and one full row, and the trainer's log lines."""
    prompts = [encode(tokenizer, f"<|im_start|>user Natalia sold {n} clips <|im_end|>") for n in (1, 2, 3, 4)]
    responses = [encode(tokenizer, text) for text in ("The answer", "She sold", "Then", "The answer is 18 .")]
    rows = {
        "input_ids": [p + r for p, r in zip(prompts, responses)],
        "labels": [[-100] * len(p) + r for p, r in zip(prompts, responses)],
    }
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    Dataset.from_dict(rows).save_to_disk(str(prepared / "rows"))
    out.mkdir()
    logs = [
        {"loss": "2.1", "upft/prefix_loss": "2.5", "upft/full_loss": "1.75", "upft/prefix_tokens": "3"},
        {"loss": "1.4", "upft/prefix_loss": "1.25", "upft/prefix_tokens": "3"},
    ]
    (out / "debug.log").write_text(
        "[INFO] training\n" + "".join(f"{log}\n" for log in logs) + "{'train_loss': 1}\n"
    )
    raw = {"base_model": str(model), "upft": {"prefix_length": 2}, "output_dir": str(out)}
    return raw | {"dataset_prepared_path": str(prepared)}, [prompts, responses]


def test_decoded_samples_show_prompt_and_trained_response_with_at_least_one_full_trace(
    tmp_path, tiny_tokenizer, tiny_model
):
    raw, (prompts, responses) = tiny_run(tmp_path, tiny_tokenizer, tiny_model)
    samples = decoded_samples(raw, 3)
    assert [s["kind"] for s in samples] == ["prefix", "prefix", "full"], "a full trace among the few rows"
    assert samples[0]["prompt"] == tiny_tokenizer.decode(prompts[0]), "the masked part is the prompt"
    assert samples[2]["response"] == tiny_tokenizer.decode(responses[3]) and "18" in samples[2]["response"]


def test_decoded_samples_come_from_the_cache_before_preprocess(tmp_path, tiny_tokenizer, tiny_model):
    ids = {0: encode(tiny_tokenizer, "She sold"), 1: encode(tiny_tokenizer, "The answer is 18 .")}
    cache = tmp_path / "samples" / "key"
    cache.mkdir(parents=True)
    records = [
        {"i": i, "kind": kind, "q": "x", "ids": ids[i], "stop": True}
        for i, kind in ((0, "prefix"), (1, "full"))
    ]
    (cache / "part-a-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"count": 2}, *records]))
    (cache / "summary.json").write_text("{}")
    raw = {"base_model": str(tiny_model), "upft": {"cache_dir": str(tmp_path / "samples")}}
    raw["dataset_prepared_path"] = str(tmp_path / "none")
    assert decoded_samples(raw, 5) == [
        {"kind": "prefix", "response": tiny_tokenizer.decode(ids[0])},
        {"kind": "full", "response": tiny_tokenizer.decode(ids[1])},
    ]


def test_report_rows_prints_decoded_samples_per_kind_losses_run_time_and_a_cpu_next_step(
    tmp_path, tiny_tokenizer, tiny_model, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # outside a checkout: the next step names the gsm8k benchmark
    from click.testing import CliRunner

    from axolotl_upft.cli import main

    raw, _ = tiny_run(tmp_path, tiny_tokenizer, tiny_model)
    assert kind_losses(tmp_path / "out") == {
        "steps": 2,
        "prefix": {"first": 2.5, "last": 1.25},
        "full": {"first": 1.75, "last": 1.75},
    }
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["report", str(config), "--started", "0", "--rows", "2"])
    assert result.exit_code == 0, result.output
    text = result.output.split("\n}\n", 1)[1]
    assert "-- prefix" in text and "-- full" in text and "prompt:   '<|im_start|> user Natalia" in text
    assert "prefix: 2.500 -> 1.250" in text and "full: 1.750 -> 1.750" in text
    assert "== run time:" in text
    assert f"--config {config} --benchmark gsm8k --limit 20 --max-new-tokens 256 --output" in text
    shown = CliRunner().invoke(main, ["show-samples", str(config), "--n", "4"])
    assert shown.exit_code == 0, shown.output
    assert [json.loads(line)["kind"] for line in shown.output.splitlines()] == ["prefix"] * 3 + ["full"]


def test_the_next_step_evaluates_the_shipped_20_questions_from_a_checkout(monkeypatch):
    from axolotl_upft.report import CPU_EVAL, next_step

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    base, adapter = next_step("cfg.yml", "runs/demo/adapter")
    assert f"--benchmark {CPU_EVAL} --max-new-tokens 256 --output runs/eval" in base
    assert "--adapter" not in base
    assert "--adapter runs/demo/adapter" in adapter
    assert len(CPU_EVAL.read_text().splitlines()) == 20, "a CPU-sized eval"
