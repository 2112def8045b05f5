"""A tiny chat tokenizer and random Llama built offline, for exact tests and real Axolotl runs."""

import json
import re
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def build_tokenizer(out: Path, corpus: list[str], chat_template: str | None = CHATML):
    """Word-level tokenizer: one id per word or punctuation mark, so expected ids are readable."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["system", "user", "assistant"])}
    for text in corpus:
        for word in words(text):
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = chat_tokenizer(core, chat_template)
    tokenizer.save_pretrained(out)
    return tokenizer


def chat_tokenizer(core, chat_template: str):
    """A transformers tokenizer around `core` with the tests' special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def gsm8k_questions(n: int, split: str = "train") -> list[dict]:
    with open(DATA / f"gsm8k_{split}.jsonl") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def build_model(
    out: Path, corpus: list[str], *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """Random tiny Llama + the word-level tokenizer + a generation config, saved as an HF folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(out, corpus)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, do_sample=True, top_p=0.95, top_k=20
    ).save_pretrained(out)
    return out


def axolotl_cfg(model: Path, **keys):
    """The cfg `axolotl preprocess` hands a dataset strategy: validated and normalized by Axolotl, on CPU
    precision; `keys` over a minimal LoRA-free config of `model`."""
    import torch
    from axolotl.utils.config import normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    raw = {
        "base_model": str(model),
        "datasets": [{"path": "questions.jsonl", "type": "alpaca"}],
        "sequence_len": 256,
        "micro_batch_size": 1,
        "learning_rate": 1e-3,
        "output_dir": "out",
        "bf16": False,
        "fp16": False,
    } | keys
    cpu = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 0, "compute_capability": None}
    env = {"torch_version": torch.__version__.split("+")[0]}
    cfg = validate_config(DictDefault(raw), capabilities=cpu, env_capabilities=env)
    normalize_config(cfg)
    return cfg
