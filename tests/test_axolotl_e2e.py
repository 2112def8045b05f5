"""Real `axolotl preprocess` / `axolotl train` with the plugin, on a tiny random Llama built offline."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
IGNORE = -100


def run_axolotl(command: str, config: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", command, str(config), *extra],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def axolotl(command: str, config: Path, *extra: str) -> str:
    done = run_axolotl(command, config, *extra)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def write_config(tmp: Path, model: Path, questions: list[dict], **overrides) -> Path:
    data = tmp / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q["question"]}) + "\n" for q in questions[:24]))
    cfg = {
        "base_model": str(model),
        "plugins": ["axolotl_upft.UPFTPlugin"],
        "upft": {
            "prefix_length": 6,
            "structure_ratio": 0.25,
            "sampling": {"max_new_tokens": 16, "batch_size": 8, "backend": "hf"},
        },
        "datasets": [{"path": str(data), "type": "upft"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
        "sequence_len": 256,
        "sample_packing": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "bf16": False,
        "fp16": False,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "save_strategy": "no",
    } | overrides
    path = tmp / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def qwen3_thinking_off_config(tmp: Path, model: Path, questions: list[dict]) -> Path:
    """write_config with Axolotl's qwen3 template and `enable_thinking: false`."""
    return write_config(
        tmp, model, questions, chat_template="qwen3", chat_template_kwargs={"enable_thinking": False}
    )


def prepared_rows(tmp: Path) -> tuple[Path, list[dict]]:
    from datasets import load_from_disk

    (prepared,) = [p for p in (tmp / "prepared").iterdir() if p.is_dir() and p.name != "upft_samples"]
    return prepared, list(load_from_disk(str(prepared)))


def assert_mask_rules(rows: list[dict], tokenizer, k: int) -> None:
    header = tokenizer.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        start = next(i for i in range(len(ids)) if ids[i : i + 2] == header) + 2
        assert labels[:start] == [IGNORE] * start, "every prompt token is masked"
        assert labels[start:] == ids[start:], "every response token is trained on"
    prefix = [r for r in rows if len([t for t in r["labels"] if t != IGNORE]) <= k + 1]
    assert prefix and all(r["input_ids"][-1] == tokenizer.eos_token_id for r in prefix)


def assert_summary_in_console(log: str, tmp: Path) -> None:
    """The plugin's lines reach Axolotl's console in Axolotl's format: the sampling summary, then the rows."""
    (cache,) = (tmp / "prepared" / "upft_samples").iterdir()
    summary = json.loads((cache / "summary.json").read_text())
    lines = log.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.endswith("UPFT sample summary")]
    assert "[INFO] [axolotl.integrations.upft.selfsample] UPFT sample summary" in lines[start]
    block = "\n".join(lines[start + 1 : start + 7])
    assert "engine:      hf (upft.sampling.backend: hf)" in block
    assert f"{summary['prefix']} prefixes (k=6), {summary['full']} full traces" in block
    assert (summary["prefix"], summary["full"]) == (18, 6), "p = 0.25 of 24 questions keep the full trace"
    assert "0 of 24 from the cache, 24 generated now" in block
    assert f"{summary['tokens_generated']:,} in all" in block and "tokens/s)" in block
    assert f"unfinished:  {summary['unfinished']} of 6 full traces" in block
    assert f"cache:       {cache}" in block
    assert "[INFO] [axolotl.integrations.upft.dataset] UPFT: 24 rows (18 prefix with k=6, 6 full)" in log


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_preprocess_then_train_with_the_plugin(packing, tmp_path, tiny_model, tiny_tokenizer, questions):
    config = write_config(tmp_path, tiny_model, questions, sample_packing=packing)
    if not packing:
        bench = tmp_path / "bench.jsonl"
        bench.write_text("".join(json.dumps(q) + "\n" for q in questions[:3]))
        cfg = yaml.safe_load(config.read_text())
        cfg["upft"]["eval_after_train"] = [str(bench)]
        config.write_text(yaml.safe_dump(cfg))
    log = axolotl("preprocess", config, "--debug", "--debug-num-examples", "24")
    assert_summary_in_console(log, tmp_path)
    assert "assistant(-100," in log and "<|im_end|>(3, 3)" in log, (
        "--debug shows the masked prompt and trained EOS"
    )
    _, rows = prepared_rows(tmp_path)
    assert len(rows) == 24
    assert_mask_rules(rows, tiny_tokenizer, k=6)
    assert ("position_ids" in rows[0]) == packing

    # Without the sample cache, only the prepared rows can spare train a second sampling.
    shutil.rmtree(tmp_path / "prepared" / "upft_samples")
    prepared = sorted((tmp_path / "prepared").iterdir())
    log = axolotl("train", config)
    assert "UPFT sampling" not in log, "train reuses the prepared rows: nothing is sampled twice"
    assert sorted((tmp_path / "prepared").iterdir()) == prepared, "no new prepared dataset, no new samples"
    assert "train_loss" in log
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    if packing:
        report = subprocess.run(
            [sys.executable, "-m", "axolotl_upft.cli", "report", str(config), "--rows", "3"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
            cwd=tmp_path,
        ).stdout
        assert "-- prefix" in report and "-- full" in report, "decoded rows of both kinds end the report"
        assert re.search(r"prefix: \d+\.\d{3} -> \d+\.\d{3}", report), "per-kind losses from the train log"
    else:
        (summary,) = (tmp_path / "out" / "eval").glob("*/*.summary.json")
        graded = json.loads(summary.read_text())
        expected = (3, str(tiny_model), str(tmp_path / "out"))
        assert (graded["n"], graded["model"], graded["adapter"]) == expected, "graded this run's adapter"


def test_changing_an_upft_setting_makes_a_new_prepared_dataset(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions)
    axolotl("preprocess", config)
    first, _ = prepared_rows(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["upft"]["prefix_eos"] = False
    cfg["plugins"] = ["upft.UPFTPlugin"]
    config.write_text(yaml.safe_dump(cfg))
    log = axolotl("preprocess", config)
    prepared = sorted(
        p.name for p in (tmp_path / "prepared").iterdir() if p.is_dir() and p.name != "upft_samples"
    )
    assert len(prepared) == 2 and first.name in prepared
    assert "UPFT sampling" not in log, "prefix_eos does not change the samples: the sample cache serves them"
    assert "samples:     24 of 24 from the cache, 0 generated now" in log, "the summary says so"


def test_a_plugin_that_fails_to_import_stops_the_run(tmp_path, tiny_model, questions):
    config = write_config(tmp_path, tiny_model, questions, plugins=["axolotl_upft.NoSuchPlugin"])
    done = run_axolotl("preprocess", config, timeout=300)
    assert done.returncode != 0
    assert "NoSuchPlugin" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("dataset_type", "message"),
    [
        ("axolotl_upft.dataset", "needs the UPFT plugin: add `plugins: [axolotl_upft.UPFTPlugin]`"),
        ("upft", "unhandled prompt tokenization strategy: upft"),
    ],
)
def test_a_upft_dataset_without_the_plugin_stops_preprocess(
    dataset_type, message, tmp_path, tiny_model, questions
):
    config = write_config(tmp_path, tiny_model, questions)
    cfg = yaml.safe_load(config.read_text())
    del cfg["plugins"]
    cfg["datasets"][0]["type"] = dataset_type
    config.write_text(yaml.safe_dump(cfg))
    done = run_axolotl("preprocess", config, timeout=300)
    assert done.returncode != 0 and message in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert not (tmp_path / "prepared" / "upft_samples").exists(), "nothing was sampled"


def test_chat_template_kwargs_shape_the_sampled_and_trained_prompts(
    tmp_path, tiny_model, tiny_tokenizer, questions
):
    """`chat_template: qwen3` with thinking off: every prompt ends with the closed think block, as Axolotl's
    own `type: chat_template` renders it (sampling and rows used to ignore the kwargs: thinking on)."""
    from axolotl_upft.args import REFERENCE_INSTRUCTION

    config = qwen3_thinking_off_config(tmp_path, tiny_model, questions)
    axolotl("preprocess", config)
    _, rows = prepared_rows(tmp_path)
    expected = set()
    for q in questions[:24]:
        for user in (q["question"], q["question"] + " " + REFERENCE_INSTRUCTION):
            text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            expected.add(tuple(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]))
    assert len(rows) == 24
    for row in rows:
        start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE)
        assert tuple(row["input_ids"][:start]) in expected, tiny_tokenizer.decode(row["input_ids"][:start])
