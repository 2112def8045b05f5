"""Training cost of UPFT rows per layout, vs self-SFT, and the plugin's overhead, from real `axolotl train`
runs. Prints JSON.

  python bench/training.py                             # CPU: the tiny model of tests/tiny.py, 64 questions
  python bench/training.py --model /path/to/Qwen2.5-0.5B --questions 128 --max-new-tokens 512 \
      --sequence-len 4096 --micro-batch-size 1         # GPU (bf16 when CUDA is there)

Same questions, same model, one epoch each (train_runtime is the time per epoch):
(a) upft_packed: UPFT rows with sample packing; (b) upft_unpacked_mb1: the same rows one per micro-batch (the
reference layout); (c) self_sft_packed: one full self-trace per question (structure_ratio 1), packed;
(d) plain_sft_packed: (a)'s prepared rows as a pre-tokenized dataset, no plugin: (a) vs (d) is the plugin's
overhead (its trainer and loss; the rows are identical). Sampling happens once, before the timed epochs.
"""

import argparse
import ast
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from axolotl_upft.rows import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "example_configs" / "data" / "gsm8k_train_128.jsonl"
LOG_DICT = re.compile(r"\{'(?:loss|train_runtime)'[^{}]*\}")


def run_axolotl(command: str, config: Path, log_path: Path, timeout: int = 1800) -> int:
    """`axolotl COMMAND config` with its output in log_path; returns the exit code (124 on timeout)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        env.setdefault(key, value)
    with open(log_path, "w") as handle:
        # own session: `axolotl train` relaunches itself through accelerate, so a timeout ends the group
        proc = subprocess.Popen(
            [sys.executable, "-m", "axolotl.cli.main", command, str(config)],
            cwd=config.parent,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return 124


def logged_dicts(log: str) -> list[dict]:
    """The metric dicts the HF trainer prints per logging step and at the end (tqdm shares their lines)."""
    logged = []
    for match in LOG_DICT.findall(log):
        try:
            logged.append(ast.literal_eval(match))
        except (ValueError, SyntaxError):  # a bare nan/inf value: not a literal
            logged.append(ast.literal_eval(re.sub(r"(?<=: )(-?inf|nan)\b", r"'\1'", match)))
    return logged


def train_metrics(log: str) -> dict:
    """What the HF/Axolotl trainer logged: per-step dicts and the final summary, as numbers."""
    logged = logged_dicts(log)
    steps = [d for d in logged if "loss" in d]
    finals = [d for d in logged if "train_runtime" in d]
    if not steps or not finals:
        return {}
    final, last = finals[-1], steps[-1]
    rates = [float(d["tokens/train_per_sec_per_gpu"]) for d in steps if "tokens/train_per_sec_per_gpu" in d]
    memory = [float(d["memory/max_allocated (GiB)"]) for d in logged if "memory/max_allocated (GiB)" in d]
    metrics = {
        "train_runtime_s": float(final["train_runtime"]),
        "train_loss": float(final["train_loss"]),
        "steps": len(steps),
        "padded_tokens": int(last.get("tokens/total", 0)),
        "trained_tokens": int(last.get("tokens/trainable", 0)),
        # Axolotl's own rate counts trained (label != -100) tokens per second, per logging interval
        "axolotl_trained_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
        "peak_mem_gib": max(memory) if memory else None,
    }
    for key in ("upft/prefix_loss", "upft/full_loss"):
        values = [float(d[key]) for d in steps if key in d]
        if values:
            metrics[key] = round(values[-1], 4)
    return metrics


def prepared_dir(prepared_path: Path) -> Path:
    (path,) = [p for p in prepared_path.iterdir() if p.is_dir() and p.name != "upft_samples"]
    return path


def row_stats(prepared: Path) -> dict:
    from datasets import load_from_disk

    rows = load_from_disk(str(prepared))
    return {
        "rows": len(rows),
        "real_tokens": sum(len(ids) for ids in rows["input_ids"]),
        "row_trained_tokens": sum(sum(t != IGNORE_INDEX for t in labels) for labels in rows["labels"]),
    }


def write_questions(path: Path, source: Path, n: int) -> list[str]:
    with open(source) as handle:
        texts = [json.loads(line)["question"] for _, line in zip(range(n), handle)]
    if len(texts) < n:
        raise ValueError(f"{source} has {len(texts)} questions, fewer than --questions {n}")
    path.write_text("".join(json.dumps({"question": t}) + "\n" for t in texts))
    return texts


def tiny_model(out: Path, texts: list[str], hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    from axolotl_upft.args import REFERENCE_INSTRUCTION

    return tiny.build_model(out, texts + [REFERENCE_INSTRUCTION], hidden=hidden, layers=layers)


def base_config(args, model: Path, bf16: bool) -> dict:
    cfg = {
        "base_model": str(model),
        "sequence_len": args.sequence_len,
        "micro_batch_size": args.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 42,
        "bf16": bf16,
        "fp16": False,
        "dataset_num_proc": 1,
    }
    if args.adapter == "lora":
        cfg |= {
            "adapter": "lora",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "lora_target_linear": True,
        }
    if not bf16:
        cfg |= {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
    return cfg


def upft_block(args, work: Path, structure_ratio: float) -> dict:
    return {
        "plugins": ["axolotl_upft.UPFTPlugin"],
        "upft": {
            "prefix_length": args.k,
            "structure_ratio": structure_ratio,
            "sampling": {"max_new_tokens": args.max_new_tokens, "batch_size": args.sampling_batch_size},
            "cache_dir": str(work / "samples"),
        },
        "datasets": [{"path": str(work / "questions.jsonl"), "type": "upft"}],
    }


def run_case(name: str, cfg: dict, work: Path, timeout: int) -> dict:
    case = work / name
    case.mkdir(parents=True, exist_ok=True)
    cfg = cfg | {"dataset_prepared_path": str(case / "prepared"), "output_dir": str(case / "out")}
    config = case / "cfg.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log_path = case / "train.log"
    rc = run_axolotl("train", config, log_path, timeout)
    log = log_path.read_text()
    if rc != 0 or "train_runtime" not in log:
        raise RuntimeError(f"{name}: axolotl train exited {rc}; log {log_path}:\n{log[-3000:]}")
    result = train_metrics(log) | row_stats(prepared_dir(case / "prepared"))
    runtime = result["train_runtime_s"]
    result["tokens_per_s"] = round(result["real_tokens"] / runtime, 1)
    result["trained_tokens_per_s"] = round(result["row_trained_tokens"] / runtime, 1)
    if result["padded_tokens"]:
        result["packing_efficiency"] = round(result["real_tokens"] / result["padded_tokens"], 4)
    return result


def plain_rows(prepared: Path, path: Path) -> None:
    """(a)'s rows as a pre-tokenized jsonl (input_ids, attention_mask, labels): Axolotl trains it as is."""
    from datasets import load_from_disk

    rows = load_from_disk(str(prepared))
    with open(path, "w") as handle:
        handle.writelines(
            json.dumps({"input_ids": ids, "attention_mask": mask, "labels": labels}) + "\n"
            for ids, mask, labels in zip(rows["input_ids"], rows["attention_mask"], rows["labels"])
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="HF model folder (default: tests/tiny.py's model)"
    )
    parser.add_argument("--data", type=Path, default=QUESTIONS, help="jsonl with a `question` per line")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="full-trace length limit")
    parser.add_argument("--sequence-len", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2, help="of the packed runs; (b) uses 1")
    parser.add_argument("--sampling-batch-size", type=int, default=16)
    parser.add_argument("--adapter", choices=["lora", "none"], default="lora")
    parser.add_argument("--work", type=Path, default=None, help="run folder (default: a new temp folder)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per axolotl run")
    parser.add_argument("--tiny-hidden", type=int, default=32, help="hidden size of the default tiny model")
    parser.add_argument("--tiny-layers", type=int, default=2, help="layers of the default tiny model")
    args = parser.parse_args(argv)

    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="upft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    texts = write_questions(work / "questions.jsonl", args.data, args.questions)
    model = args.model or tiny_model(work / "tiny-model", texts, args.tiny_hidden, args.tiny_layers)
    bf16 = torch.cuda.is_available()
    base = base_config(args, model, bf16)

    cases = {
        "upft_packed": base | upft_block(args, work, args.p) | {"sample_packing": True},
        "upft_unpacked_mb1": base
        | upft_block(args, work, args.p)
        | {"sample_packing": False, "micro_batch_size": 1},
        "self_sft_packed": base | upft_block(args, work, 1.0) | {"sample_packing": True},
    }
    results = {name: run_case(name, cfg, work, args.timeout) for name, cfg in cases.items()}
    plain_rows(prepared_dir(work / "upft_packed" / "prepared"), work / "plain_rows.jsonl")
    plain = base | {
        "sample_packing": True,
        "datasets": [{"path": str(work / "plain_rows.jsonl"), "ds_type": "json"}],
    }
    results["plain_sft_packed"] = run_case("plain_sft_packed", plain, work, args.timeout)

    a, b, c, d = (
        results[n] for n in ("upft_packed", "upft_unpacked_mb1", "self_sft_packed", "plain_sft_packed")
    )
    report = {
        "device": torch.cuda.get_device_name(0) if bf16 else "cpu",
        "model": str(model),
        "questions": args.questions,
        "k": args.k,
        "p": args.p,
        "max_new_tokens": args.max_new_tokens,
        "sequence_len": args.sequence_len,
        "micro_batch_size": args.micro_batch_size,
        "adapter": args.adapter,
        "bf16": bf16,
        "work": str(work),
        "cases": results,
        "comparisons": {
            "packed_vs_unpacked_epoch_speedup": round(b["train_runtime_s"] / a["train_runtime_s"], 3),
            "self_sft_vs_upft_epoch_time": round(c["train_runtime_s"] / a["train_runtime_s"], 3),
            "self_sft_vs_upft_real_tokens": round(c["real_tokens"] / a["real_tokens"], 3),
            "plugin_vs_plain_epoch_time": round(a["train_runtime_s"] / d["train_runtime_s"], 3),
            "same_rows_and_batches_in_a_and_d": a["real_tokens"] == d["real_tokens"]
            and a["padded_tokens"] == d["padded_tokens"],
        },
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return report


if __name__ == "__main__":
    main()
