"""Sampling backends: which one auto picks, vLLM's engine options and devices, and a clear ImportError
without vLLM. The real engine runs in test_vllm.py."""

import os

import pytest
import tiny
import torch

from axolotl_upft import generation
from axolotl_upft.args import SamplingConfig, UPFTConfig
from axolotl_upft.dataset import build_rows
from axolotl_upft.trained import TrainedModel


def run(questions, model, tokenizer, cache, backend):
    upft = UPFTConfig(
        cache_dir=str(cache),
        prefix_length=4,
        structure_ratio=0.25,
        sampling={"max_new_tokens": 12, "batch_size": 4, "backend": backend},
    )
    return build_rows(questions[:8], tokenizer, tiny.axolotl_cfg(model), upft)


def test_vllm_backend_without_vllm_names_the_extra_to_install(
    questions, tiny_model, tiny_tokenizer, tmp_path
):
    assert not generation.is_vllm_available(), "conftest hides vLLM outside tests marked vllm"
    with pytest.raises(ImportError, match=r'pip install "axolotl-upft\[vllm\]"'):
        run(questions, tiny_model, tiny_tokenizer, tmp_path, "vllm")


@pytest.mark.parametrize(("vllm", "expected"), [(True, "vllm"), (False, "hf")])
def test_auto_backend_is_vllm_wherever_it_is_installed(monkeypatch, vllm, expected):
    """Whether or not a GPU is there: auto reads only whether vLLM is installed."""
    monkeypatch.setattr(generation, "is_vllm_available", lambda: vllm)
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert generation.resolve_backend("auto") == expected, f"with a GPU: {gpu}"
    assert generation.resolve_backend("hf") == "hf" and generation.resolve_backend("vllm") == "vllm"


def test_auto_backend_samples_with_the_hf_loop_where_vllm_is_missing(
    questions, tiny_model, tiny_tokenizer, tmp_path
):
    rows = run(questions, tiny_model, tiny_tokenizer, tmp_path, "auto")
    assert len(rows) == 8


def test_the_engine_options_default_to_what_runs_on_cpu_and_on_a_gpu(monkeypatch):
    sampling = SamplingConfig(dtype="float32")  # as resolve_sampling leaves dtype: auto on CPU
    cpu = generation.engine_options(TrainedModel("m"), sampling, 300)
    assert cpu == {
        "model": "m",
        "tensor_parallel_size": 1,
        "dtype": "float32",
        "generation_config": "vllm",
        "max_model_len": 300,
        "enforce_eager": True,
        "gpu_memory_utilization": generation.VLLM_CPU_MEMORY_SHARE,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 4096,
    }, "vLLM refuses its 0.9 GPU default on CPU, where compiling costs more than it saves"
    assert generation.engine_options(TrainedModel("m"), sampling, 9000)["max_num_batched_tokens"] == 9000, (
        "unchunked, the longest prompt must fit in one step"
    )
    monkeypatch.setattr(generation, "sampling_device", lambda: torch.device("cuda", 0))
    gpu = generation.engine_options(TrainedModel("m"), SamplingConfig(dtype="bfloat16"), 300)
    assert (gpu["dtype"], gpu["enforce_eager"], "gpu_memory_utilization" in gpu) == ("bfloat16", False, False)
    assert "enable_chunked_prefill" not in gpu, "chunked prefill stays on where seeded requests survive it"
    set_ = SamplingConfig(
        dtype="float16",
        gpu_memory_utilization=0.5,
        max_model_len=4096,
        enforce_eager=True,
        tensor_parallel_size=2,
    )
    monkeypatch.undo()
    assert generation.engine_options(TrainedModel("m"), set_, 4096) == {
        "model": "m",
        "tensor_parallel_size": 2,
        "dtype": "float16",
        "generation_config": "vllm",
        "max_model_len": 4096,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.5,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 4096,
    }, "every setting from YAML wins"


@pytest.mark.parametrize(
    ("visible", "local_rank", "tp", "expected"),
    [(None, 1, 1, "1"), (None, 2, 2, "2,3"), ("4,5,6,7", 3, 1, "7"), ("4,5,6,7", 0, 4, "4,5,6,7")],
)
def test_under_torchrun_each_ranks_engine_sees_only_its_own_gpus(
    monkeypatch, visible, local_rank, tp, expected
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = {"WORLD_SIZE": "4", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "MASTER_PORT": "29500"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    before = dict(os.environ)
    with generation.engine_environment(tp):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected, "the engine's processes inherit this"
        assert not set(generation.TORCHRUN_VARIABLES) & set(os.environ), "the engine is a world of its own"
    assert dict(os.environ) == before, "the rank's own environment is restored"


def test_more_engine_gpus_than_the_node_has_names_the_settings():
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 2 on local rank 2 needs devices 2..3"):
        generation.engine_devices(["0", "1"], 2, {"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "2"})


def test_one_process_on_cpu_pins_no_device_and_gives_the_engine_every_core(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    with generation.engine_environment(1):
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0", "vLLM would keep a core for this process"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    with generation.engine_environment(1):
        assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1", "a user's own setting wins"


def test_vllm_request_parameters_carry_the_hf_settings_in_vllms_terms():
    params = generation.vllm_sampling_params(
        [100, 7, 2**62],
        max_new_tokens=32,
        stop_ids=frozenset({7, 2}),
        temperature=0.6,
        top_p=None,
        top_k=None,
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
    assert [p["seed"] for p in params] == [100, 7, 2**62], "each request its own seed (loop.request_seed)"
    options = {"max_new_tokens": 8, "stop_ids": {2}, "temperature": 0.6, "top_p": 0.8}
    set_ = generation.vllm_sampling_params([0], top_k=20, **options)[0]
    assert (set_["top_p"], set_["top_k"], set_["repetition_penalty"]) == (0.8, 20, 1.0)
    off = generation.vllm_sampling_params([0], top_k=0, **options)[0]
    assert off["top_k"] == -1, "transformers' 0 (off) is vLLM's -1"


@pytest.mark.vllm
def test_vllm_sampling_params_accepts_every_mapped_parameter_with_its_value():
    from vllm import SamplingParams

    options = {"max_new_tokens": 32, "stop_ids": {2, 7}, "temperature": 0.6, "top_p": 0.9, "top_k": 20}
    kwargs = generation.vllm_sampling_params([2**63 - 1], repetition_penalty=1.05, **options)[0]
    params = SamplingParams(**kwargs)
    assert {name: getattr(params, name) for name in kwargs} == kwargs
