"""The GPU check's cases: example configs on a given model, one `axolotl train` and one GPU_CHECK line each.

  python scripts/gpu_check/cases.py --model M --work W lora qlora zero2 zero3
  python scripts/gpu_check/cases.py --model M --work W --cpu lora      # dry run: no bf16, no LoRA kernels

Each case keeps its example config (optimizer, schedule, packing, batch, gradient checkpointing, DeepSpeed
JSON) and swaps the model, the questions, the lengths and the step count. `tokens/s` is Axolotl's
tokens/train_per_sec_per_gpu (trained tokens, median over steps); `all_tokens/s` counts padded input tokens.
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from training import run_axolotl, train_metrics, write_questions

EXAMPLES = ROOT / "example_configs"
CASES = {
    "lora": ("qwen2.5-math-7b-zero2-lora-k32.yml", {"deepspeed": None}),  # LoRA bf16, no DeepSpeed
    "qlora": ("llama3.1-8b-qlora-k8.yml", {}),  # QLoRA 4-bit (bitsandbytes nf4)
    "zero2": ("qwen2.5-math-7b-zero2-lora-k32.yml", {}),  # LoRA under ZeRO-2
    "zero3": ("qwen2.5-math-7b-zero3-k32.yml", {}),  # full fine-tune under ZeRO-3, samples inside `train`
}
GPU = {"sequence_len": 1024, "max_steps": 8, "questions": 128, "max_new_tokens": 128, "batch_size": 128}
CPU = {"sequence_len": 512, "max_steps": 2, "questions": 16, "max_new_tokens": 48, "batch_size": 16}


def render(case: str, model: Path, work: Path, cpu: bool) -> Path:
    """The case's example config with the model, local questions, short lengths and steps swapped in."""
    source, changes = CASES[case]
    size = CPU if cpu else GPU
    cfg = yaml.safe_load((EXAMPLES / source).read_text())
    # zero3 samples on its own inside `axolotl train` under ZeRO-3; the others share one sample cache
    cache = work / ("samples-zero3" if case == "zero3" else "samples")
    cfg["upft"] |= {"cache_dir": str(cache)}
    # The cases measure training; they sample with the hf loop, as the GPU machine (no vLLM wheel) must, and
    # the CPU dry run's 16-wide attention heads are a size vLLM's CPU kernels refuse.
    cfg["upft"]["sampling"] = cfg["upft"].get("sampling", {}) | {
        "max_new_tokens": size["max_new_tokens"],
        "batch_size": size["batch_size"],
        "backend": "hf",
    }
    cfg |= {
        "base_model": str(model),
        "datasets": [{"path": str(work / "questions.jsonl"), "type": "upft"}],
        "dataset_prepared_path": str(work / case / "prepared"),
        "output_dir": str(work / case / "out"),
        "sequence_len": size["sequence_len"],
        "max_steps": size["max_steps"],
        "save_strategy": "no",
        "logging_steps": 1,
        "dataset_num_proc": 1 if cpu else 4,
    } | changes
    if cfg.get("deepspeed"):
        cfg["deepspeed"] = str(ROOT / cfg["deepspeed"])
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if cpu:
        cfg |= {
            "bf16": False,
            "fp16": False,
            "lora_mlp_kernel": False,
            "lora_qkv_kernel": False,
            "lora_o_kernel": False,
            "optimizer": "adamw_torch",
        }
    (work / case).mkdir(parents=True, exist_ok=True)
    path = work / case / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def verdict(case: str, rc: int, log: str, out: Path) -> tuple[bool, str, dict]:
    metrics = train_metrics(log)
    if rc != 0:
        return False, f"axolotl train exited {rc}", metrics
    if not metrics or not math.isfinite(metrics["train_loss"]):
        return False, "no finite train_loss in the log", metrics
    if "upft/prefix_loss" not in metrics:
        return False, "no upft/prefix_loss logged: the plugin's trainer did not run", metrics
    if not list(out.glob("*.safetensors")):
        return False, f"nothing saved in {out}", metrics
    return True, "", metrics


def run(case: str, model: Path, work: Path, cpu: bool, timeout: int, logs: Path | None) -> bool:
    config = render(case, model, work, cpu)
    log_path = work / case / "train.log"
    rc = run_axolotl("train", config, log_path, timeout)
    log = log_path.read_text(errors="replace")
    ok, why, m = verdict(case, rc, log, work / case / "out")
    if logs is not None:
        shutil.copy(log_path, logs / f"{case}.train.log")
    all_rate = round(m["padded_tokens"] / m["train_runtime_s"], 1) if m.get("train_runtime_s") else None
    print(
        f"GPU_CHECK {case}: {'PASS' if ok else 'FAIL'} tokens/s={m.get('axolotl_trained_tokens_per_s')} "
        f"peak_mem_gib={m.get('peak_mem_gib')} all_tokens/s={all_rate} runtime_s={m.get('train_runtime_s')} "
        f"steps={m.get('steps')} loss={m.get('train_loss')}" + (f" ({why})" if why else ""),
        flush=True,
    )
    if not ok:
        print(f"---- last lines of {log_path}:\n{log[-2500:]}", flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cases", nargs="+", choices=list(CASES))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="bf16 and LoRA kernels off, 2 steps, 16 questions")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per `axolotl train`")
    parser.add_argument("--logs", type=Path, default=None, help="copy each case's train log here")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    write_questions(
        args.work / "questions.jsonl",
        EXAMPLES / "data" / "gsm8k_train_128.jsonl",
        (CPU if args.cpu else GPU)["questions"],
    )
    results = {
        case: run(case, args.model, args.work, args.cpu, args.timeout, args.logs) for case in args.cases
    }
    print(json.dumps({"gpu_check": {c: "PASS" if ok else "FAIL" for c, ok in results.items()}}))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
