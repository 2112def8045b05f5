"""Base greedy accuracy and response length of a model on the validation split of each candidate task.

    python bench/choose_task.py --model models/SmolLM2-135M-Instruct --out runs/choose-task \
        --results results/task_choice.json [--tasks chain_sum_3,leg_counting_2] [--limit 200]

The task is chosen from this table alone, before any UPFT run: base flexible accuracy in 10-60%, then
the longest responses (UPFT's prefixes need steps to learn from). Reruns reuse the cached generations.
"""

import argparse
import json
import subprocess
from pathlib import Path

from axolotl_upft.benchmarks import TASKS
from axolotl_upft.evaluate import arm_name


def measure(model: str, task: str, out: Path, limit: int, max_new_tokens: int, batch_size: int) -> dict:
    name = f"{task}-validation"
    subprocess.run(
        [
            "axolotl-upft",
            "eval",
            "--model",
            model,
            "--benchmark",
            name,
            "--limit",
            str(limit),
            "--output",
            str(out),
            "--max-new-tokens",
            str(max_new_tokens),
            "--batch-size",
            str(batch_size),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    summary = json.loads((out / arm_name(model, None) / f"{name}.summary.json").read_text())
    keys = (
        "n",
        "accuracy",
        "accuracy_flexible",
        "no_answer",
        "no_answer_flexible",
        "mean_tokens",
        "truncated",
        "wall_seconds",
    )
    return {
        "task": task,
        "reasoning_gym": TASKS[task].dataset,
        "settings": TASKS[task].config,
        **{k: summary[k] for k in keys},
    }


def choose(rows: list[dict], low: float = 10, high: float = 60) -> str | None:
    """The candidate with base flexible accuracy in [low, high] and the longest mean response."""
    fitting = [r for r in rows if low <= r["accuracy_flexible"] <= high]
    return max(fitting, key=lambda r: r["mean_tokens"])["task"] if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    rows, tasks = [], args.tasks.split(",")
    for task in tasks:
        rows.append(measure(args.model, task, args.out, args.limit, args.max_new_tokens, args.batch_size))
        result = {
            "model": args.model,
            "limit": args.limit,
            "max_new_tokens": args.max_new_tokens,
            "rule": "base flexible accuracy in 10-60%, then the longest mean response",
            "candidates": rows,
            "complete": len(rows) == len(tasks),
            "chosen": choose(rows) if len(rows) == len(tasks) else None,
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2, default=list) + "\n")
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
