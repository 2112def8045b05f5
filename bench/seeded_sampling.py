"""What seeds per request cost in tokens/s: vLLM with seeded vs unseeded requests, and the hf loop's
per-row draw (a splitmix64 uniform per row and step, inverse CDF) vs the shared-generator draw it replaced.
Prints JSON.

  python bench/seeded_sampling.py --out results/bench/seeded_sampling_cpu.json    # CPU, a few minutes
  python bench/seeded_sampling.py --layers 24 --n 256 --new-tokens 256           # GPU: the real 0.5B shape

The model has the Qwen2.5-0.5B width (hidden 896, 14 heads, 2 KV heads, the 151,936-token Qwen vocabulary
and tokenizer from scripts/gpu_check/make_model.py) with --layers layers of random weights (fewer layers make
the draw a larger share of a step, so the cost shows larger than on the full model). Prompts are GSM8K
questions in the chat template; sampling is Qwen's (temperature 0.7, top-k 20, top-p 0.8), no stop id, so
every request generates --new-tokens tokens. Each engine stays loaded; --repeats rounds alternate which arm
goes first, and each arm's tokens/s is reported per round with mean and standard deviation.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "gpu_check"))
QWEN = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}


def build_model(out: Path, layers: int) -> None:
    """make_model's Qwen2.5-0.5B config and tokenizer with `layers` layers, random bf16 weights."""
    if (out / "config.json").is_file():
        return
    import make_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    make_model.build_tokenizer(make_model.tiktoken_file()).save_pretrained(out)
    config = Qwen2Config.from_dict(
        make_model.QWEN25_05B | {"num_hidden_layers": layers, "max_window_layers": layers}
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def prompts_of(model: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from axolotl_upft.prompts import chat_messages, render_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model)
    lines = (ROOT / "example_configs" / "data" / "gsm8k_train_128.jsonl").read_text().splitlines()
    texts = [json.loads(lines[i % len(lines)])["question"] for i in range(n)]
    return [render_prompt_ids(tokenizer, chat_messages(t, None)) for t in texts]


def race(arms: dict, repeats: int) -> dict:
    """tokens/s of each arm per round (rounds alternate the order), mean, sd, and the second arm's cost."""
    rates = {name: [] for name in arms}
    for round_ in range(repeats):
        for name in list(arms)[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            tokens = arms[name]()
            rates[name].append(tokens / (time.perf_counter() - start))
    result = {
        name: {
            "tokens_per_second": [round(r, 1) for r in values],
            "mean": round(statistics.mean(values), 1),
            "sd": round(statistics.stdev(values), 1) if len(values) > 1 else None,
        }
        for name, values in rates.items()
    }
    first, second = (statistics.mean(v) for v in rates.values())
    result["cost"] = round(1 - second / first, 4)  # share of tokens/s lost by the second arm
    return result


def vllm_race(args, prompts: list[list[int]], options: dict) -> dict:
    from axolotl_upft.args import UPFTConfig
    from axolotl_upft.generation import VLLMSampler, resolve_sampling
    from axolotl_upft.loop import request_seed
    from axolotl_upft.trained import TrainedModel

    model = TrainedModel(str(args.model))
    sampling = resolve_sampling(UPFTConfig(sampling={"backend": "vllm"}).sampling, model)
    started = time.perf_counter()
    engine = VLLMSampler(model, sampling, max(len(p) for p in prompts) + args.new_tokens)
    startup = time.perf_counter() - started
    seeds = [request_seed(0, i) for i in range(len(prompts))]

    def arm(request_seeds):
        return lambda: sum(len(ids) for ids, _ in engine.generate(prompts, seeds=request_seeds, **options))

    try:
        arm(seeds)()  # warm-up
        result = race({"unseeded": arm([None] * len(prompts)), "seeded": arm(seeds)}, args.repeats)
    finally:
        engine.close()
    return {"startup_seconds": round(startup, 1)} | result


def shared_stream_decode(model, prompts, *, seed: int, running: int, **options):
    """The hf loop's draw before seeds per request: one generator for the rows running at each step."""
    from axolotl_upft.decoding import decode_pool
    from axolotl_upft.generation import CandidateSampler

    generator = torch.Generator(model.device).manual_seed(seed)
    sampler = CandidateSampler(options.pop("temperature"), options.pop("top_k"), options.pop("top_p"))

    def pick(ids, scores, rows, steps):
        values, indices = sampler.candidates(scores)
        choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
        return (choice if indices is None else indices.gather(-1, choice)).squeeze(-1)

    return decode_pool(model, prompts, running=running, pick=pick, **options)


def hf_race(args, prompts: list[list[int]], options: dict) -> dict:
    from axolotl_upft.generation import decode, load_model, sampling_device
    from axolotl_upft.loop import request_seed

    model = load_model(str(args.model), sampling_device())
    seeds = [request_seed(0, i) for i in range(len(prompts))]
    hf = options | {"pad_id": 0}

    def per_row():
        return sum(len(ids) for ids, _ in decode(model, prompts, seeds=seeds, running=args.running, **hf))

    def shared():
        out = shared_stream_decode(model, prompts, seed=0, running=args.running, **hf)
        return sum(len(row) for row in out)

    per_row()  # warm-up
    loop = race({"shared_generator": shared, "per_row_seed": per_row}, args.repeats)
    return {"running": args.running, "loop": loop, "draw_only": draw_only(options, model.device)}


def draw_only(options: dict, device) -> dict:
    """Microseconds per step of each draw alone, on (rows, vocab) random logits, as the loop's pick."""
    from axolotl_upft.generation import CandidateSampler, row_keys

    sampler = CandidateSampler(options["temperature"], options["top_k"], options["top_p"])
    out = {}
    for rows in (16, 64):
        scores = torch.randn(rows, 151936, device=device) * 3
        keys, steps = row_keys(list(range(rows)), device), torch.zeros(rows, dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(0)

        def shared(scores=scores, generator=generator):
            values, indices = sampler.candidates(scores)
            return indices.gather(-1, torch.multinomial(values.softmax(-1), 1, generator=generator))

        def per_row(scores=scores, keys=keys, steps=steps):
            return sampler.draw(scores, keys, steps)

        arms = {"shared_generator": shared, "per_row_seed": per_row}
        out[f"rows_{rows}"] = {name: round(per_call_us(run, device), 1) for name, run in arms.items()}
    return out


def per_call_us(run, device, calls: int = 50) -> float:
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/upft-seeded-bench-model"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n", type=int, default=32, help="prompts per round")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=4, help="rounds per arm, alternating the order")
    parser.add_argument("--running", type=int, default=16, help="hf loop: rows decoded at a time")
    parser.add_argument("--arms", default="auto", help="vllm,hf, or auto: hf, and vllm where installed")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    build_model(args.model, args.layers)
    prompts = prompts_of(args.model, args.n)
    config = json.loads((args.model / "config.json").read_text())
    options = QWEN | {"max_new_tokens": args.new_tokens, "stop_ids": frozenset()}
    result = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "model": {"path": str(args.model)}
        | {key: config[key] for key in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "n": len(prompts),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "sampling": QWEN,
    }
    from axolotl_upft.generation import is_vllm_available

    if args.arms == "auto" and not is_vllm_available():
        result["vllm"] = "not installed"
    elif "vllm" in args.arms or args.arms == "auto":
        result["vllm"] = vllm_race(args, prompts, options)
        print(json.dumps({"vllm": result["vllm"]}), file=sys.stderr, flush=True)
    if "hf" in args.arms or args.arms == "auto":
        result["hf"] = hf_race(args, prompts, options)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main()
