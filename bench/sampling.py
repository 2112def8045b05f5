"""Sampling cost of UPFT vs self-SFT vs RFT-16, same model, questions and engine. Prints JSON.

  python bench/sampling.py --model models/SmolLM2-135M-Instruct --n 8 --max-new-tokens 128        # CPU
  python bench/sampling.py --model /path/to/Qwen2.5-0.5B --n 512 --batch-size 256 --max-new-tokens 512  # GPU

(a) UPFT: round(p*n) full traces + the rest stopped after k new tokens (batched apart, length-sorted);
(b) self-SFT: one full trace per question; (c) RFT: --rft-samples full traces per question.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from axolotl_upft.args import UPFTConfig
from axolotl_upft.prompts import chat_messages, pad_token_id, render_prompt_ids
from axolotl_upft.rows import FULL, question_kinds
from axolotl_upft.sampler import HFSampler, sampling_device
from axolotl_upft.samples import Question, plan_batches, read_generation_config, sampling_settings, stop_ids

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


def load_questions(n: int, path: Path) -> list[str]:
    with open(path) as handle:
        return [json.loads(line)["question"] for _, line in zip(range(n), handle)]


def timed_sampling(sampler, questions: list[Question], batch_size: int, limits: dict, options: dict) -> dict:
    if sampler.model.device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for i, batch in enumerate(plan_batches(questions, batch_size)):
        outputs = sampler.generate(
            [q.prompt_ids for q in batch], max_new_tokens=limits[batch[0].kind], seed=i, **options
        )
        tokens += sum(len(ids) for ids, _ in outputs)
    if sampler.model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"questions": len(questions), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rft-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.6)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    upft = UPFTConfig(prefix_length=args.k, structure_ratio=args.p,
                      sampling={"temperature": args.temperature, "max_new_tokens": args.max_new_tokens})
    generation_config = read_generation_config(args.model)
    settings = sampling_settings(upft, generation_config)
    options = {
        "stop_ids": stop_ids(tokenizer, generation_config),
        "pad_id": pad_token_id(tokenizer),
        "temperature": settings["temperature"], "top_p": settings["top_p"], "top_k": settings["top_k"],
    }
    texts = load_questions(args.n, args.data)
    prompts = [render_prompt_ids(tokenizer, chat_messages(t, None)) for t in texts]
    kinds = question_kinds(len(texts), args.p, upft.seed)
    limits = {"prefix": args.k, "full": args.max_new_tokens}
    sampler = HFSampler(args.model)
    sampler.generate(prompts[:2], max_new_tokens=2, seed=0, **options)  # warm-up

    upft_q = [Question(i, t, p, k) for i, (t, p, k) in enumerate(zip(texts, prompts, kinds))]
    sft_q = [Question(i, t, p, FULL) for i, (t, p) in enumerate(zip(texts, prompts))]
    rft_q = [Question(i * args.rft_samples + j, t, p, FULL)
             for i, (t, p) in enumerate(zip(texts, prompts)) for j in range(args.rft_samples)]
    result = {
        "device": str(sampling_device()), "model": args.model, "n": args.n, "k": args.k, "p": args.p,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "upft": timed_sampling(sampler, upft_q, args.batch_size, limits, options),
        "self_sft": timed_sampling(sampler, sft_q, args.batch_size, limits, options),
        f"rft{args.rft_samples}": timed_sampling(sampler, rft_q, args.batch_size, limits, options),
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


if __name__ == "__main__":
    main()
