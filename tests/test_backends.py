"""Sampling backends: vLLM is optional (a clear ImportError), and on a GPU it fills the same cache."""

import pytest
import torch
from axolotl.utils.dict import DictDefault

from axolotl_upft import generation
from axolotl_upft.args import UPFTConfig
from axolotl_upft.dataset import build_rows

needs_vllm_gpu = pytest.mark.skipif(
    not (generation.is_vllm_available() and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU"
)


def run(questions, model, tokenizer, cache, backend):
    upft = UPFTConfig(
        cache_dir=str(cache),
        prefix_length=4,
        structure_ratio=0.25,
        sampling={"max_new_tokens": 12, "batch_size": 4, "backend": backend},
    )
    return build_rows(
        questions[:8], tokenizer, DictDefault({"base_model": str(model), "sequence_len": 256}), upft
    )


@pytest.mark.skipif(generation.is_vllm_available(), reason="vLLM is installed here")
def test_vllm_backend_without_vllm_names_the_extra_to_install(
    questions, tiny_model, tiny_tokenizer, tmp_path
):
    with pytest.raises(ImportError, match=r'pip install "axolotl-upft\[vllm\]"'):
        run(questions, tiny_model, tiny_tokenizer, tmp_path, "vllm")


def test_auto_backend_is_hf_without_a_gpu_or_vllm():
    expected = "vllm" if generation.is_vllm_available() and torch.cuda.is_available() else "hf"
    assert generation.resolve_backend("auto") == expected
    assert generation.resolve_batch_size(None, "hf") == (256 if torch.cuda.is_available() else 16)


@pytest.mark.gpu
@needs_vllm_gpu
def test_vllm_rows_follow_the_same_prefix_and_mask_rules_as_hf(
    questions, tiny_model, tiny_tokenizer, tmp_path
):
    hf = run(questions, tiny_model, tiny_tokenizer, tmp_path / "hf", "hf")
    vllm = run(questions, tiny_model, tiny_tokenizer, tmp_path / "vllm", "vllm")
    assert [r.kind for r in vllm] == [r.kind for r in hf]
    for a, b in zip(hf, vllm):
        prompt = sum(label == -100 for label in a.labels)
        assert b.input_ids[:prompt] == a.input_ids[:prompt], "same prompts, same masks"
        if b.kind == "prefix":
            assert b.num_trained <= 5, "k = 4 generated ids + EOS"
