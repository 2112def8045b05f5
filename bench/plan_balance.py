"""How evenly the generation loop shares sampling between ranks. Prints JSON.

Default: the planner alone (no model). GSM8K's 7,473 train questions at p = 0.1, prefixes of 32 tokens and
full traces of at most 1,024 (the reference recipe), prompt lengths from the real questions; for 2, 4, 8,
16 and 64 ranks, the largest rank's share of the estimated decode cost (loop.cost) over the mean share,
next to the dealing this replaced (vLLM parts of 4,096 questions, part j to rank j mod N). No batch-size
cap: vLLM's default. Goal: at most 1.10.

--real: `axolotl-upft sample` on 4 torchrun ranks (gloo, CPU, hf loop, the tests' tiny model) over 200
questions at p = 0.25; each rank's generated tokens counted from the cache (SampleCache.tokens_by_rank).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from axolotl_upft.loop import PARTS_PER_RANK, PROMPT_WEIGHT, Prompt, cost, deal, plan_batches
from axolotl_upft.rows import FULL, PREFIX, question_kinds

DATA = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
if not DATA.exists():  # a checkout without the shared data: the repository's 128 questions, cycled
    DATA = ROOT / "example_configs" / "data" / "gsm8k_train_128.jsonl"
QUESTIONS, RATIO, SEED = 7473, 0.1, 42
LIMITS = {PREFIX: 32, FULL: 1024}
TEMPLATE_TOKENS = 30  # chat template and instruction around a question
OLD_PART = 4096  # the VLLM_BATCH on a GPU that sized parts before


def prompt_lengths(n: int) -> list[int]:
    """Token counts of the first n questions: about 4 characters a token, plus the template."""
    with open(DATA) as handle:
        texts = [json.loads(line)["question"] for line in handle]
    return [len(texts[i % len(texts)]) // 4 + TEMPLATE_TOKENS for i in range(n)]


def ratios(parts: list[list[Prompt]], owners: list[int], ranks: int) -> dict:
    """Largest rank's share over the mean, of the estimated cost and of each kind's questions."""
    load = [0.0] * ranks
    counts = {kind: [0] * ranks for kind in LIMITS}
    for part, w in zip(parts, owners):
        load[w] += cost(part, LIMITS)
        counts[part[0].kind][w] += len(part)
    out = {"cost_max_over_mean": round(max(load) / (sum(load) / ranks), 4)}
    for kind, values in counts.items():
        out[f"{kind}_max_over_mean"] = round(max(values) / (sum(values) / ranks), 4)
    return out


def old_dealing(requests: list[Prompt], ranks: int) -> tuple[list[list[Prompt]], list[int]]:
    parts = []
    for kind in LIMITS:
        group = [r for r in requests if r.kind == kind]
        parts += [group[i : i + OLD_PART] for i in range(0, len(group), OLD_PART)]
    return parts, [j % ranks for j in range(len(parts))]


def planner() -> dict:
    kinds = question_kinds(QUESTIONS, RATIO, SEED)
    requests = [Prompt(i, [0] * n, k) for i, (n, k) in enumerate(zip(prompt_lengths(QUESTIONS), kinds))]
    result = {
        "questions": QUESTIONS,
        "structure_ratio": RATIO,
        "prefixes": kinds.count(PREFIX),
        "full_traces": kinds.count(FULL),
        "limits": LIMITS,
        "parts_per_rank": PARTS_PER_RANK,
        "prompt_weight": PROMPT_WEIGHT,
        "prompt_lengths": f"{DATA.name}: characters / 4 + {TEMPLATE_TOKENS}",
        "goal": 1.10,
        "ranks": {},
    }
    for ranks in (2, 4, 8, 16, 64):
        parts = plan_batches(requests, list(LIMITS), ranks, {})
        sizes = {k: max(len(p) for p in parts if p[0].kind == k) for k in LIMITS}
        result["ranks"][ranks] = {
            **ratios(parts, deal(parts, LIMITS, ranks), ranks),
            "parts": len(parts),
            "largest_part": sizes,
            "before": ratios(*old_dealing(requests, ranks), ranks),
        }
    return result


def real(ranks: int = 4, questions: int = 200) -> dict:
    import tiny
    from test_plan import sample_on_ranks

    with tempfile.TemporaryDirectory() as tmp:
        corpus = [q["question"] + " " + q["answer"] for q in tiny.gsm8k_questions(200)]
        model = tiny.build_model(Path(tmp) / "model", corpus)
        started = time.perf_counter()
        tokens = sample_on_ranks(Path(tmp), model, tiny.gsm8k_questions(questions), ranks)
        seconds = time.perf_counter() - started
    mean = sum(tokens.values()) / ranks
    return {
        "ranks": ranks,
        "questions": questions,
        "structure_ratio": 0.25,
        "limits": {PREFIX: 4, FULL: 32},
        "tokens_by_rank": tokens,
        "max_over_mean": round(max(tokens.values()) / mean, 4),
        "min_over_mean": round(min(tokens.values()) / mean, 4),
        "goal": "within 15% of the mean",
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="a real 4-rank CPU run instead of the planner")
    args = parser.parse_args()
    print(json.dumps(real() if args.real else planner(), indent=2))


if __name__ == "__main__":
    main()
