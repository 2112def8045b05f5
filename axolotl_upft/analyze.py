"""Prefix self-consistency analysis (the paper's Fig. 2): how far sampled solutions share their start.

For each question the model draws N samples; for each prefix length L:
  coverage   share of the N samples whose first L tokens equal the most common L-token prefix
  distinct   number of different L-token prefixes among the N samples
both averaged over questions. With gold answers, also the prefix accuracy defined in `prefix_accuracy`.
The suggested k is the longest L before coverage first drops below a threshold (0.5: the top prefix
is still shared by most samples), clamped to the paper's 8..128.
"""

import io
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

from .args import SamplingConfig
from .cache import atomic_write_bytes, atomic_write_text, digest, ids_digest, model_fingerprint
from .distributed import Distributed
from .generation import call_sizes, engine_length, load_sampler, resolve_sampling
from .grading import gold_answer, is_correct
from .logs import get_logger
from .loop import Prompt, generate_all, longest, widest
from .prompts import QUESTION_FIELDS, ChatFormat, pad_token_id, question_text
from .selfsample import (
    context_key,
    engine_cache,
    read_generation_config,
    report_context_cut,
    sampling_options,
    sampling_settings,
    stop_ids,
)
from .trained import TrainedModel

LOG = get_logger(__name__)
K_BOUNDS = (8, 128)
KIND = "sample"


def prefix_coverage(trajectories: list[list[int]], length: int) -> tuple[float, int]:
    """(share of trajectories that start with the most common ``length``-token prefix, distinct prefixes).

    A trajectory shorter than ``length`` is its own whole prefix.
    """
    counts = Counter(tuple(ids[:length]) for ids in trajectories)
    return max(counts.values()) / len(trajectories), len(counts)


def prefix_accuracy(
    trajectories: list[list[int]], correct: list[bool], length: int
) -> tuple[float, float] | None:
    """Fig. 2b for one question: (from correct, from incorrect) prefix accuracy, or None unless both occur.

    A trajectory's prefix accuracy is the share of correct trajectories among all that share its
    ``length``-token prefix, itself included. "From correct" averages it over the correct trajectories,
    "from incorrect" over the incorrect ones. When every prefix is shared by all (short L) both equal the
    question's accuracy; when every prefix is unique (long L) they are 1 and 0. A gap that stays small
    over the first L tokens means those tokens do not yet decide the outcome (errors come later).
    """
    if all(correct) or not any(correct):
        return None
    groups = defaultdict(list)
    for ids, ok in zip(trajectories, correct):
        groups[tuple(ids[:length])].append(ok)
    share = {key: sum(oks) / len(oks) for key, oks in groups.items()}
    sides = [
        [share[tuple(ids[:length])] for ids, ok in zip(trajectories, correct) if ok == side]
        for side in (True, False)
    ]
    return mean(sides[0]), mean(sides[1])


def length_table(
    trajectories: list[list[list[int]]], correct: list[list[bool]] | None, lengths: list[int]
) -> list[dict]:
    """One row per prefix length: coverage and distinct prefixes (mean over questions), prefix accuracy
    (mean over the questions with both correct and incorrect samples; None when there are none)."""
    table = []
    for length in lengths:
        shares, distinct = zip(*(prefix_coverage(t, length) for t in trajectories))
        row = {"length": length, "coverage": mean(shares), "distinct": mean(distinct)}
        if correct is not None:
            pairs = [p for p in (prefix_accuracy(t, c, length) for t, c in zip(trajectories, correct)) if p]
            row["from_correct"] = mean(p[0] for p in pairs) if pairs else None
            row["from_incorrect"] = mean(p[1] for p in pairs) if pairs else None
        table.append(row)
    return table


def suggest_k(
    coverage: dict[int, float], threshold: float = 0.5, bounds: tuple[int, int] = K_BOUNDS
) -> tuple[int, str]:
    """The longest length before coverage first drops below ``threshold``, clamped to ``bounds``; and why.

    Coverage is the chance that one random sample starts with the top prefix. UPFT tunes on one sample
    per question, so at coverage >= 0.5 that sample's first k tokens are more likely than not the
    model's consensus start; past it, more likely an idiosyncratic one.
    """
    ordered = sorted(coverage)
    kept = []
    for length in ordered:
        if coverage[length] < threshold:
            break
        kept.append(length)
    if kept:
        length = kept[-1]
        shared = f"{coverage[length]:.0%} of samples (>= {threshold:.0%})"
        reason = f"the top {length}-token prefix is shared by {shared}"
        after = ordered[len(kept)] if len(kept) < len(ordered) else None
        reason += (
            f"; at {after} tokens it drops to {coverage[after]:.0%}"
            if after
            else "; the longest length tried"
        )
    else:
        length = ordered[0]
        reason = (
            f"even the top {length}-token prefix is shared by only {coverage[length]:.0%} of samples "
            f"(< {threshold:.0%}); the shortest length tried"
        )
    k = min(max(length, bounds[0]), bounds[1])
    if k != length:
        reason += f"; clamped to {k}, the paper's range being {bounds[0]}..{bounds[1]}"
    return k, reason


def _check_args(samples, lengths, max_new_tokens, temperature, threshold, batch_size, questions) -> list[int]:
    if not questions:
        raise ValueError(
            f"questions is empty; pass rows with a question ({', '.join(QUESTION_FIELDS)} or messages)"
        )
    if samples < 2:
        raise ValueError(
            f"samples must be >= 2 to compare prefixes, got {samples}; the paper's figure uses 32"
        )
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(
            f"lengths must be positive token counts, got {list(lengths)!r}; e.g. 4,8,16,32,64,128"
        )
    if max_new_tokens < max(lengths):
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= the longest length ({max(lengths)})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}): greedy samples are all the same")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (vLLM: no cap), got {batch_size}")
    return sorted(set(lengths))


def analyze(
    model_path: str,
    questions: list[dict],
    *,
    samples: int = 32,
    lengths=(4, 8, 16, 32, 64, 128),
    max_new_tokens: int = 512,
    temperature: float = 0.6,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 42,
    output_dir: str | Path,
    system_prompt: str | None = None,
    batch_size: int | None = 32,
    threshold: float = 0.5,
    answer_field: str = "answer",
    chat: ChatFormat | None = None,
    sampling: SamplingConfig | None = None,
    backend: str | None = None,
) -> dict:
    """Sample ``samples`` solutions per question, tabulate prefix coverage (and accuracy when every row has
    ``answer_field``), write analysis.json and analysis.png to ``output_dir``, and suggest k.

    ``top_p``/``top_k`` of None take the model's generation config, as the UPFT sampler does.
    ``chat`` defaults to the model's own tokenizer and template; pass the training config's
    (`config_chat_format`) to sample with the prompts the rows are built from.
    The sampler is ``sampling``'s (a training config's upft.sampling, else the defaults) with the
    arguments above and ``backend`` (where given) in place of its own. ``batch_size`` caps a part's
    requests (the hf loop decodes that many rows at a time); None: no cap, for vLLM.
    """
    lengths = _check_args(samples, lengths, max_new_tokens, temperature, threshold, batch_size, questions)
    started = time.perf_counter()
    texts = [question_text(row, i) for i, row in enumerate(questions)]
    golds = gold_answers(questions, answer_field)
    chat = chat or model_chat_format(model_path)
    updates = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens}
    updates |= {"backend": backend} if backend is not None else {}
    sampling = (sampling or SamplingConfig()).model_copy(update=updates)
    sampling = resolve_sampling(sampling, TrainedModel(model_path))
    settings = sampling_settings(sampling, read_generation_config(model_path)) | {
        "seed": seed,
        "batch_size": batch_size,
    }
    out = Path(output_dir)
    trajectories = sample(model_path, chat, texts, samples, settings, system_prompt, out, sampling)
    correct = grade(chat.tokenizer, trajectories, golds)
    result = {
        "model": model_path,
        "questions": len(questions),
        "samples": samples,
        "sampling": settings,
        "system_prompt": system_prompt,
        "threshold": threshold,
        **tabulate(trajectories, correct, lengths, threshold),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=2))
    plot(result, out / "analysis.png")
    LOG.info("UPFT analyze: suggested prefix_length %d (%s)", result["suggested_k"], result["reason"])
    return result


def model_chat_format(model_path: str) -> ChatFormat:
    from transformers import AutoTokenizer

    return ChatFormat.own(AutoTokenizer.from_pretrained(model_path))


def grade(tokenizer, trajectories, golds: list[str] | None) -> list[list[bool]] | None:
    """Whether each trajectory reaches its question's gold answer; None without gold answers."""
    if golds is None:
        return None
    return [[is_correct(tokenizer, ids, gold) for ids in runs] for runs, gold in zip(trajectories, golds)]


def gold_answers(questions: list[dict], answer_field: str) -> list[str] | None:
    """Every row's gold answer, or None (no prefix accuracy) unless every row has one."""
    if all(row.get(answer_field) not in (None, "") for row in questions):
        return [gold_answer(row, field=answer_field) for row in questions]
    LOG.info("UPFT analyze: not every row has %r, so prefix accuracy is skipped", answer_field)
    return None


def tabulate(trajectories, correct: list[list[bool]] | None, lengths: list[int], threshold: float) -> dict:
    """The length table, the suggested k and per-question coverage of sampled trajectories."""
    table = length_table(trajectories, correct, lengths)
    k, reason = suggest_k({row["length"]: row["coverage"] for row in table}, threshold)
    return {
        "table": table,
        "suggested_k": k,
        "reason": reason,
        "mean_tokens": mean(len(ids) for runs in trajectories for ids in runs),
        "sample_accuracy": mean(ok for oks in correct for ok in oks) if correct else None,
        "mixed_questions": sum(0 < sum(oks) < len(oks) for oks in correct) if correct else None,
        "per_question": [
            {
                "index": i,
                "coverage": [prefix_coverage(runs, n)[0] for n in lengths],
                "accuracy": mean(correct[i]) if correct else None,
            }
            for i, runs in enumerate(trajectories)
        ],
    }


def sample(
    model_path, chat: ChatFormat, texts, samples, settings, system_prompt, out: Path, sampling: SamplingConfig
) -> list[list[list[int]]]:
    """``samples`` trajectories (generated ids) per question; request q * samples + j is draw j of question q.
    The draws are kept under ``out``/parts, so a killed analysis resumes."""
    tokenizer = chat.tokenizer
    chat.check(system_prompt)
    prompts = [chat.prompt_ids(text, system_prompt) for text in texts]
    requests = [
        Prompt(q * samples + j, prompt, KIND) for q, prompt in enumerate(prompts) for j in range(samples)
    ]
    stops = stop_ids(tokenizer, read_generation_config(model_path), chat.end_ids)
    meta = {
        "task": "analyze",
        "model": model_fingerprint(model_path),
        "chat": chat.key(),
        "sampling": settings,
        "stop_ids": sorted(stops),
        "requests": digest([ids_digest(r.prompt_ids) for r in requests]),
        **context_key(sampling),
    }
    cache = engine_cache(out / "parts", meta, sampling)
    cache.open()
    limits = {KIND: settings["max_new_tokens"]}
    model = TrainedModel(model_path)
    length = engine_length(sampling, model, widest(requests), longest(requests, limits))
    generated = generate_all(
        requests,
        cache,
        lambda: load_sampler(model, sampling, length),
        sizes=call_sizes({KIND: settings["batch_size"]}, sampling.backend, "dynamic"),
        limits=limits,
        options=sampling_options(settings, stops, pad_token_id(tokenizer)),
        seed=settings["seed"],
        dist=Distributed(),
        desc="UPFT prefix analysis",
    )
    report_context_cut(requests, generated.records, length)
    return [[generated.records[q * samples + j].ids for j in range(samples)] for q in range(len(texts))]


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("prefix length (tokens)")


def plot(result: dict, path: Path) -> None:
    """Coverage (and distinct prefixes) vs prefix length; prefix accuracy beside it when graded."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    table = result["table"]
    lengths = [row["length"] for row in table]
    graded = result["sample_accuracy"] is not None and any(row["from_correct"] is not None for row in table)
    fig = Figure(figsize=(11 if graded else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if graded else 1, squeeze=False)[0]
    ax = axes[0]
    ax.plot(lengths, [row["coverage"] for row in table], "o-", label="top-prefix coverage")
    ax.axhline(result["threshold"], color="grey", ls=":", label=f"threshold {result['threshold']:g}")
    ax.axvline(
        result["suggested_k"], color="tab:red", ls="--", label=f"suggested k = {result['suggested_k']}"
    )
    _length_axis(ax, lengths)
    ax.set(
        ylabel="coverage",
        ylim=(0, 1.05),
        title=f"(a) prefix coverage, {result['samples']} samples x {result['questions']} questions",
    )
    twin = ax.twinx()
    twin.plot(lengths, [row["distinct"] for row in table], "s--", color="tab:green", alpha=0.6)
    twin.set_ylabel("distinct prefixes", color="tab:green")
    ax.legend(loc="lower left", fontsize=8)
    if graded:
        rows = [row for row in table if row["from_correct"] is not None]
        ax = axes[1]
        ax.plot(
            [r["length"] for r in rows], [r["from_correct"] for r in rows], "o-", label="prefix from correct"
        )
        ax.plot(
            [r["length"] for r in rows],
            [r["from_incorrect"] for r in rows],
            "o-",
            label="prefix from incorrect",
        )
        _length_axis(ax, lengths)
        ax.set(
            ylabel="accuracy of samples sharing it",
            ylim=(-0.05, 1.05),
            title=f"(b) prefix accuracy, {result['mixed_questions']} mixed questions",
        )
        ax.legend(loc="best", fontsize=8)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    atomic_write_bytes(path, png.getvalue())
