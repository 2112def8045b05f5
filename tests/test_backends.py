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


@pytest.mark.parametrize(
    ("vllm", "gpu", "expected"), [(True, False, "hf"), (False, True, "hf"), (True, True, "vllm")]
)
def test_auto_backend_picks_vllm_only_with_both_vllm_and_a_gpu(monkeypatch, vllm, gpu, expected):
    monkeypatch.setattr(generation, "is_vllm_available", lambda: vllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert generation.resolve_backend("auto") == expected
    assert generation.resolve_backend("hf") == "hf" and generation.resolve_backend("vllm") == "vllm"


def test_auto_backend_samples_with_hf_on_a_cpu_even_where_vllm_looks_installed(
    monkeypatch, questions, tiny_model, tiny_tokenizer, tmp_path
):
    monkeypatch.setattr(generation, "is_vllm_available", lambda: True)  # vLLM itself is never imported here
    rows = run(questions, tiny_model, tiny_tokenizer, tmp_path, "auto")
    assert len(rows) == 8


def test_vllm_request_parameters_carry_the_hf_settings_in_vllms_terms():
    params = generation.vllm_sampling_params(
        3,
        max_new_tokens=32,
        stop_ids=frozenset({7, 2}),
        temperature=0.6,
        top_p=None,
        top_k=None,
        seed=100,
        repetition_penalty=1.05,
    )
    assert params[0] == {
        "n": 1,
        "temperature": 0.6,
        "top_p": 1.0,
        "top_k": -1,
        "repetition_penalty": 1.05,
        "max_tokens": 32,
        "stop_token_ids": [2, 7],
        "seed": 100,
        "detokenize": False,
    }
    assert [p["seed"] for p in params] == [100, 101, 102], "one seed per request: batch seed + position"
    options = {"max_new_tokens": 8, "stop_ids": {2}, "temperature": 0.6, "top_p": 0.8, "seed": 0}
    set_ = generation.vllm_sampling_params(1, top_k=20, **options)[0]
    assert (set_["top_p"], set_["top_k"], set_["repetition_penalty"]) == (0.8, 20, 1.0)
    off = generation.vllm_sampling_params(1, top_k=0, **options)[0]
    assert off["top_k"] == -1, "transformers' 0 (off) is vLLM's -1"


@pytest.mark.skipif(not generation.is_vllm_available(), reason="vLLM is not installed")
def test_vllm_sampling_params_accepts_every_mapped_parameter_with_its_value():
    from vllm import SamplingParams

    options = {"max_new_tokens": 32, "stop_ids": {2, 7}, "temperature": 0.6, "top_p": 0.9, "top_k": 20}
    kwargs = generation.vllm_sampling_params(1, seed=5, repetition_penalty=1.05, **options)[0]
    params = SamplingParams(**kwargs)
    assert {name: getattr(params, name) for name in kwargs} == kwargs


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
