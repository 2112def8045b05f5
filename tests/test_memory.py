"""The sampler's memory check, on the public config.json values of 8B, 32B and 70B models (no weights)."""

import itertools
import re

import pytest

from axolotl_upft import memory
from axolotl_upft.memory import (
    GIB,
    check_sampler_memory,
    kv_cache_bytes,
    parameter_counts,
    sampler_peak_bytes,
    weight_bytes,
)

# The config.json keys the estimate reads, as published on the Hugging Face hub
LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
QWEN_32B = {
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_attention_heads": 40,
    "num_hidden_layers": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
LLAMA_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
QWEN_05B = {  # ties lm_head to the embedding
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
MIXTRAL_8X7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
MODELS = {"Llama-3.1-8B": LLAMA_8B, "Qwen2.5-32B": QWEN_32B, "Llama-3.1-70B": LLAMA_70B}
CARDS = {"16GB": int(15.8 * GIB), "24GB": int(23.7 * GIB), "80GB": int(79.3 * GIB)}  # as torch reports them
FREE = {name: total - GIB // 2 for name, total in CARDS.items()}  # this process's CUDA context is taken
BATCH = {"rows": 16, "context": 2048, "prompt_tokens": 256}


def check(model: str, card: str, *, free: int | None = None, **settings):
    settings = {"weight_bits": 16, "backend": "hf", **BATCH, **settings}
    free = free or FREE[card]
    check_sampler_memory(MODELS[model], model=model, free_bytes=free, total_bytes=CARDS[card], **settings)


def refusal(model: str, card: str, **settings) -> str:
    with pytest.raises(ValueError, match=re.escape(f"sampling {model} needs")) as err:
        check(model, card, **settings)
    return str(err.value)


@pytest.mark.parametrize(
    ("config", "published"),
    [
        (LLAMA_8B, 8.03e9),
        (QWEN_32B, 32.8e9),
        (LLAMA_70B, 70.6e9),
        (QWEN_05B, 0.494e9),
        (MIXTRAL_8X7B, 46.7e9),
    ],
    ids=["llama-8b", "qwen-32b", "llama-70b", "qwen-0.5b-tied", "mixtral-8x7b"],
)
def test_parameter_counts_from_config_json_match_the_published_model_sizes(config, published):
    params = sum(parameter_counts(config).values())
    assert params == pytest.approx(published, rel=0.01)
    assert weight_bytes(config, 16) == 2 * params, "16-bit weights are two bytes each"


def test_a_tied_lm_head_is_counted_once_and_an_untied_one_twice():
    untied = sum(parameter_counts(QWEN_05B | {"tie_word_embeddings": False}).values())
    assert untied - sum(parameter_counts(QWEN_05B).values()) == 151936 * 896


def test_quantized_weights_keep_embedding_and_lm_head_in_16_bits():
    counts = parameter_counts(LLAMA_70B)
    embeddings = 2 * 128256 * 8192
    assert counts["kept_16bit"] == embeddings + (2 * 80 + 1) * 8192
    assert weight_bytes(LLAMA_70B, 4) == pytest.approx(
        2 * counts["kept_16bit"] + 0.516 * counts["linear"], rel=1e-3
    )
    assert 37 * 10**9 < weight_bytes(LLAMA_70B, 4) < 40 * 10**9 < weight_bytes(LLAMA_70B, 8) < 73 * 10**9


def test_4bit_and_8bit_weights_are_the_bytes_bitsandbytes_allocates(tmp_path):
    """A small random Llama quantized for real (bitsandbytes runs on CPU): weights, absmax, scales."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    shape = {k: v for k, v in LLAMA_8B.items() if k != "model_type"}
    shape |= {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2, "vocab_size": 1024}
    shape |= {"num_attention_heads": 4, "num_key_value_heads": 2}
    LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(tmp_path)
    axolotl_4bit = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    for bits, quantization in (
        (4, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **axolotl_4bit)),
        (8, BitsAndBytesConfig(load_in_8bit=True)),
    ):
        model = LlamaForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, dtype=torch.bfloat16
        )
        assert allocated_bytes(model) == weight_bytes(shape, bits)


def allocated_bytes(model) -> int:
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        extras = [state.absmax, state.state2.absmax] if state is not None else []
        extras += [param.SCB] if getattr(param, "SCB", None) is not None else []
        total += sum(t.numel() * t.element_size() for t in [param, *extras])
    return total


def test_kv_cache_per_position_is_the_known_gqa_figure_and_tensor_parallel_splits_the_kv_heads():
    assert kv_cache_bytes(LLAMA_8B, 1) == 128 * 2**10  # 2 x 32 layers x 8 heads x 128 x 2 bytes
    assert kv_cache_bytes(QWEN_32B, 1) == 256 * 2**10
    assert kv_cache_bytes(LLAMA_70B, 1) == 320 * 2**10
    assert kv_cache_bytes(LLAMA_70B, 1000, tensor_parallel_size=4) == kv_cache_bytes(LLAMA_70B, 1000) // 4
    assert kv_cache_bytes(LLAMA_70B, 1000, tensor_parallel_size=16) == kv_cache_bytes(LLAMA_70B, 1000) // 8


def test_the_hf_peak_adds_weights_the_batch_kv_cache_and_activations():
    parts = sampler_peak_bytes(LLAMA_8B, weight_bits=4, backend="hf", **BATCH)
    assert parts["kv_cache"] == 16 * 2048 * 128 * 2**10
    assert parts["total"] == parts["weights"] + parts["kv_cache"] + parts["activations"]
    assert parts["engine"] == parts["overhead"] == 0


def test_vllm_reserves_its_share_whole_and_holds_one_sequence_of_kv_cache():
    parts = sampler_peak_bytes(
        LLAMA_8B,
        weight_bits=16,
        backend="vllm",
        **BATCH,
        gpu_memory_utilization=0.5,
        total_bytes=CARDS["80GB"],
    )
    assert parts["engine"] == -(-CARDS["80GB"] // 2)
    assert parts["kv_cache"] == 2048 * 128 * 2**10, "one sequence; vLLM schedules the rest in its share"
    assert parts["total"] == parts["engine"] + memory.ENGINE_CONTEXT_BYTES
    default = sampler_peak_bytes(LLAMA_8B, weight_bits=16, backend="vllm", **BATCH, total_bytes=CARDS["80GB"])
    assert default["engine"] == pytest.approx(0.9 * CARDS["80GB"], abs=1), "null is vLLM's default, 0.9"


def test_multimodal_configs_are_read_from_their_text_config():
    nested = {"model_type": "llava", "text_config": LLAMA_8B, "vision_config": {"hidden_size": 1024}}
    assert sampler_peak_bytes(nested, weight_bits=4, backend="hf", **BATCH) == sampler_peak_bytes(
        LLAMA_8B, weight_bits=4, backend="hf", **BATCH
    )


def test_8b_in_16_bits_does_not_fit_16gb_and_names_only_the_keys_of_the_hf_loop_that_help():
    message = refusal("Llama-3.1-8B", "16GB")
    assert "upft.sampling.quantization: bnb-8bit" in message
    assert re.search(r"needs \d+\.\d GiB .*\d+\.\d GiB are free of 15\.8 GiB", message)
    assert "tensor_parallel_size" not in message and "gpu_memory_utilization" not in message
    weights_alone_too_big = refusal("Llama-3.1-8B", "16GB", free=14 * GIB)
    assert "batch_size" not in weights_alone_too_big, "no batch size makes 15 GiB of weights fit 14 GiB"


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_8b_fits_80gb_in_16_bits_and_16gb_in_4_bits(backend):
    check("Llama-3.1-8B", "80GB", backend=backend)
    check("Llama-3.1-8B", "16GB", backend=backend, weight_bits=4)


@pytest.mark.parametrize(("backend", "card"), itertools.product(["hf", "vllm"], CARDS))
def test_70b_in_16_bits_fits_no_single_card(backend, card):
    refusal("Llama-3.1-70B", card, backend=backend)


def test_70b_in_16_bits_on_80gb_names_quantization_and_tensor_parallel_size():
    message = refusal("Llama-3.1-70B", "80GB", backend="vllm")
    assert "upft.sampling.quantization: bnb-4bit" in message
    assert "upft.sampling.tensor_parallel_size: " in message
    hf = refusal("Llama-3.1-70B", "80GB")
    assert "upft.sampling.quantization: bnb-" in hf
    assert "tensor_parallel_size" not in hf, "the hf loop samples on one device: 4 bits fit there"


def test_70b_in_4_bits_on_24gb_needs_vllm_across_gpus_and_says_so():
    message = refusal("Llama-3.1-70B", "24GB", weight_bits=4)
    assert "set upft.sampling.backend: vllm" in message
    assert "upft.sampling.tensor_parallel_size: " in message


def test_32b_in_4_bits_on_24gb_needs_a_smaller_batch_and_names_the_largest_that_fits():
    message = refusal("Qwen2.5-32B", "24GB", weight_bits=4)
    rows = int(
        re.fullmatch(r".*To fit, set upft\.sampling\.batch_size / prefix_batch_size: (\d+)\.", message)[1]
    )
    check("Qwen2.5-32B", "24GB", weight_bits=4, rows=rows)
    refusal("Qwen2.5-32B", "24GB", weight_bits=4, rows=rows + 1)
    assert 1 < rows < BATCH["rows"]


def test_a_vllm_share_above_the_free_memory_fails_and_names_gpu_memory_utilization():
    free = 30 * GIB  # another process holds the rest of the card
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.90") as err:
        check("Llama-3.1-8B", "80GB", backend="vllm", weight_bits=4, free=free)
    share = float(re.search(r"upft\.sampling\.gpu_memory_utilization: (\d\.\d+)", str(err.value))[1])
    assert share * CARDS["80GB"] + memory.ENGINE_CONTEXT_BYTES <= free
    for unhelpful in ("batch_size", "tensor_parallel_size", "quantization"):
        assert unhelpful not in str(err.value)
    check("Llama-3.1-8B", "80GB", backend="vllm", weight_bits=4, free=free, gpu_memory_utilization=share)


def test_a_vllm_share_too_small_for_the_weights_names_raising_it_or_splitting_the_model():
    message = refusal("Qwen2.5-32B", "80GB", backend="vllm", gpu_memory_utilization=0.5)
    assert "upft.sampling.gpu_memory_utilization: 0.98" in message
    assert "upft.sampling.tensor_parallel_size: 2" in message


SETTING = {
    "quantization": lambda value: {"weight_bits": int(value[4])},
    "batch_size / prefix_batch_size": lambda value: {"rows": int(value)},
    "gpu_memory_utilization": lambda value: {"gpu_memory_utilization": float(value)},
    "tensor_parallel_size": lambda value: {"tensor_parallel_size": int(value)},
    "backend": lambda value: {"backend": value},
}


def named_fixes(message: str) -> list[dict]:
    """The settings each fix of an error stands for: one per key for "any one of", else one for all."""
    fixes = re.findall(r"upft\.sampling\.([a-z_ /]+): ([\w.-]+)", message.split("To fit, ")[1])
    changes = [SETTING[key](value.rstrip(".")) for key, value in fixes]
    if "any one of" in message:
        backend = [c for c in changes if "backend" in c]
        return [change | (backend[0] if backend else {}) for change in changes if "backend" not in change]
    return [{k: v for change in changes for k, v in change.items()}]


@pytest.mark.parametrize(("model", "card"), itertools.product(MODELS, CARDS))
def test_every_fix_an_error_names_makes_the_check_pass(model, card):
    for backend, bits in itertools.product(["hf", "vllm"], [16, 8, 4]):
        try:
            check(model, card, backend=backend, weight_bits=bits)
        except ValueError as err:
            for fix in named_fixes(str(err)):
                check(model, card, **{"backend": backend, "weight_bits": bits} | fix)


def test_an_unresolved_backend_or_a_vllm_estimate_without_the_total_is_refused():
    with pytest.raises(ValueError, match="resolve auto"):
        sampler_peak_bytes(LLAMA_8B, weight_bits=16, backend="auto", **BATCH)
    with pytest.raises(ValueError, match="total_bytes"):
        sampler_peak_bytes(LLAMA_8B, weight_bits=16, backend="vllm", **BATCH)
    with pytest.raises(ValueError, match="16, 8 or 4"):
        weight_bytes(LLAMA_8B, 3)


def test_device_memory_reads_the_cuda_device_and_is_none_without_one():
    import torch

    found = memory.device_memory()
    if not torch.cuda.is_available():
        assert found is None
    else:
        free, total = found
        assert 0 < free <= total == torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def test_a_card_that_nothing_fits_says_so_instead_of_naming_a_fix_that_fails():
    message = refusal("Llama-3.1-70B", "16GB", backend="vllm", free=GIB)
    assert "To fit, free memory on the device or use a larger one (it does not fit even with " in message
