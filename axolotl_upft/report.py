"""What a UPFT run produced: the sample summary, the prepared rows' token counts, the outputs."""

import ast
import json
from pathlib import Path

from .args import DEFAULT_PREPARED_PATH, UPFTConfig
from .rows import FULL, IGNORE_INDEX, PREFIX


def newest(paths) -> Path | None:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None


def run_report(raw: dict) -> dict:
    from datasets import load_from_disk

    upft = UPFTConfig.from_cfg(raw)
    prepared_root = Path(raw.get("dataset_prepared_path") or DEFAULT_PREPARED_PATH)
    cache_root = upft.sample_cache_root(raw)
    report: dict = {"samples_dir": None, "sampling": None, "prepared_dir": None}
    summary = newest(cache_root.glob("*/summary.json"))
    if summary:
        report["samples_dir"] = str(summary.parent)
        report["sampling"] = json.loads(summary.read_text())
    prepared = newest(p.parent for p in prepared_root.glob("*/dataset_info.json"))
    if prepared:
        rows = load_from_disk(str(prepared))
        trained = [sum(label != IGNORE_INDEX for label in labels) for labels in rows["labels"]]
        report["prepared_dir"] = str(prepared)
        report["rows"] = len(rows)
        report["tokens"] = sum(map(len, rows["input_ids"]))
        report["tokens_trained"] = sum(trained)
    output = Path(raw.get("output_dir") or "outputs")
    report["output_dir"] = str(output)
    report["outputs"] = sorted(p.name for p in output.iterdir()) if output.exists() else []
    return report


def trained_start(labels: list[int]) -> int:
    """Where a row's trained tokens start (its prompt is masked before that)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def pick_kinds(rows: list[tuple[str, int]], n: int) -> list[int]:
    """Indices of n rows (kind, index): mostly prefix rows, and at least one full trace where there is one."""
    prefix = [i for kind, i in rows if kind == PREFIX]
    full = [i for kind, i in rows if kind == FULL]
    n_full = min(len(full), max(1, n // 3))
    return sorted(prefix[: n - n_full] + full[:n_full])


def decoded_samples(raw: dict, n: int) -> list[dict]:
    """The first n samples of the newest run, decoded: from the prepared rows (prompt, kind, trained response)
    or, before `preprocess`, from the sample cache (kind and generated text; the cache holds no prompts)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(raw.get("tokenizer_config") or raw["base_model"])
    decode = tokenizer.decode
    k = UPFTConfig.from_cfg(raw).prefix_length
    report = run_report(raw)
    if report["prepared_dir"]:
        from datasets import load_from_disk

        rows = load_from_disk(report["prepared_dir"])
        ids_, starts = rows["input_ids"], [trained_start(labels) for labels in rows["labels"]]
        # a prefix row trains at most k + 1 tokens (the trainer's per-kind losses count them the same way)
        kinds = [
            (PREFIX if len(ids) - s <= k + 1 else FULL, i) for i, (ids, s) in enumerate(zip(ids_, starts))
        ]
        return [
            {
                "kind": kinds[i][0],
                "prompt": decode(ids_[i][: starts[i]]),
                "response": decode(ids_[i][starts[i] :]),
            }
            for i in pick_kinds(kinds, n)
        ]
    if report["samples_dir"] is None:
        return []
    parts = sorted(Path(report["samples_dir"]).glob("part-*.jsonl"))
    records = [json.loads(line) for path in parts for line in path.read_text().splitlines()[1:]]
    records.sort(key=lambda r: r["i"])
    chosen = pick_kinds([(r["kind"], j) for j, r in enumerate(records)], n)
    return [{"kind": records[j]["kind"], "response": decode(records[j]["ids"])} for j in chosen]


def kind_losses(output_dir: Path) -> dict | None:
    """Per-kind training loss, first and last logged step, from the trainer's log lines in Axolotl's
    `output_dir/debug.log` (`upft/prefix_loss`, `upft/full_loss`; absent with loss_normalization: token)."""
    log = output_dir / "debug.log"
    if not log.exists():
        return None
    steps = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and "'upft/prefix_loss'" in line:
            steps.append(ast.literal_eval(line.strip()))
    if not steps:
        return None
    kinds = {
        kind: [float(s[f"upft/{kind}_loss"]) for s in steps if f"upft/{kind}_loss" in s]
        for kind in (PREFIX, FULL)
    }
    return {"steps": len(steps), **{kind: {"first": v[0], "last": v[-1]} for kind, v in kinds.items() if v}}


CPU_EVAL = Path("example_configs/data/gsm8k_test_20.jsonl")  # shipped: 20 GSM8K test questions


def next_step(config: str, output_dir: str) -> list[str]:
    """What to run after a CPU run: a small eval of base and adapter, with the training config's prompts (the
    20 shipped GSM8K test questions from a checkout, else the first 20 of `gsm8k` from UPFT_DATA_DIR)."""
    questions = f"{CPU_EVAL}" if CPU_EVAL.exists() else "gsm8k --limit 20"
    common = f"axolotl-upft eval --config {config} --benchmark {questions} --max-new-tokens 256"
    return [
        f"{common} --output runs/eval   # base",
        f"{common} --adapter {output_dir} --output runs/eval   # the adapter; results.md compares both",
    ]


def readable(report: dict, samples: list[dict], losses: dict | None, config: str) -> str:
    """The end of a run for a person: decoded samples, per-kind losses, wall time, the next step."""
    lines = ["", "== decoded samples (axolotl-upft show-samples CONFIG --n N for more)"]
    for sample in samples:
        lines.append(f"-- {sample['kind']}")
        if "prompt" in sample:
            lines.append(f"prompt:   {sample['prompt']!r}")
        lines.append(f"response: {sample['response']!r}")
    if losses:
        lines.append(f"== training loss by kind, first -> last of {losses['steps']} logged steps")
        lines += [
            f"{kind}: {v['first']:.3f} -> {v['last']:.3f}" for kind, v in losses.items() if kind != "steps"
        ]
    if "wall_seconds" in report:
        lines.append(f"== run time: {report['wall_seconds'] / 60:.1f} min")
    lines.append("== next step on a CPU: 20 GSM8K questions, at most 256 new tokens each, base and adapter")
    lines.append("   (200 questions at eval's default 1,024 new tokens can take hours on a CPU)")
    return "\n".join(lines + ["   " + line for line in next_step(config, report["output_dir"])])
