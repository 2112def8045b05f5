"""The comparison's table and plots from the files bench/compare.py leaves under `results:`.

    python bench/compare_report.py results/compare
    # -> report.json, report.md, accuracy_vs_tokens.png, coverage.png

Per arm, on test: strict and flexible accuracy with a 95% Wilson interval, the paired difference from
base with an exact McNemar p-value, no-answer rates, mean response tokens, tokens sampled and trained,
and wall times.
"""

import json
import sys
from pathlib import Path

from axolotl_upft.stats import paired, wilson

ARMS = ("base", "upft", "sft", "rft", "upft_label_filter")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy(rows: list[dict], key: str) -> dict:
    correct = sum(bool(r[key]) for r in rows)
    low, high = wilson(correct, len(rows))
    return {
        "correct": correct,
        "accuracy": round(100 * correct / len(rows), 2),
        "wilson95": [round(100 * low, 2), round(100 * high, 2)],
    }


def training_info(results: Path, run: str | None) -> dict:
    saved = json.loads((results / "runs" / f"{run}.json").read_text()) if run else {}
    info, losses = saved.get("report", {}), [step["loss"] for step in saved.get("losses", [])]
    sampling = info.get("sampling") or {}
    return {
        "train_loss": {"first": losses[0], "last": losses[-1], "steps": len(losses)} if losses else None,
        "tokens_sampled": sampling.get("tokens_generated", 0),
        "tokens_trained": info.get("tokens_trained", 0),
        "rows_trained": info.get("rows", 0),
        "samples_per_question": sampling.get("samples_per_question"),
        "sampling_s": sampling.get("wall_seconds_this_run"),
    }


def arm_entry(results: Path, arm: str, run: str | None, base_rows: list[dict], timings: dict) -> dict | None:
    path = results / "rows" / f"{arm}.test.jsonl"
    if not path.exists():
        return None
    rows = read_rows(path)
    n = len(rows)
    entry = {
        "arm": arm,
        "run": run,
        "n": n,
        "strict": accuracy(rows, "correct"),
        "flexible": accuracy(rows, "correct_flexible"),
        "no_answer_strict_pct": round(100 * sum(r["answer"] is None for r in rows) / n, 2),
        "no_answer_flexible_pct": round(100 * sum(r["answer_flexible"] is None for r in rows) / n, 2),
        "mean_response_tokens": round(sum(r["tokens"] for r in rows) / n, 1),
        **training_info(results, run),
    }
    if arm != "base" and base_rows:
        for key, field in (("strict", "correct"), ("flexible", "correct_flexible")):
            entry[key]["vs_base"] = paired([r[field] for r in base_rows], [r[field] for r in rows])
    mine = timings.get(run or arm, {})
    # Arms that share a set of draws show the same sampling time: the draws were made once, by the first.
    entry["wall_s"] = {
        "sample": entry.pop("sampling_s"),
        "preprocess": mine.get("preprocess_s"),
        "train": mine.get("train_s"),
        "eval_test": timings.get(arm, {}).get("eval_test_s"),
    }
    return entry


def table_md(entries: list[dict]) -> str:
    head = (
        "| arm | flexible acc. % [95% CI] | vs base (pp, McNemar p) | strict acc. % "
        "| no answer % (strict/flex.) | mean tokens | tokens sampled | tokens trained "
        "| wall s (sample / preprocess / train / eval) |"
    )
    lines = [head, "|" + "---|" * 9]
    for e in entries:
        flex, strict = e["flexible"], e["strict"]
        vs = flex.get("vs_base")
        versus = f"{vs['difference_pp']:+.2f} (p={vs['mcnemar_p']:.3g})" if vs else "-"
        wall = " / ".join("-" if v is None else f"{v:.0f}" for v in e["wall_s"].values())
        low, high = flex["wilson95"]
        no_answer = f"{e['no_answer_strict_pct']:.1f} / {e['no_answer_flexible_pct']:.1f}"
        tokens = f"{e['mean_response_tokens']:.1f} | {e['tokens_sampled']:,} | {e['tokens_trained']:,}"
        lines.append(
            f"| {e['arm']} | {flex['accuracy']:.2f} [{low:.1f}, {high:.1f}] | {versus} "
            f"| {strict['accuracy']:.2f} | {no_answer} | {tokens} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def save(fig, ax, path: Path) -> None:
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_accuracy(entries: list[dict], path: Path) -> None:
    fig, ax = figure()
    for e in entries:
        flex = e["flexible"]
        err = [[flex["accuracy"] - flex["wilson95"][0]], [flex["wilson95"][1] - flex["accuracy"]]]
        ax.errorbar([e["tokens_sampled"]], [flex["accuracy"]], yerr=err, fmt="o", capsize=3, label=e["arm"])
    ax.set_xscale("symlog", linthresh=1000)
    ax.set_xlabel("tokens sampled for training")
    ax.set_ylabel("test accuracy, flexible (%)")
    save(fig, ax, path)


def plot_coverage(analyses: dict[str, dict], path: Path) -> None:
    fig, ax = figure()
    for arm, result in analyses.items():
        table = result["table"]
        ax.plot([r["length"] for r in table], [r["coverage"] for r in table], marker="o", label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefix length (tokens)")
    ax.set_ylabel("prefix coverage")
    save(fig, ax, path)


def plot_losses(losses: dict[str, list[dict]], path: Path) -> None:
    fig, ax = figure()
    for run, steps in losses.items():
        ax.plot([s["epoch"] for s in steps], [s["loss"] for s in steps], label=run)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (logged steps)")
    save(fig, ax, path)


def examples_md(results: Path, arms: list[str], count: int = 5, width: int = 160) -> str:
    """The first ``count`` test questions (by index, not picked) and each arm's response, cut at ``width``."""
    rows = {arm: read_rows(results / "rows" / f"{arm}.test.jsonl") for arm in arms}
    lines = ["", f"First {count} test questions, each arm's greedy response (first {width} characters):", ""]
    for i in range(min(count, *(len(r) for r in rows.values()))):
        lines.append(f"- `{rows[arms[0]][i]['question']}` (gold {rows[arms[0]][i]['gold']})")
        for arm in arms:
            row = rows[arm][i]
            text = row["prediction"][:width].replace("\n", " ").replace("|", "\\|")
            lines.append(f"  - {arm} ({'right' if row['correct_flexible'] else 'wrong'}): {text}")
    return "\n".join(lines) + "\n"


def report(results: Path, cfg: dict | None = None) -> dict:
    timings = (
        json.loads((results / "timings.json").read_text()) if (results / "timings.json").exists() else {}
    )
    tune = json.loads((results / "tune.json").read_text()) if (results / "tune.json").exists() else {}
    best = (tune.get("best") or {}).get("arm")
    runs = {"base": None, "upft": best, "sft": "sft", "rft": "rft", "upft_label_filter": "upft_label_filter"}
    base_path = results / "rows" / "base.test.jsonl"
    base_rows = read_rows(base_path) if base_path.exists() else []
    entries = [e for arm in ARMS if (e := arm_entry(results, arm, runs[arm], base_rows, timings))]
    analyses = {p.stem: json.loads(p.read_text()) for p in sorted((results / "analysis").glob("*.json"))}
    skipped = {
        arm: run["skipped"]
        for arm in ARMS
        if (path := results / "runs" / f"{runs[arm]}.json").exists()
        and "skipped" in (run := json.loads(path.read_text()))
    }
    out = {
        "task": (cfg or {}).get("task"),
        "arms": entries,
        "skipped": skipped,
        "tune": tune,
        "coverage": {arm: a["table"] for arm, a in analyses.items()},
    }
    (results / "report.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    if entries:
        shown = [e["arm"] for e in entries if e["arm"] in ("base", "upft")]
        (results / "report.md").write_text(table_md(entries) + (examples_md(results, shown) if shown else ""))
        plot_accuracy(entries, results / "accuracy_vs_tokens.png")
    saved = {p.stem: json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))}
    losses = {run: info["losses"] for run, info in saved.items() if info.get("losses")}
    if losses:
        plot_losses(losses, results / "losses.png")
    if analyses:
        plot_coverage(analyses, results / "coverage.png")
    return out


if __name__ == "__main__":
    report(Path(sys.argv[1]))
