"""The sampler's device memory, estimated from config.json and the settings before any weight loads."""

import math

GIB = 2**30
ACTIVATION_BYTES = 2  # the sampler computes in 16 bits on a GPU (KV cache, activations, 16-bit weights)
# Bytes per weight of a Linear layer. bnb 8-bit: int8, plus an fp32 scale per output row (weight_bytes).
# bnb 4-bit as Axolotl loads it: nf4, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmax.
LINEAR_BYTES = {16: 2.0, 8: 1.0, 4: 0.5 + 1 / 64 + 4 / (64 * 256)}
LOGIT_COPIES = 4  # the last position's fp32 logits, processed scores, probabilities and a sort buffer
VLLM_DEFAULT_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization default on a GPU
# vLLM profiles one step of max_num_batched_tokens tokens and max_num_seqs sequences; its defaults for the
# LLM class on cards of at least 70 GiB, and on smaller ones
VLLM_STEP = {"large": (16384, 1024), "small": (8192, 256)}
ENGINE_CONTEXT_BYTES = 512 * 2**20  # the engine process's CUDA context, taken before vLLM checks free memory
TP_SIZES = (2, 4, 8)  # tensor_parallel_size values a fix may name


def text_config(model_config: dict) -> dict:
    """The language model's part of a config.json (multimodal configs nest it under text_config)."""
    return model_config.get("text_config") or model_config


def _shape(model_config: dict) -> dict[str, int]:
    c = text_config(model_config)
    heads = c["num_attention_heads"]
    return {
        "hidden": c["hidden_size"],
        "layers": c["num_hidden_layers"],
        "heads": heads,
        "kv_heads": c.get("num_key_value_heads") or heads,
        "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
        "intermediate": c.get("intermediate_size") or 4 * c["hidden_size"],
        "vocab": c["vocab_size"],
    }


def _experts(model_config: dict) -> tuple[int, int]:
    """(experts per MLP, each one's width): (1, intermediate_size) for a dense model."""
    c = text_config(model_config)
    experts = c.get("num_local_experts") or c.get("num_experts") or 1
    if experts == 1:
        return 1, _shape(model_config)["intermediate"]
    return experts, c.get("moe_intermediate_size") or c["intermediate_size"]


def parameter_counts(model_config: dict) -> dict[str, int]:
    """Parameters of a decoder (Llama, Qwen, Mistral, Mixtral shapes): the Linear layers bitsandbytes
    quantizes, and the embedding, lm_head and norms it keeps in 16 bits (a tied lm_head counted once)."""
    c, s = text_config(model_config), _shape(model_config)
    hidden, head_dim = s["hidden"], s["head_dim"]
    experts, width = _experts(model_config)
    attention = 2 * hidden * (s["heads"] + s["kv_heads"]) * head_dim
    mlp = experts * 3 * hidden * width + (hidden * experts if experts > 1 else 0)  # + the router
    embeddings = 1 if c.get("tie_word_embeddings", model_config.get("tie_word_embeddings")) else 2
    return {
        "linear": s["layers"] * (attention + mlp),
        "kept_16bit": embeddings * s["vocab"] * hidden + (2 * s["layers"] + 1) * hidden,
    }


def _linear_rows(model_config: dict) -> int:
    """Output rows of the Linear layers (bnb 8-bit keeps an fp32 scale for each)."""
    s = _shape(model_config)
    experts, width = _experts(model_config)
    attention = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"] + s["hidden"]
    mlp = experts * (2 * width + s["hidden"]) + (experts if experts > 1 else 0)
    return s["layers"] * (attention + mlp)


def weight_bytes(model_config: dict, weight_bits: int) -> int:
    """Weights at `weight_bits` (16, or 8 / 4 for bitsandbytes), exactly as bitsandbytes allocates them."""
    if weight_bits not in LINEAR_BYTES:
        raise ValueError(f"weight_bits {weight_bits}: the sampler loads weights in 16, 8 or 4 bits")
    counts = parameter_counts(model_config)
    row_scales = 4 * _linear_rows(model_config) if weight_bits == 8 else 0
    return math.ceil(counts["linear"] * LINEAR_BYTES[weight_bits] + 2 * counts["kept_16bit"] + row_scales)


def kv_cache_bytes(model_config: dict, positions: int, tensor_parallel_size: int = 1) -> int:
    """Keys and values of one sequence; tensor parallelism splits the KV heads (at least one per GPU)."""
    s = _shape(model_config)
    kv_heads = -(-s["kv_heads"] // tensor_parallel_size)
    return 2 * s["layers"] * kv_heads * s["head_dim"] * positions * ACTIVATION_BYTES


def _prefill_bytes(model_config: dict, tokens: int) -> int:
    """One layer's activations for `tokens` positions: hidden states, q/k/v and the MLP's width."""
    s = _shape(model_config)
    return tokens * (4 * s["hidden"] + 3 * s["intermediate"]) * ACTIVATION_BYTES


def row_activation_bytes(model_config: dict, width: int) -> int:
    """The hf loop's peak step for one row: a prefill of `width` positions (attention scores included, as
    eager attention holds them) and the last position's logits in fp32."""
    s = _shape(model_config)
    scores = s["heads"] * width * width * ACTIVATION_BYTES
    return _prefill_bytes(model_config, width) + scores + LOGIT_COPIES * s["vocab"] * 4


def row_bytes(model_config: dict, *, width: int, new_tokens: int) -> int:
    """Device memory one row of an hf `generate` batch takes: KV cache and the peak step's activations."""
    return kv_cache_bytes(model_config, width + new_tokens) + row_activation_bytes(model_config, width)


def _vllm_activation_bytes(model_config: dict, total_bytes: int) -> int:
    """vLLM's profiled step: one chunk of prefill (flash attention holds no scores) and fp32 logits."""
    tokens, sequences = VLLM_STEP["large" if total_bytes >= 70 * GIB else "small"]
    return _prefill_bytes(model_config, tokens) + sequences * _shape(model_config)["vocab"] * 4


def _held(parts: dict[str, int]) -> int:
    """What the engine must hold within its share: weights, KV cache and the step's activations."""
    return parts["weights"] + parts["kv_cache"] + parts["activations"]


def sampler_peak_bytes(
    model_config: dict,
    *,
    weight_bits: int,
    rows: int,
    context: int,
    backend: str,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    total_bytes: int | None = None,
    prompt_tokens: int | None = None,
) -> dict[str, int]:
    """The sampler's peak device memory per GPU, in parts and in total, from config.json values alone.

    hf: the weights, the KV cache of `rows` sequences of `context` positions and the peak step (the prefill
    of `prompt_tokens` positions a row; None: all of `context`). vLLM reserves `gpu_memory_utilization` x
    `total_bytes` whole (`engine`) and must hold in it the weights, its profiled step and the KV cache of
    at least one sequence (it schedules the rest); its process's CUDA context comes on top (`overhead`).
    `tensor_parallel_size` splits vLLM's weights and KV heads; the hf loop samples on one device."""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend {backend!r}: resolve auto to hf or vllm before estimating memory")
    if backend == "hf":
        width = prompt_tokens or context
        parts = {
            "weights": weight_bytes(model_config, weight_bits),
            "kv_cache": rows * kv_cache_bytes(model_config, context),
            "activations": rows * row_activation_bytes(model_config, width),
            "engine": 0,
            "overhead": 0,
        }
        return parts | {"total": sum(parts.values())}
    if total_bytes is None:
        raise ValueError("vLLM reserves a share of the device's total memory: pass total_bytes")
    utilization = gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    parts = {
        "weights": math.ceil(weight_bytes(model_config, weight_bits) / tensor_parallel_size),
        "kv_cache": kv_cache_bytes(model_config, context, tensor_parallel_size),
        "activations": _vllm_activation_bytes(model_config, total_bytes),
        "engine": math.ceil(utilization * total_bytes),
        "overhead": ENGINE_CONTEXT_BYTES,
    }
    return parts | {"total": max(parts["engine"], _held(parts)) + parts["overhead"]}


def _fits(model_config: dict, free_bytes: int, total_bytes: int, settings: dict) -> bool:
    parts = sampler_peak_bytes(model_config, total_bytes=total_bytes, **settings)
    engine_holds_it = settings["backend"] == "hf" or _held(parts) <= parts["engine"]
    return parts["total"] <= free_bytes and engine_holds_it


def _most_rows(fits, rows: int) -> int:
    """The most rows below `rows` that fit (0 when not even one does)."""
    low, high = 0, rows - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(rows=middle) else (low, middle - 1)
    return low


def _changes(model_config: dict, free_bytes: int, total_bytes: int, settings: dict) -> dict[str, tuple]:
    """Each setting that helps, as {YAML key: (the settings it changes, the value to show)}: the value
    that fits alone, or the furthest it can go when it does not fit alone."""

    def fits(**change) -> bool:
        return _fits(model_config, free_bytes, total_bytes, settings | change)

    changes = {}
    lower = [bits for bits in (8, 4) if bits < settings["weight_bits"]]
    if lower:
        bits = next((b for b in lower if fits(weight_bits=b)), 4)
        changes["quantization"] = ({"weight_bits": bits}, f"bnb-{bits}bit")
    if settings["backend"] == "hf":
        if settings["rows"] > 1:
            rows = _most_rows(fits, settings["rows"]) or 1
            changes["batch_size / prefix_batch_size"] = ({"rows": rows}, rows)
        return changes
    parts = sampler_peak_bytes(model_config, total_bytes=total_bytes, **settings)
    share = math.floor((free_bytes - ENGINE_CONTEXT_BYTES) / total_bytes * 100) / 100
    cramped = _held(parts) > parts["engine"]
    more_than_free = parts["engine"] + parts["overhead"] > free_bytes
    if share > 0 and (more_than_free or (cramped and share * total_bytes > parts["engine"])):
        changes["gpu_memory_utilization"] = ({"gpu_memory_utilization": share}, share)
    if cramped:
        size = next((t for t in TP_SIZES if fits(tensor_parallel_size=t)), TP_SIZES[-1])
        if size > settings["tensor_parallel_size"]:
            changes["tensor_parallel_size"] = ({"tensor_parallel_size": size}, size)
    return changes


def _keys(shown: dict) -> str:
    return "; ".join(f"upft.sampling.{key}: {value}" for key, value in shown.items())


def _fix_text(model_config: dict, free_bytes: int, total_bytes: int, settings: dict) -> str:
    """The keys that fix it: each that fits alone, else all of them together (each one's value taken on
    top of the ones before), else what is still missing."""
    changes = _changes(model_config, free_bytes, total_bytes, settings)
    alone = {
        key: shown
        for key, (change, shown) in changes.items()
        if _fits(model_config, free_bytes, total_bytes, settings | change)
    }
    if alone:
        return ("set " if len(alone) == 1 else "set any one of ") + _keys(alone)
    together, shown = dict(settings), {}
    for key in changes:
        step = _changes(model_config, free_bytes, total_bytes, together).get(key)
        if step:
            together |= step[0]
            shown[key] = step[1]
    if shown and _fits(model_config, free_bytes, total_bytes, together):
        return "set all of " + _keys(shown)
    if settings["backend"] == "hf":
        vllm = settings | {"backend": "vllm", "tensor_parallel_size": 1, "gpu_memory_utilization": None}
        switch = "the hf loop samples on one device: set upft.sampling.backend: vllm"
        if _fits(model_config, free_bytes, total_bytes, vllm):
            return switch
        return f"{switch}, and {_fix_text(model_config, free_bytes, total_bytes, vllm)}"
    tried = _keys(shown) or "these settings"
    return f"free memory on the device or use a larger one (it does not fit even with {tried})"


def check_sampler_memory(
    model_config: dict,
    *,
    model: str,
    weight_bits: int,
    rows: int,
    context: int,
    backend: str,
    free_bytes: int,
    total_bytes: int,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    prompt_tokens: int | None = None,
) -> None:
    """Stop before anything loads when the sampler would not fit in the device's free memory: a ValueError
    naming the model, what it needs against what is free, and the upft.sampling keys that make it fit."""
    settings = {
        "weight_bits": weight_bits,
        "rows": rows,
        "context": context,
        "backend": backend,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "prompt_tokens": prompt_tokens,
    }
    if _fits(model_config, free_bytes, total_bytes, settings):
        return
    parts = sampler_peak_bytes(model_config, total_bytes=total_bytes, **settings)
    gib = {key: f"{value / GIB:.1f} GiB" for key, value in parts.items()}
    held = f"weights {gib['weights']} in {weight_bits} bits, KV cache {gib['kv_cache']}"
    if backend == "hf":
        what = f"{held} for {rows} rows of {context} positions, activations {gib['activations']}"
    else:
        share = parts["engine"] / total_bytes
        what = (
            f"vLLM reserves gpu_memory_utilization {share:.2f} x {total_bytes / GIB:.1f} GiB = "
            f"{gib['engine']} + {gib['overhead']} for its process, and must hold in it {held} for one "
            f"sequence of {context} positions, activations {gib['activations']}"
        )
        if tensor_parallel_size > 1:
            what += f", per GPU of {tensor_parallel_size}"
    raise ValueError(
        f"sampling {model} needs {gib['total']} of device memory ({what}), "
        f"{free_bytes / GIB:.1f} GiB are free of {total_bytes / GIB:.1f} GiB. "
        f"To fit, {_fix_text(model_config, free_bytes, total_bytes, settings)}."
    )


def device_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)
