"""Sampling cost of UPFT vs self-SFT vs RFT-16, same model, questions and engine. Prints JSON.

  python bench/sampling.py --model models/SmolLM2-135M-Instruct --n 8 --max-new-tokens 128        # CPU
  python bench/sampling.py --model /path/to/Qwen2.5-0.5B --n 512 --batch-size 256 --max-new-tokens 512  # GPU

(a) UPFT: round(p*n) full traces + the rest stopped after k new tokens (batched apart, length-sorted);
(b) self-SFT: one full trace per question; (c) RFT: --rft-samples full traces per question.

  python bench/sampling.py --speed --model M --n 2048 --width 160          # prefix speed vs plain generate
  python bench/sampling.py --compare --model M --n 32 --batch-size 8 --threads 1  # tokens/s vs plain generate
  python bench/sampling.py --engines --model M --n 32 --batch-size 16 --max-new-tokens 128  # vLLM vs both

--compare: plain `generate` on batches of --batch-size against the project's decode loop on pools of 4 such
batches (--batch-size rows running, refilled as rows stop), same prompts, greedy and sampled, prefixes and
full traces, alternating which goes first; greedy also counts rows whose tokens differ.

--engines: vLLM against the hf loop and plain `generate` (as --compare), same prompts, greedy and sampled,
prefixes and full traces, --repeats rounds that rotate which engine goes first; one vLLM engine and one hf
model stay loaded throughout (start-up is timed apart).

--speed times prefix sampling only (k new tokens, prompts cut or cycled to --width tokens): plain
`generate` at batch 256 (dynamic cache) against the project's sampler with its own batch sizes
(--prefix-batch-size, default: what the sampler picks) and --cache-implementation. Each runs two passes
over the same questions: `cold` includes any compilation, `warm` is the steady state.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from axolotl_upft.args import UPFTConfig
from axolotl_upft.generation import (
    HFSampler,
    VLLMSampler,
    call_sizes,
    left_pad,
    load_model,
    resolve_batch_sizes,
    resolve_sampling,
    sampling_device,
)
from axolotl_upft.loop import Prompt, request_seed
from axolotl_upft.prompts import chat_messages, pad_token_id, render_prompt_ids
from axolotl_upft.rows import FULL, PREFIX, cut_at_stop, question_kinds
from axolotl_upft.selfsample import read_generation_config, sampling_options, sampling_settings, stop_ids
from axolotl_upft.trained import TrainedModel


def hf_sampling(args):
    """upft.sampling of the hf loop with this run's cache implementation."""
    sampling = {"backend": "hf", "cache_implementation": args.cache_implementation}
    return resolve_sampling(UPFTConfig(sampling=sampling).sampling, TrainedModel(args.model))


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
if not DATA.exists():  # the GPU machine gets the repository only
    DATA = ROOT / "example_configs" / "data" / "gsm8k_train_128.jsonl"


def load_questions(n: int, path: Path) -> list[str]:
    """The first n questions of the file, cycled when it has fewer."""
    with open(path) as handle:
        questions = [json.loads(line)["question"] for line in handle]
    return [questions[i % len(questions)] for i in range(n)]


def plan_batches(requests: list[Prompt], sizes: dict[str, int]) -> list[list[Prompt]]:
    """Batches of exactly `sizes` questions per kind, length-sorted: the benchmarks measure one batch size
    (the loop's planner would cut fewer questions into PARTS_PER_RANK parts instead)."""
    batches = []
    for kind, size in sizes.items():
        group = sorted((r for r in requests if r.kind == kind), key=lambda r: (len(r.prompt_ids), r.index))
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return batches


def timed_sampling(sampler, questions: list[Prompt], batch_size: dict, limits: dict, options: dict) -> dict:
    if sampler.model.device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for i, batch in enumerate(plan_batches(questions, batch_size)):
        outputs = sampler.generate(
            [q.prompt_ids for q in batch],
            seeds=[request_seed(0, q.index) for q in batch],
            max_new_tokens=limits[batch[0].kind],
            **options,
        )
        tokens += sum(len(ids) for ids, _ in outputs)
    if sampler.model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "questions": len(questions),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
    }


def fixed_width(prompts: list[list[int]], width: int) -> list[list[int]]:
    """Each prompt's ids cycled or cut to exactly `width` tokens (the speed target's prompt length)."""
    return [(p * (width // len(p) + 1))[:width] for p in prompts]


def timed_passes(run, questions: int, device_type: str) -> dict:
    passes = {}
    for name in ("cold", "warm"):
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device_type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        passes[name] = {
            "seconds": round(seconds, 3),
            "questions_per_second": round(questions / seconds, 1),
            "ms_per_question": round(1000 * seconds / questions, 3),
        }
    return passes


def prefix_speed(args, prompts: list[list[int]], options: dict) -> dict:
    """Prefix questions/s: plain `generate` at batch 256 vs the project's sampler (batch sizes, cache)."""
    prompts = fixed_width(prompts, args.width)
    upft = UPFTConfig(
        prefix_length=args.k,
        sampling={
            "prefix_batch_size": args.prefix_batch_size,
            "cache_implementation": args.cache_implementation,
        },
    )
    sizes = resolve_batch_sizes(upft.sampling, "hf", args.model, {PREFIX: args.width}, {PREFIX: args.k})
    sampler = HFSampler.load(TrainedModel(args.model), hf_sampling(args))
    device_type = sampler.model.device.type
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def plain():  # transformers `generate` as it comes: its own warper chain, dynamic cache, batch 256
        for i in range(0, len(prompts), 256):
            ids, mask = left_pad(prompts[i : i + 256], options["pad_id"], sampler.model.device)
            torch.manual_seed(i)
            sampler.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.k,
                eos_token_id=sorted(options["stop_ids"]),
                pad_token_id=options["pad_id"],
                do_sample=True,
                temperature=options["temperature"],
                top_k=options["top_k"] or 0,
                top_p=options["top_p"] or 1.0,
                repetition_penalty=1.0,
            )

    questions = [Prompt(i, p, PREFIX) for i, p in enumerate(prompts)]

    def ours():
        for i, batch in enumerate(plan_batches(questions, sizes)):
            seeds = [request_seed(i, q.index) for q in batch]
            sampler.generate([q.prompt_ids for q in batch], seeds=seeds, max_new_tokens=args.k, **options)

    result = {
        "plain_generate": {"batch_size": 256, "cache_implementation": "dynamic"}
        | timed_passes(plain, len(prompts), device_type)
    }
    result["upft_sampler"] = {
        "batch_size": sizes[PREFIX],
        "cache_implementation": args.cache_implementation,
    } | timed_passes(ours, len(prompts), device_type)
    if device_type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["speedup_warm"] = round(
        result["plain_generate"]["warm"]["seconds"] / result["upft_sampler"]["warm"]["seconds"], 3
    )
    result["speedup_cold"] = round(
        result["plain_generate"]["cold"]["seconds"] / result["upft_sampler"]["cold"]["seconds"], 3
    )
    return result


def plain_generate(model, prompts, *, max_new_tokens, options, seed) -> list[tuple[list[int], bool]]:
    """transformers `generate` as it comes (its own warper chain, dynamic cache), cut at the first stop."""
    ids, mask = left_pad(prompts, options["pad_id"], model.device)
    torch.manual_seed(seed)
    sampled = {"do_sample": True, "temperature": options["temperature"], "top_k": options["top_k"] or 0}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(options["stop_ids"]),
        pad_token_id=options["pad_id"],
        repetition_penalty=options["repetition_penalty"],
        top_p=options["top_p"] or 1.0,
        **(sampled if options["temperature"] else {"do_sample": False}),
    )
    return [cut_at_stop(row, options["stop_ids"]) for row in out[:, ids.shape[1] :].tolist()]


def race(sampler, pools: list[list[Prompt]], batch_size: int, limit: int, settings: dict) -> dict:
    """Plain `generate` on batches of `batch_size` and the project's sampler on pools of POOL such batches
    (`batch_size` rows at a time, refilled), on the same prompts, alternating which goes first."""
    totals = {"plain": [0, 0.0], "upft": [0, 0.0]}
    differ = 0
    for i, pool in enumerate(pools):
        ids = [q.prompt_ids for q in pool]
        outputs = {}
        for name in ("plain", "upft") if i % 2 == 0 else ("upft", "plain"):
            start = time.perf_counter()
            if name == "plain":
                outputs[name] = [
                    row
                    for j in range(0, len(ids), batch_size)
                    for row in plain_generate(
                        sampler.model, ids[j : j + batch_size], max_new_tokens=limit, options=settings, seed=i
                    )
                ]
            else:
                seeds = request_seeds(i, 0, len(ids))
                outputs[name] = sampler.generate(ids, seeds=seeds, max_new_tokens=limit, **settings)
            totals[name][1] += time.perf_counter() - start
            totals[name][0] += sum(len(o) for o, _ in outputs[name])
        differ += sum(a != b for a, b in zip(outputs["plain"], outputs["upft"]))
    rates = {name: round(tokens / seconds, 1) for name, (tokens, seconds) in totals.items()}
    return {
        "tokens": {name: tokens for name, (tokens, _) in totals.items()},
        "seconds": {name: round(seconds, 2) for name, (_, seconds) in totals.items()},
        "tokens_per_second": rates,
        "speedup": round(rates["upft"] / rates["plain"], 3),
    } | ({"rows_that_differ": differ} if not settings["temperature"] else {})


def side_by_side(args, prompts: list[list[int]], options: dict) -> dict:
    """Tokens/s of plain `generate` and of the project's sampler on the same length-sorted prompts,
    greedy and sampled, prefixes (k tokens) and full traces, side by side in one run. Greedy also counts
    the rows whose tokens differ from plain `generate`'s."""
    sampler = HFSampler(load_model(args.model, sampling_device()), running=args.batch_size)
    sampler.generate(prompts[:2], seeds=[0, 1], max_new_tokens=2, **options)  # warm-up
    result = {}
    for kind, limit in ((PREFIX, args.k), (FULL, args.max_new_tokens)):
        if kind not in args.kinds.split(","):
            continue
        requests = [Prompt(i, p, kind) for i, p in enumerate(prompts)]
        pools = plan_batches(requests, call_sizes({kind: args.batch_size}, "hf", "dynamic"))
        for mode, temperature in (("greedy", 0.0), ("sampled", args.temperature)):
            settings = options | {"temperature": temperature}
            result[f"{kind}_{mode}"] = race(sampler, pools, args.batch_size, limit, settings)
            print(json.dumps({f"{kind}_{mode}": result[f"{kind}_{mode}"]}), file=sys.stderr, flush=True)
    return result


def request_seeds(seed: int, start: int, count: int) -> list[int]:
    """The loop's seeds of requests start..start+count-1 of a run seeded `seed`."""
    return [request_seed(seed, i) for i in range(start, start + count)]


def timed(run, *args) -> tuple[list, float]:
    start = time.perf_counter()
    out = run(*args)
    return out, time.perf_counter() - start


def engine_runners(args, prompts: list[list[int]]) -> tuple[dict, dict]:
    """name -> run(prompts, limit, settings, seed) for vLLM, the hf loop and plain `generate`; start-up s."""
    startup = {}
    hf, startup["hf"] = timed(
        lambda: HFSampler(load_model(args.model, sampling_device()), running=args.batch_size)
    )
    context = max(len(p) for p in prompts) + max(args.k, args.max_new_tokens)
    sampling = resolve_sampling(UPFTConfig(sampling={"backend": "vllm"}).sampling, TrainedModel(args.model))
    vllm, startup["vllm"] = timed(lambda: VLLMSampler(TrainedModel(args.model), sampling, context))
    pool = call_sizes({"x": args.batch_size}, "hf", "dynamic")["x"]

    def plain(ids, limit, settings, seed):
        return [
            row
            for j in range(0, len(ids), args.batch_size)
            for row in plain_generate(
                hf.model, ids[j : j + args.batch_size], max_new_tokens=limit, options=settings, seed=seed
            )
        ]

    def loop(ids, limit, settings, seed):  # pools of POOL batches, as `sample` calls it
        return [
            row
            for j in range(0, len(ids), pool)
            for row in hf.generate(
                ids[j : j + pool], seeds=request_seeds(seed, j, pool), max_new_tokens=limit, **settings
            )
        ]

    def engine(ids, limit, settings, seed):  # one call: vLLM schedules its own batches
        return vllm.generate(ids, seeds=request_seeds(seed, 0, len(ids)), max_new_tokens=limit, **settings)

    return {"vllm": engine, "hf_loop": loop, "plain_generate": plain}, startup | {"close": vllm.close}


def engine_race(args, prompts: list[list[int]], options: dict) -> dict:
    """Tokens/s of each engine per (kind, greedy/sampled), rounds rotating the order; ratios of vLLM's."""
    runners, startup = engine_runners(args, prompts)
    close = startup.pop("close")
    result = {"startup_seconds": {k: round(v, 1) for k, v in startup.items()}}
    names = list(runners)
    try:
        for kind, limit in ((PREFIX, args.k), (FULL, args.max_new_tokens)):
            for mode, temperature in (("greedy", 0.0), ("sampled", args.temperature)):
                settings = options | {"temperature": temperature}
                totals = {name: [0, 0.0] for name in names}
                for round_ in range(args.repeats):
                    for name in names[round_ % 3 :] + names[: round_ % 3]:
                        out, seconds = timed(runners[name], prompts, limit, settings, round_)
                        totals[name][0] += sum(len(ids) for ids, _ in out)
                        totals[name][1] += seconds
                rates = {name: round(tokens / seconds, 1) for name, (tokens, seconds) in totals.items()}
                result[f"{kind}_{mode}"] = {
                    "tokens": {name: tokens for name, (tokens, _) in totals.items()},
                    "seconds": {name: round(seconds, 2) for name, (_, seconds) in totals.items()},
                    "tokens_per_second": rates,
                    "vllm_vs_hf_loop": round(rates["vllm"] / rates["hf_loop"], 2),
                    "vllm_vs_plain_generate": round(rates["vllm"] / rates["plain_generate"], 2),
                }
                print(json.dumps({f"{kind}_{mode}": result[f"{kind}_{mode}"]}), file=sys.stderr, flush=True)
    finally:
        close()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rft-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--speed", action="store_true", help="prefix speed vs plain generate (see above)")
    parser.add_argument("--compare", action="store_true", help="tokens/s vs plain generate (see above)")
    parser.add_argument("--engines", action="store_true", help="vLLM vs the hf loop and generate (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="--engines: rounds, rotating the order")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--kinds", default=f"{PREFIX},{FULL}", help="--compare: which of prefix,full to race")
    parser.add_argument("--width", type=int, default=160, help="--speed: prompt length in tokens")
    parser.add_argument("--prefix-batch-size", type=int, default=None)
    parser.add_argument("--cache-implementation", choices=["dynamic", "static"], default="dynamic")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    upft = UPFTConfig(
        prefix_length=args.k,
        structure_ratio=args.p,
        sampling={
            "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens,
            "cache_implementation": args.cache_implementation,
        },
    )
    generation_config = read_generation_config(args.model)
    settings = sampling_settings(upft.sampling, generation_config)
    options = sampling_options(settings, stop_ids(tokenizer, generation_config), pad_token_id(tokenizer))
    texts = load_questions(args.n, args.data)
    prompts = [render_prompt_ids(tokenizer, chat_messages(t, None)) for t in texts]
    if args.engines or args.compare:
        race = engine_race if args.engines else side_by_side
        result = (
            {
                "device": str(sampling_device()),
                "threads": torch.get_num_threads(),
                "model": args.model,
                "n": len(prompts),
                "batch_size": args.batch_size,
                "k": args.k,
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_k": settings["top_k"],
                "top_p": settings["top_p"],
            }
            | ({"repeats": args.repeats} if args.engines else {})
            | race(args, prompts, options)
        )
        json.dump(result, sys.stdout, indent=2)
        print()
        return result
    if args.speed:
        result = {
            "device": str(sampling_device()),
            "model": args.model,
            "n": len(prompts),
            "k": args.k,
            "width": args.width,
            "temperature": args.temperature,
            "top_k": settings["top_k"],
            "top_p": settings["top_p"],
        }
        result |= prefix_speed(args, prompts, options)
        json.dump(result, sys.stdout, indent=2)
        print()
        return result
    kinds = question_kinds(len(texts), args.p, upft.seed)
    limits = {PREFIX: args.k, FULL: args.max_new_tokens}
    sampler = HFSampler.load(TrainedModel(args.model), hf_sampling(args))
    sampler.generate(prompts[:2], seeds=[0, 1], max_new_tokens=2, **options)  # warm-up
    sizes = {PREFIX: args.prefix_batch_size or args.batch_size, FULL: args.batch_size}

    upft_q = [Prompt(i, p, k) for i, (p, k) in enumerate(zip(prompts, kinds))]
    sft_q = [Prompt(i, p, FULL) for i, p in enumerate(prompts)]
    rft_q = [
        Prompt(i * args.rft_samples + j, p, FULL)
        for i, p in enumerate(prompts)
        for j in range(args.rft_samples)
    ]
    result = {
        "device": str(sampling_device()),
        "model": args.model,
        "n": args.n,
        "k": args.k,
        "p": args.p,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "prefix_batch_size": sizes[PREFIX],
        "top_k": settings["top_k"],
        "top_p": settings["top_p"],
        "upft": timed_sampling(sampler, upft_q, sizes, limits, options),
        "self_sft": timed_sampling(sampler, sft_q, sizes, limits, options),
        f"rft{args.rft_samples}": timed_sampling(sampler, rft_q, sizes, limits, options),
    }
    rft = result[f"rft{args.rft_samples}"]
    result["ratios"] = {
        "upft_vs_rft_tokens": round(result["upft"]["tokens"] / rft["tokens"], 4),
        "upft_vs_rft_seconds": round(result["upft"]["seconds"] / rft["seconds"], 4),
        "upft_vs_self_sft_tokens": round(result["upft"]["tokens"] / result["self_sft"]["tokens"], 4),
        "upft_vs_self_sft_seconds": round(result["upft"]["seconds"] / result["self_sft"]["seconds"], 4),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main()
