"""Base vs UPFT vs self-SFT vs RFT vs UPFT+label_filter on one built-in benchmark, all from one YAML.

    python bench/compare.py bench/compare.yml            # every stage; resumes where it stopped
    python bench/compare.py bench/compare.yml --stage tune

Stages: data (train/validation/test JSONL), analyze (prefix coverage of the base model), tune (each
UPFT setting of `tune:` trained and evaluated on validation; the best flexible accuracy wins), arms
(every arm trained with the one LoRA `recipe:` and evaluated once on test), report (bench/compare_report.py).
Work lives under `output:` (git-ignored); every finished step writes a small JSON under `results:`,
so a killed run resumes: finished steps are skipped, sampling and eval reuse their cached batches.
"""

import argparse
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_report

STAGES = ("data", "analyze", "tune", "arms", "report")


def load(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    for key in ("model", "task", "output", "results", "recipe", "tune", "arms"):
        if key not in cfg:
            raise SystemExit(f"{path}: missing key {key!r}")
    cfg["output"], cfg["results"] = Path(cfg["output"]), Path(cfg["results"])
    if cfg["task"] == "chosen":
        choice = read_json(Path(cfg.get("task_choice", "results/task_choice.json")), {})
        if not choice.get("chosen"):
            raise SystemExit(
                "task: chosen needs a finished `make choose-task` (results/task_choice.json) "
                "that found a task with base accuracy in 10-60%"
            )
        cfg["task"] = choice["chosen"]
    return cfg


def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def run(command: list[str], log: Path) -> float:
    """Run a command with its output appended to ``log``; its wall seconds. A failure stops the experiment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(command)}; see {log}")
    return round(time.perf_counter() - started, 1)


def timed(cfg: dict, arm: str, step: str, command: list[str], made: Path) -> float:
    """Run a step once: its seconds are kept in results/timings.json, and a step is skipped when it is
    recorded there and what it made (``made``, under the git-ignored output) is still on disk."""
    path = cfg["results"] / "timings.json"
    timings = read_json(path, {})
    if step in timings.get(arm, {}) and made.exists():
        return timings[arm][step]
    seconds = run(command, cfg["output"] / arm / "log.txt")
    timings = read_json(path, {})
    timings.setdefault(arm, {})[step] = seconds
    write_json(path, timings)
    return seconds


def data_file(cfg: dict, split: str) -> Path:
    return cfg["output"] / "data" / f"{cfg['task']}-{split}.jsonl"


def stage_data(cfg: dict) -> None:
    """The train split (first `train_questions`) as the arms' dataset; eval writes its own splits."""
    from axolotl_upft.benchmarks import write_benchmark

    full = write_benchmark(f"{cfg['task']}-train", cfg["output"] / "data" / "full")
    lines = full.read_text().splitlines(keepends=True)[: cfg.get("train_questions")]
    target = data_file(cfg, "train")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != "".join(lines):
        target.write_text("".join(lines))


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def arm_config(cfg: dict, arm: str, overrides: dict) -> Path:
    """The Axolotl YAML of one trained arm: the shared recipe, this arm's overrides, its own folders.

    ``samples:`` in the overrides names the arm's sample cache under ``output/samples`` (default: the arm):
    arms that draw the same samples share one, so the draws are made once and every arm reports them."""
    folder = cfg["output"] / arm
    overrides = dict(overrides)
    samples = cfg["output"] / "samples" / str(overrides.pop("samples", arm))
    config = merge(cfg["recipe"], overrides)
    config = merge(
        config,
        {
            "base_model": cfg["model"],
            "plugins": ["axolotl_upft.UPFTPlugin"],
            "datasets": [{"path": str(data_file(cfg, "train")), "type": "upft"}],
            "dataset_prepared_path": str(folder / "prepared"),
            "output_dir": str(folder / "adapter"),
            # One cache per set of draws, so `axolotl-upft report` counts exactly this arm's samples.
            "upft": {"cache_dir": str(samples)},
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yml"
    text = yaml.safe_dump(config, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        if path.exists():  # another recipe: prepare and train again
            shutil.rmtree(folder / "adapter", ignore_errors=True)
            timings = read_json(cfg["results"] / "timings.json", {})
            timings.pop(arm, None)
            write_json(cfg["results"] / "timings.json", timings)
        path.write_text(text)
    return path


NOTHING_TO_TRAIN = "no question kept a correct sample"
LOSS_LINE = re.compile(r"\{'loss': [^{}]*\}")


def train_losses(log: Path) -> list[dict]:
    """The training loss Axolotl logs at each logging step (the last `axolotl train` of this arm's log)."""
    text = log.read_text().rsplit("$ axolotl train", 1)[-1] if log.exists() else ""
    steps = []
    for match in LOSS_LINE.findall(text):
        try:
            step = ast.literal_eval(match)
        except (ValueError, SyntaxError):
            continue
        steps.append({k: float(v) for k, v in step.items() if k in ("loss", "epoch", "learning_rate")})
    return steps


def train(cfg: dict, arm: str, overrides: dict) -> Path | None:
    """Prepare and train one arm; None (recorded in results/runs/<arm>.json) when RFT or label_filter found
    no correct sample at all, so there is nothing to train on."""
    config = arm_config(cfg, arm, overrides)
    adapter = cfg["output"] / arm / "adapter"
    try:
        timed(
            cfg, arm, "preprocess_s", ["axolotl", "preprocess", str(config)], cfg["output"] / arm / "prepared"
        )
    except SystemExit:
        if NOTHING_TO_TRAIN not in (cfg["output"] / arm / "log.txt").read_text()[-20000:]:
            raise
        write_json(
            cfg["results"] / "runs" / f"{arm}.json",
            {"config": yaml.safe_load(config.read_text()), "skipped": NOTHING_TO_TRAIN},
        )
        return None
    timed(cfg, arm, "train_s", ["axolotl", "train", str(config)], adapter / "adapter_model.safetensors")
    report = subprocess.run(
        ["axolotl-upft", "report", str(config)], capture_output=True, text=True, check=True
    )
    write_json(
        cfg["results"] / "runs" / f"{arm}.json",
        {
            "config": yaml.safe_load(config.read_text()),
            "report": json.loads(report.stdout),
            "losses": train_losses(cfg["output"] / arm / "log.txt"),
        },
    )
    return adapter


def backend(cfg: dict) -> str:
    """The recipe's upft.sampling.backend, which eval and analyze use too."""
    return cfg["recipe"].get("upft", {}).get("sampling", {}).get("backend", "auto")


def evaluate(cfg: dict, arm: str, split: str, adapter: Path | None) -> dict:
    """Greedy eval of one arm on one split; the per-question rows and summary are copied to results/."""
    name = f"{cfg['task']}-{split}"
    limit = cfg.get(f"{split}_questions")
    command = [
        "axolotl-upft",
        "eval",
        "--model",
        str(cfg["model"]),
        "--benchmark",
        name,
        "--output",
        str(cfg["output"] / "eval"),
        "--max-new-tokens",
        str(cfg["max_new_tokens"]),
        "--batch-size",
        str(cfg["eval_batch_size"]),
        "--backend",
        backend(cfg),
    ]
    command += ["--adapter", str(adapter)] if adapter else []
    command += ["--limit", str(limit)] if limit else []
    from axolotl_upft.evaluate import arm_name

    folder = cfg["output"] / "eval" / arm_name(str(cfg["model"]), str(adapter) if adapter else None)
    timed(cfg, arm, f"eval_{split}_s", command, folder / f"{name}.summary.json")
    summary = json.loads((folder / f"{name}.summary.json").read_text())
    rows = cfg["results"] / "rows" / f"{arm}.{split}.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / f"{name}.jsonl", rows)
    write_json(cfg["results"] / "rows" / f"{arm}.{split}.summary.json", summary)
    return summary


def tune_overrides(setting: dict) -> dict:
    """A `tune:` entry (k, p, prefix_eos, learning_rate, num_epochs) as config overrides."""
    upft = {k: setting[k] for k in ("prefix_length", "structure_ratio", "prefix_eos") if k in setting}
    top = {k: setting[k] for k in ("learning_rate", "num_epochs") if k in setting}
    # Settings with the same k and p (and the recipe's sampling) draw the same samples.
    pairs = (("prefix_length", "k"), ("structure_ratio", "p"))
    draws = "-".join(f"{short}{upft[key]}" for key, short in pairs if key in upft)
    return {**top, "upft": upft, "samples": f"upft-{draws}"}


def setting_name(setting: dict) -> str:
    short = {
        "prefix_length": "k",
        "structure_ratio": "p",
        "prefix_eos": "eos",
        "learning_rate": "lr",
        "num_epochs": "ep",
    }
    return "upft-" + "-".join(f"{short[k]}{setting[k]}" for k in short if k in setting)


def resolve_k(cfg: dict, setting: dict) -> dict:
    """``prefix_length: analyze`` becomes the suggested k of the base model's prefix coverage."""
    if setting.get("prefix_length") != "analyze":
        return setting
    analysis = read_json(cfg["results"] / "analysis" / "base.json")
    if analysis is None:
        raise SystemExit("prefix_length: analyze needs the analyze stage first (results/analysis/base.json)")
    return {**setting, "prefix_length": analysis["suggested_k"]}


def stage_tune(cfg: dict) -> dict:
    """Train and validate each UPFT setting; the winner (best flexible accuracy, first on ties)."""
    results = []
    for setting in cfg["tune"]:
        setting = resolve_k(cfg, setting)
        arm = setting_name(setting)
        adapter = train(cfg, arm, tune_overrides(setting))
        summary = evaluate(cfg, arm, "validation", adapter)
        results.append(
            {
                "arm": arm,
                "setting": setting,
                "accuracy": summary["accuracy"],
                "accuracy_flexible": summary["accuracy_flexible"],
                "n": summary["n"],
            }
        )
        write_json(cfg["results"] / "tune.json", {"settings": results, "best": None})
    base = evaluate(cfg, "base", "validation", None)
    best = max(results, key=lambda r: r["accuracy_flexible"])
    write_json(
        cfg["results"] / "tune.json",
        {"settings": results, "best": best, "base_validation_flexible": base["accuracy_flexible"]},
    )
    return best


def stage_arms(cfg: dict, best: dict) -> None:
    evaluate(cfg, "base", "test", None)
    chosen = tune_overrides(best["setting"])
    evaluate(cfg, "upft", "test", train(cfg, best["arm"], chosen))
    stage_analyze(cfg, "upft", lambda: merged_model(cfg, cfg["output"] / best["arm"] / "adapter"))
    for arm, overrides in cfg["arms"].items():
        # label_filter arms keep the tuned k, p, lr and epochs; the others keep lr and epochs. Neither keeps
        # the tuned arm's prefix samples: they draw full traces (`samples:` in their YAML, or their own).
        drop = ("samples",) if overrides.get("upft", {}).get("label_filter") else ("samples", "upft")
        keep = {k: v for k, v in chosen.items() if k not in drop}
        adapter = train(cfg, arm, merge(keep, overrides or {}))
        if adapter is not None:
            evaluate(cfg, arm, "test", adapter)


def stage_analyze(cfg: dict, arm: str, model) -> None:
    """Prefix coverage of the samples of ``model()`` (a model folder) on the first train questions."""
    target = cfg["results"] / "analysis" / f"{arm}.json"
    if target.exists():
        return
    model = model()
    from axolotl_upft.analyze import analyze

    settings = dict(cfg.get("analyze") or {})
    count = settings.pop("questions", 32)
    lines = data_file(cfg, "train").read_text().splitlines()[:count]
    result = analyze(
        model,
        [json.loads(line) for line in lines],
        output_dir=cfg["output"] / "analysis" / arm,
        seed=cfg["recipe"].get("upft", {}).get("seed", 42),
        backend=backend(cfg),
        **settings,
    )
    write_json(target, result)
    shutil.copyfile(cfg["output"] / "analysis" / arm / "analysis.png", target.with_suffix(".png"))


def merged_model(cfg: dict, adapter: Path) -> str:
    """The base model with ``adapter`` merged, saved once (analyze samples from a plain model folder)."""
    folder = adapter.parent / "merged"
    if not (folder / "config.json").exists():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(cfg["model"])
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(folder)
        AutoTokenizer.from_pretrained(cfg["model"]).save_pretrained(folder)
        for extra in ("generation_config.json",):
            if (Path(cfg["model"]) / extra).exists():
                shutil.copyfile(Path(cfg["model"]) / extra, folder / extra)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--stage", choices=("all",) + STAGES, default="all")
    args = parser.parse_args()
    cfg = load(args.config)
    todo = STAGES if args.stage == "all" else (args.stage,)
    if "data" in todo:
        stage_data(cfg)
    if "analyze" in todo:
        stage_analyze(cfg, "base", lambda: str(cfg["model"]))
    best = read_json(cfg["results"] / "tune.json", {}).get("best")
    if "tune" in todo:
        best = stage_tune(cfg)
    if "arms" in todo:
        if best is None:
            raise SystemExit("no tuned UPFT setting yet: run --stage tune first")
        stage_arms(cfg, best)
    if "report" in todo:
        compare_report.report(cfg["results"], cfg)


if __name__ == "__main__":
    main()
