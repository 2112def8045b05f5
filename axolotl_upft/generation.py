"""Self-sampling backends, token ids in and out: the hf decode loop on transformers (hf) and vLLM (vllm)."""

import ctypes
import gc
import importlib.util
import json
import os
import typing
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList

from .cache import weight_files
from .decoding import decode_pool, left_pad
from .logs import get_logger
from .memory import check_sampler_memory, device_memory, row_bytes, text_config
from .rows import FULL, PREFIX, cut_at_stop
from .trained import TrainedModel, model_config

LOG = get_logger(__name__)
AUTO_BATCH = {"cuda": 256, "cpu": 16}  # full-trace batches; on a GPU also capped by what fits in memory
PREFIX_BATCH_CAP = 2048  # prefix batches hold only prompt + k tokens, so on a GPU they grow up to this
MEMORY_SHARE = 0.5  # of the GPU memory left after the weights, for one batch's cache, activations and logits
STATIC_WIDTH = 64  # with a static KV cache, prompt widths are padded to a multiple of this (fewer recompiles)
DRAW_VERSION = 3  # of the request seeds (both engines) and the hf loop's draw; part of the sample cache key
POOL = 4  # the hf backend decodes a batch size of rows at a time from calls of POOL x that many prompts
VLLM_CPU_MEMORY_SHARE = 0.3  # of RAM on CPU, where vLLM refuses its GPU default of 0.9
VLLM_MISSING = 'upft.sampling.backend: vllm needs vLLM: pip install "axolotl-upft[vllm]"'
CPU_PREFILL_TOKENS = 4096  # vLLM's CPU default token budget per step (a longer context raises it)


def sampling_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """auto is vLLM wherever it is installed (GPU or CPU: faster on both, bench/README.md), else hf.
    What a given model needs on top of that is `resolve_sampling`'s."""
    if backend == "auto":
        return "vllm" if is_vllm_available() else "hf"
    return backend


def resolve_sampling(sampling, model: TrainedModel):
    """upft.sampling with a concrete backend and dtype, resolved once for every command. `auto` is what can
    sample `model` as it is trained: vLLM where it is installed and can load the model (`vllm_refusal`),
    else the hf loop, with one log line saying why. `backend: vllm` on a model vLLM cannot load stops."""
    backend = resolve_backend(sampling.backend)
    if backend == "vllm" and not is_vllm_available():
        raise ImportError(VLLM_MISSING)
    reason = vllm_refusal(model) if backend == "vllm" else None
    if reason and sampling.backend == "vllm":
        raise ValueError(
            f"upft.sampling.backend: vllm cannot sample {model.base_model} as it is trained: {reason}. "
            "Set upft.sampling.backend: hf (or auto) to sample with the plugin's own decode loop."
        )
    if reason:
        LOG.warning("UPFT: backend auto samples with the hf loop, not vLLM: %s", reason)
        backend = "hf"
    resolved = sampling.model_copy(
        update={"backend": backend, "dtype": resolve_dtype(sampling.dtype, model.base_model)}
    )
    resolved._auto = sampling.backend == "auto"
    return resolved


def vllm_refusal(model: TrainedModel) -> str | None:
    """Why the installed vLLM cannot sample `model` as it is trained, read from its config files and vLLM's
    own rules (no weights, no engine), or None. bitsandbytes stays with the hf loop; vLLM serves a LoRA
    adapter with its own LoRA support, within its rank and feature limits; its CPU attention takes some head
    sizes only."""
    if model.quantization in ("bnb-4bit", "bnb-8bit"):
        return (
            f"the model trains in {model.quantization} (bitsandbytes). vLLM's CPU build 0.32 has no "
            "bitsandbytes loader, and its GPU in-flight quantization is not Axolotl's BitsAndBytesConfig, "
            "so its samples would not come from the model that trains"
        )
    if model.quantization is not None:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        if model.quantization not in QUANTIZATION_METHODS:
            return f"vLLM has no loader for the checkpoint's quantization {model.quantization!r}"
    if model.adapter is not None:
        reason = lora_refusal(model.adapter)
        if reason:
            return f"vLLM cannot serve the adapter {model.adapter}: {reason}"
    if sampling_device().type == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head = head_size(model.base_model)
        if head is not None and head not in CPUAttentionBackend.get_supported_head_sizes():
            return f"vLLM's CPU attention does not take the model's head size {head}"
    return None


def lora_refusal(adapter: str) -> str | None:
    """What vLLM's own check (PEFTHelper.validate_legal) refuses in a LoRA folder, at its largest rank."""
    from vllm.config.lora import LoRAConfig, MaxLoRARanks
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(adapter, max_position_embeddings=None)
    try:
        helper.validate_legal(LoRAConfig(max_lora_rank=max(typing.get_args(MaxLoRARanks))))
    except ValueError as err:
        return str(err)
    return None


def local_config(base_model: str) -> dict:
    """A local model's config.json (its text model's part for multimodal ones); {} for a hub id."""
    if not Path(base_model, "config.json").is_file():
        return {}
    return text_config(model_config(base_model))


def head_size(base_model: str) -> int | None:
    c = local_config(base_model)
    if "hidden_size" not in c or "num_attention_heads" not in c:
        return None
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def resolve_dtype(dtype: str, base_model: str | None = None) -> str:
    """auto: float32 on CPU; on a GPU the model's torch_dtype in 16 bits (a float32 checkpoint samples in
    bfloat16, as vLLM's auto), float16 where the GPU lacks bfloat16."""
    if dtype != "auto":
        return dtype
    if sampling_device().type != "cuda":
        return "float32"
    if saved_dtype(base_model) == "float16" or not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def saved_dtype(base_model: str | None) -> str | None:
    """config.json's torch_dtype (transformers 5 writes `dtype`), or None when the config is out of reach."""
    try:
        config = model_config(base_model) if base_model else {}
    except (OSError, ValueError):  # not downloaded, offline, or not a hub id
        return None
    config = config.get("text_config") or config
    return config.get("dtype") or config.get("torch_dtype")


def resolve_batch_size(batch_size: int | None, backend: str) -> int | None:
    """The set batch size, else the hf loop's default; None for vLLM, which schedules its own batches: then
    nothing caps a part (loop.part_count sizes parts from the number of questions and workers)."""
    if batch_size is not None:
        return batch_size
    if backend == "vllm":
        return None
    return AUTO_BATCH[sampling_device().type]


def rows_that_fit(model_config: dict, *, width: int, new_tokens: int, memory_bytes: float) -> int:
    """Rows of one `generate` batch that fit in `memory_bytes` (memory.row_bytes: KV cache of width +
    new_tokens positions, the prefill's activations of one layer and the last position's fp32 logits)."""
    return max(1, int(memory_bytes // row_bytes(model_config, width=width, new_tokens=new_tokens)))


def weight_bytes(base_model: str) -> int:
    return sum(f.stat().st_size for f in weight_files(Path(base_model)))


def resolve_batch_sizes(
    sampling, backend: str, base_model: str, widths: dict[str, int], limits: dict[str, int]
) -> dict[str, int]:
    """The most questions per batch for each kind (prefix, full); a kind left out has no cap (vLLM with
    neither size set). Set sizes win (`prefix_batch_size`, else `batch_size`); on a GPU the hf loop's auto
    size is what `memory_fits` allows, up to PREFIX_BATCH_CAP for prefixes and AUTO_BATCH for full traces.
    `widths` must cover every question, cached or not, so a plan never depends on the cache."""
    full = resolve_batch_size(sampling.batch_size, backend)
    sizes = {kind: full for kind in widths} if full is not None else {}
    if PREFIX in widths and sampling.prefix_batch_size is not None:
        sizes[PREFIX] = sampling.prefix_batch_size
    for kind, fit in memory_fits(backend, base_model, widths, limits).items():
        if kind == PREFIX and sampling.prefix_batch_size is None and sampling.batch_size is None:
            sizes[kind] = min(PREFIX_BATCH_CAP, fit)
        elif kind == FULL and sampling.batch_size is None:
            sizes[kind] = min(AUTO_BATCH["cuda"], fit)
    return sizes


def memory_fits(
    backend: str, base_model: str, widths: dict[str, int], limits: dict[str, int]
) -> dict[str, int]:
    """Rows per kind that fit in MEMORY_SHARE of the GPU memory left after the weights; none off a GPU or
    for vLLM. From the device's total memory and the model's config, never from free memory, so every
    rank plans the same batches."""
    device = sampling_device()
    if backend == "vllm" or device.type != "cuda" or not Path(base_model, "config.json").is_file():
        return {}
    config = json.loads(Path(base_model, "config.json").read_text())
    memory = (torch.cuda.get_device_properties(device).total_memory - weight_bytes(base_model)) * MEMORY_SHARE
    return {
        kind: rows_that_fit(config, width=width, new_tokens=limits[kind], memory_bytes=memory)
        for kind, width in widths.items()
    }


def engine_length(sampling, model: TrainedModel, longest_prompt: int, longest_total: int) -> int | None:
    """The context of the engine that samples (vLLM's max_model_len; None for the hf loop), checked against
    the longest prompt before anything loads: upft.sampling.max_model_len, else the run's longest prompt +
    generation, within the model's context (max_position_embeddings), where generation then stops."""
    context = local_config(model.base_model).get("max_position_embeddings")
    if context and longest_prompt >= context:
        raise ValueError(
            f"the longest prompt is {longest_prompt} tokens, but {model.base_model} holds {context} "
            "positions (max_position_embeddings): no token could be generated. Shorten the question (upft."
            "question_template, upft.system_prompt) or drop the longest rows."
        )
    if sampling.backend != "vllm":
        return None
    if sampling.max_model_len is None:
        return min(longest_total, context) if context else longest_total
    if context and sampling.max_model_len > context:
        raise ValueError(
            f"upft.sampling.max_model_len: {sampling.max_model_len} is more than {model.base_model}'s "
            f"context of {context} positions (max_position_embeddings), which vLLM refuses. Set it to "
            f"{context} or less, or leave it unset."
        )
    if longest_prompt >= sampling.max_model_len:
        raise ValueError(
            f"upft.sampling.max_model_len: {sampling.max_model_len} leaves no room to generate after the "
            f"longest prompt ({longest_prompt} tokens). Raise it above {longest_prompt}, or leave it unset."
        )
    return sampling.max_model_len


def pad_width(width: int, cache_implementation: str) -> int:
    if cache_implementation != "static":
        return width
    return -(-width // STATIC_WIDTH) * STATIC_WIDTH


def bnb_config(quantization: str, dtype: torch.dtype):
    """bitsandbytes settings of a model loaded without an Axolotl cfg: those of Axolotl's QLoRA (nf4, double
    quantization) and 8-bit LoRA. With a cfg, Axolotl's loader builds its own (bnb_config_kwargs and all)."""
    from transformers import BitsAndBytesConfig

    if quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(
    base_model: str,
    device: torch.device,
    dtype: str = "auto",
    *,
    adapter: str | None = None,
    quantization: str | None = None,
    **kwargs,
):
    """`base_model` with transformers (bitsandbytes for bnb-4bit / bnb-8bit; a pre-quantized checkpoint in
    its own method), plus PEFT's `adapter` on top, unmerged."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, resolve_dtype(dtype, base_model))
    LOG.info("UPFT: loading %s on %s (%s, %s) for self-sampling", base_model, device, dtype, quantization)
    if quantization is not None:
        kwargs["device_map"] = {"": device}
    if quantization in ("bnb-4bit", "bnb-8bit"):
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, **kwargs)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return ready(model, device)


def load_axolotl_model(model: TrainedModel, dtype: str):
    """The model Axolotl's loader builds for training, as `axolotl inference` loads it: its quantization
    (BitsAndBytesConfig, GPTQ, model_quantization_config), attention, patches and plugins, and the adapter
    of lora_model_dir. Weights and compute in `dtype` (upft.sampling.dtype, resolved)."""
    from axolotl.loaders import ModelLoader, load_tokenizer
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({**model.cfg, "torch_dtype": getattr(torch, resolve_dtype(dtype, model.base_model))})
    LOG.info(
        "UPFT: loading %s through Axolotl's loader for self-sampling (%s, %s, adapter %s)",
        model.base_model,
        cfg.torch_dtype,
        model.quantization or "16-bit",
        model.adapter,
    )
    with single_process_loading():
        loaded, _ = ModelLoader(cfg, load_tokenizer(cfg), inference=True).load()
    return loaded


@contextmanager
def single_process_loading():
    """Axolotl's loader reads the launcher's DeepSpeed stage from the environment (ZeRO-3: memory-efficient
    loading through a DeepSpeed config); the sampler is one process's full copy, so that stage is hidden
    while it loads."""
    saved = os.environ.pop("ACCELERATE_DEEPSPEED_ZERO_STAGE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = saved


def describe(model) -> str:
    """What was loaded, for the log: its class, the bitsandbytes layers that hold its weights, its size."""
    layers = Counter(
        type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")
    )
    held = ", ".join(f"{count} {name}" for name, count in layers.items()) or "no quantized layers"
    return f"{type(model).__name__} ({held}; {model.get_memory_footprint() / 2**20:.1f} MiB)"


def ready(model, device: torch.device):
    """`model` in eval mode on `device` (unless a device map placed it), with a blank generation config."""
    # `generate` fills every option a call leaves unset from generation_config.json (no_repeat_ngram_size,
    # suppress_tokens, bad_words_ids, sequence_bias, ...). A blank config leaves transformers' neutral
    # defaults, so only what each call passes (upft.sampling) shapes the draw, as with vLLM. A PEFT wrapper's
    # `generate` reads its base model's.
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    unwrapped.generation_config = GenerationConfig()
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(device)
    return model.eval()


def with_adapter(model, adapter: str | None):
    """The model with a LoRA adapter merged in once (generation then runs at the base model's speed)."""
    if adapter is None:
        return model
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("sampling with an adapter needs peft: pip install peft") from err
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


NUCLEUS_CANDIDATES = 1024  # top-p without top-k looks for the nucleus among this many top tokens first
TIE_WINDOW = 16  # top-k keeps tokens tied with the k-th score among the next max(k, 16) tokens


class CandidateSampler:
    """Draws the next token itself, among the few tokens that temperature, top-k and top-p keep, and hands
    `generate` a one-hot score, so `generate` runs greedy and never softmaxes, sorts or samples the whole
    vocabulary (150K tokens x thousands of rows a step). The kept tokens and scores are those of
    transformers' warper chain (`warp`), with two bounds: top-k keeps ties with the k-th score among the
    next max(k, TIE_WINDOW) tokens only (transformers keeps every tie), and top-p without top-k runs the
    chain itself when the nucleus is wider than NUCLEUS_CANDIDATES tokens. With top-k set, a step has no
    host synchronisation. Each row draws with its own seed (`draw`). As `generate`'s logits processor, its
    rows have the keys `keys` (`row_keys`) and are at step `input_ids`' width - `start` (the padded prompts'
    width)."""

    def __init__(
        self,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        keys: torch.Tensor | None = None,
        start: int = 0,
    ):
        self.temperature, self.top_k, self.top_p = (
            temperature,
            top_k or 0,
            top_p if top_p is not None else 1.0,
        )
        self.keys, self.start = keys, start

    def chain(self, scores: torch.Tensor) -> torch.Tensor:
        from transformers.generation.logits_process import TopPLogitsWarper

        return TopPLogitsWarper(self.top_p)(None, scores)

    def candidates(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores, token ids) of the candidates, -inf where removed; ids None means the whole vocabulary."""
        scores = scores / self.temperature
        vocab = scores.shape[-1]
        top_k = self.top_k if 0 < self.top_k < vocab else 0
        if not top_k and self.top_p >= 1.0:
            return scores, None
        width = min(vocab, top_k + max(top_k, TIE_WINDOW) if top_k else NUCLEUS_CANDIDATES)
        values, indices = torch.topk(scores, width, dim=-1)  # descending
        if top_k:
            values = values.masked_fill(values < values[..., top_k - 1 : top_k], -torch.inf)
        if self.top_p >= 1.0:
            return values, indices
        ascending, indices = values.flip(-1), indices.flip(-1)
        if top_k:
            cumulative = ascending.softmax(-1).cumsum(-1)
        else:
            probs = (ascending - torch.logsumexp(scores, -1, keepdim=True)).exp()
            outside = (1 - probs.sum(-1, keepdim=True)).clamp(min=0)
            if bool(outside.gt(1 - self.top_p).any()):
                return self.chain(scores), None  # the nucleus reaches beyond the candidates
            cumulative = outside + probs.cumsum(-1)
        remove = cumulative <= 1 - self.top_p
        remove[..., -1] = False  # the most likely token always stays
        return ascending.masked_fill(remove, -torch.inf), indices

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """The warped scores over the whole vocabulary, as transformers' chain returns them."""
        values, indices = self.candidates(scores)
        return values if indices is None else torch.full_like(scores, -torch.inf).scatter(-1, indices, values)

    def draw(self, scores: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """One token per row from the warped softmax at the uniform of the row's key and step (`uniforms`),
        by inverse CDF over the candidates: a row draws the same token whichever rows share its batch."""
        values, indices = self.candidates(scores)
        choice = inverse_cdf(values, uniforms(keys, steps))
        return (choice if indices is None else indices.gather(-1, choice)).squeeze(-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = torch.tensor(input_ids.shape[1] - self.start, device=scores.device)
        token = self.draw(scores, self.keys, step)
        return torch.full_like(scores, -torch.inf).scatter(-1, token[:, None], 0.0)


def inverse_cdf(values: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The (rows, 1) position drawn from each row's softmax(values) at its uniform in [0, 1): the first whose
    cumulative probability exceeds it (cumsum + searchsorted, no sort)."""
    cdf = values.float().softmax(-1).cumsum(-1)
    total = cdf[..., -1:]
    # strictly below the total, so the first cdf value above it is a token of nonzero probability
    target = torch.minimum(uniform[:, None] * total, total.nextafter(total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True)


# splitmix64 (Steele, Lea & Flood 2014) in int64 arithmetic: products wrap modulo 2**64 as unsigned ones do,
# and right shifts are masked to be logical.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def as_int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 of the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: a bijection of 64-bit words in which every output bit depends on every input
    bit."""
    x = (x ^ shift_right(x, 30)) * as_int64(MIX_MULTIPLIERS[0])
    x = (x ^ shift_right(x, 27)) * as_int64(MIX_MULTIPLIERS[1])
    return x ^ shift_right(x, 31)


def row_keys(seeds: list[int], device) -> torch.Tensor:
    """Each row's key from its request's seed (loop.request_seed), on the device that draws."""
    return mix64(torch.tensor(seeds, dtype=torch.int64, device=device))


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A float32 uniform in [0, 1) per row, a function of its key and step only (counter-based, on the
    device, no generator state): the top 24 bits of the step-th output of the key's splitmix64 stream."""
    bits = mix64(keys + (steps + 1) * as_int64(GOLDEN_GAMMA))
    return shift_right(bits, 40).float() * 2.0**-24


def generate_batch(
    model, prompts: list[list[int]], *, cache_implementation: str = "dynamic", running=None, **kwargs
):
    """One sample per prompt: (generated ids up to and including the first stop id, stopped). A dynamic KV
    cache runs `decode` (`running` rows at a time, refilled as rows stop); a static one runs `generate`."""
    if cache_implementation == "static":
        return generate_static(model, prompts, **kwargs)
    return decode(model, prompts, running=running, **kwargs)


def call_sizes(sizes: dict[str, int | None], backend: str, cache_implementation: str) -> dict[str, int]:
    """The most prompts per `generate` call (one part) for batch sizes `sizes`: POOL times more for the hf
    decode loop, which decodes a batch size of rows at a time and refills a row as soon as it stops. A
    size of None (vLLM unless set) caps nothing and is left out."""
    pool = POOL if backend == "hf" and cache_implementation == "dynamic" else 1
    return {kind: size * pool for kind, size in sizes.items() if size is not None}


def decode(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    pad_id: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seeds: list[int],
    repetition_penalty: float = 1.0,
    running: int | None = None,
) -> list[tuple[list[int], bool]]:
    """`decode_pool` with `generate`'s token choice: greedy (argmax) gives `generate`'s greedy tokens; a
    temperature draws with CandidateSampler, each row from its own seed at its own step, after any
    repetition penalty (over each row's own ids, never its padding). So a row's sample is the same whatever
    the batch, `running` or the order it is decoded in."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    keys = row_keys(seeds, model.device)
    sampler = CandidateSampler(temperature, top_k, top_p) if temperature else None
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None

    def pick(
        ids: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        scores = penalty(ids, scores) if penalty else scores
        if sampler is None:
            return scores.argmax(-1)
        return sampler.draw(scores, keys[rows], steps)

    out = decode_pool(
        model,
        prompts,
        running=running or len(prompts),
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        pad_id=pad_id,
        pick=pick,
    )
    return [cut_at_stop(row, stop_ids) for row in out]


@torch.inference_mode()
def generate_static(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    pad_id: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seeds: list[int],
    repetition_penalty: float = 1.0,
) -> list[tuple[list[int], bool]]:
    """transformers `generate` with a fixed-shape KV cache, which it compiles on a GPU (CUDA graphs); prompts
    are left-padded to a multiple of STATIC_WIDTH so batches share shapes. Rows draw as in `decode`: each
    from its own seed, at its step (the tokens it has generated)."""
    width = pad_width(max(len(p) for p in prompts), "static")
    ids, mask = left_pad(prompts, pad_id, model.device, width)
    # generate runs greedy: with a temperature, CandidateSampler (a logits processor, after any repetition
    # penalty as in transformers' order) has already drawn the token. Every knob is passed, so nothing else
    # of the model's generation_config.json applies.
    options = {
        "do_sample": False,
        "temperature": None,
        "top_k": None,
        "top_p": None,
        "repetition_penalty": repetition_penalty,
        "cache_implementation": "static",
    }
    if temperature:
        sampler = CandidateSampler(temperature, top_k, top_p, row_keys(seeds, model.device), ids.shape[1])
        options["logits_processor"] = LogitsProcessorList([sampler])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
        **options,
    )
    return [cut_at_stop(row, stop_ids) for row in out[:, ids.shape[1] :].tolist()]


def trim_host_memory() -> None:
    """Hand freed host memory back to the OS: glibc keeps the many small blocks a load frees (a quantized
    load makes thousands) in its heap, where the process's RSS still counts them."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc; other C libraries return memory on their own terms
        libc.malloc_trim(0)


def running_rows(prompts: int, part_cap: int | None) -> int:
    """Rows the hf loop decodes at a time: the batch size (a POOL-th of the largest part, `call_sizes`), so
    a small part (many ranks, few questions) still decodes as many rows as fit; without a cap a POOL-th."""
    return min(prompts, -(-part_cap // POOL)) if part_cap else -(-prompts // POOL)


class HFSampler:
    """The hf decode loop (or `generate` with a static cache) on a loaded model. It decodes `running` rows
    at a time, by default the batch size (`running_rows`). A batch that runs out of GPU memory
    is split in halves that keep their rows' seeds, so they draw the samples the whole batch would have."""

    def __init__(self, model, cache_implementation: str = "dynamic", running: int | None = None):
        self.model = model
        self.cache_implementation = cache_implementation
        self.running = running

    @classmethod
    def load(cls, model: TrainedModel, sampling, running: int | None = None) -> "HFSampler":
        """`model` as trained: through Axolotl's loader when it carries a cfg, else transformers + PEFT."""
        device = sampling_device()
        if model.cfg is not None:
            loaded = ready(load_axolotl_model(model, sampling.dtype), device)
        else:
            loaded = load_model(
                model.base_model,
                device,
                sampling.dtype,
                adapter=model.adapter,
                quantization=model.quantization,
            )
        LOG.info("UPFT: sampling from %s", describe(loaded))
        return cls(loaded, sampling.cache_implementation, running)

    def close(self) -> None:
        """Free the model (PEFT wrapper and quantized weights included), the graphs compiled for a static
        cache, and the CUDA cache, before training loads its own copy."""
        self.model = None
        if self.cache_implementation == "static":
            torch._dynamo.reset()  # compiled graphs hold the weights they were traced with
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trim_host_memory()

    def generate(
        self, prompts: list[list[int]], *, seeds: list[int], part_cap: int | None = None, **kwargs
    ) -> list[tuple[list[int], bool]]:
        try:
            running = self.running or running_rows(len(prompts), part_cap)
            return generate_batch(
                self.model,
                prompts,
                seeds=seeds,
                cache_implementation=self.cache_implementation,
                running=running,
                **kwargs,
            )
        except torch.cuda.OutOfMemoryError:
            if len(prompts) == 1:
                raise
        # Halved outside the `except` block (as accelerate's find_executable_batch_size): its traceback
        # held the failed batch's tensors, KV cache included, alive under both halves.
        gc.collect()
        torch.cuda.empty_cache()
        half = len(prompts) // 2
        LOG.warning(
            "UPFT: batch of %d ran out of GPU memory; splitting it (set upft.sampling.batch_size)",
            len(prompts),
        )
        return self.generate(prompts[:half], seeds=seeds[:half], part_cap=part_cap, **kwargs) + self.generate(
            prompts[half:], seeds=seeds[half:], part_cap=part_cap, **kwargs
        )


def vllm_sampling_params(
    seeds: list[int], *, max_new_tokens, stop_ids, temperature, top_p, top_k, repetition_penalty=1.0
) -> list[dict]:
    """`vllm.SamplingParams` keyword arguments of one request per seed: the hf backend's settings in vLLM's
    terms (no top-p is 1.0, no top-k is -1) and the request's own seed (loop.request_seed)."""
    return [
        {
            "n": 1,
            "temperature": temperature,
            "top_p": top_p if top_p is not None else 1.0,
            "top_k": top_k if top_k else -1,
            "repetition_penalty": repetition_penalty,
            "max_tokens": max_new_tokens,
            "stop_token_ids": sorted(stop_ids),
            "seed": seed,
            "detokenize": False,
        }
        for seed in seeds
    ]


# torchrun's variables: the engine's processes run a world of their own
TORCHRUN_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def engine_devices(visible: list[str], tensor_parallel_size: int, env=os.environ) -> list[str]:
    """This rank's engine devices among the node's `visible` ones: its group's (`engine_group`)."""
    from .distributed import engine_group, node_size

    group = engine_group(node_size(env), int(env.get("LOCAL_RANK", "0")), tensor_parallel_size)
    if group.devices[-1] >= len(visible):
        raise ValueError(
            f"upft.sampling.tensor_parallel_size: {tensor_parallel_size} on local rank "
            f"{env.get('LOCAL_RANK', '0')} needs devices {group.devices[0]}..{group.devices[-1]}, but this "
            f"node has {len(visible)} ({','.join(visible)}). Start fewer processes per node or lower "
            "tensor_parallel_size."
        )
    return [visible[i] for i in group.devices]


@contextmanager
def engine_environment(tensor_parallel_size: int):
    """The environment vLLM's engine processes inherit as they start: on GPUs, this rank's engine group's
    devices as CUDA_VISIBLE_DEVICES (else every rank's engine lands on the node's first GPU), never
    torchrun's variables (the engine is a world of its own, not a member of the ranks' group), and on CPU
    no core held back for this process (vLLM reserves one by default: half of a 2-core machine)."""
    saved = os.environ.copy()
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(
            str(i) for i in range(torch.cuda.device_count())
        )
        devices = engine_devices(visible.split(","), tensor_parallel_size)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    for key in TORCHRUN_VARIABLES:
        os.environ.pop(key, None)
    if sampling_device().type == "cpu":  # this process only waits while the engine samples: every core to it
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


LORA_ID = 1  # the one adapter each engine serves


def engine_options(model: TrainedModel, sampling, max_model_len: int | None) -> dict:
    """`vllm.LLM` keyword arguments from upft.sampling (resolved); null settings get this device's defaults.
    An adapter is served by vLLM's LoRA support, at the smallest max_lora_rank vLLM allows that holds it."""
    cpu = sampling_device().type == "cpu"
    options = {
        "model": model.base_model,
        "tensor_parallel_size": sampling.tensor_parallel_size,
        "dtype": sampling.dtype,
        # the model's generation_config.json sets no default, as in the hf backend
        "generation_config": "vllm",
        "max_model_len": max_model_len,
        "enforce_eager": cpu if sampling.enforce_eager is None else sampling.enforce_eager,
    }
    memory = sampling.gpu_memory_utilization or (VLLM_CPU_MEMORY_SHARE if cpu else None)
    if memory is not None:
        options["gpu_memory_utilization"] = memory
    if model.adapter is not None:
        options |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_rank(model.adapter)}
    if cpu:
        # vLLM 0.32's CPU worker dies on a seeded request whose prefill is split over steps ("CPU Generator
        # does not use offset"), so every prompt is prefilled whole there.
        options["enable_chunked_prefill"] = False
        options["max_num_batched_tokens"] = max(CPU_PREFILL_TOKENS, options["max_model_len"] or 0)
    return options


def lora_rank(adapter: str) -> int:
    """The smallest max_lora_rank vLLM allows that holds the adapter's largest rank."""
    from vllm.config.lora import MaxLoRARanks

    config = json.loads(Path(adapter, "adapter_config.json").read_text())
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    return min(r for r in typing.get_args(MaxLoRARanks) if r >= rank)


class VLLMSampler:
    """vLLM's offline engine on the model as trained: base weights (a pre-quantized checkpoint by its own
    config) plus any adapter through vLLM's LoRA support (`LoRARequest`). Every request carries its own seed
    (loop.request_seed). The engine runs in child processes, so `close` gives all of its memory back
    before training loads the model."""

    def __init__(self, model: TrainedModel, sampling, max_model_len: int | None = None):
        if not is_vllm_available():
            raise ImportError(VLLM_MISSING)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout stays the commands' output
        from vllm import LLM
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError

        options = engine_options(model, sampling, max_model_len)
        LOG.info("UPFT: starting vLLM for self-sampling: %s", options)
        self.llm = None
        self.lora = LoRARequest("upft", LORA_ID, model.adapter) if model.adapter else None
        try:
            with engine_environment(sampling.tensor_parallel_size):
                self.llm = LLM(**options)
            # some kernels (attention head sizes) are only refused at the first step: take it now
            self.generate(
                [[0]],
                max_new_tokens=1,
                stop_ids=frozenset(),
                temperature=0,
                top_p=None,
                top_k=None,
                seeds=[0],
            )
        except (RuntimeError, ValueError, NotImplementedError, EngineDeadError) as err:
            self.close()
            raise EngineRefused(
                f"upft.sampling.backend: vLLM could not run {model.base_model} ({err} Its log above has the "
                "cause.) Set upft.sampling.backend: hf to sample with the plugin's own decode loop instead, "
                "or change the vLLM setting the log names (upft.sampling.max_model_len, "
                "gpu_memory_utilization, dtype)."
            ) from err

    def generate(self, prompts, *, seeds: list[int], pad_id=None, part_cap=None, **options):
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(**kwargs) for kwargs in vllm_sampling_params(seeds, **options)]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        return [cut_at_stop(list(o.outputs[0].token_ids), frozenset(options["stop_ids"])) for o in outputs]

    def close(self) -> None:
        """Stop the engine's processes; their memory (weights, KV cache) goes with them."""
        llm, self.llm = self.llm, None
        if llm is not None:
            import multiprocessing

            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            multiprocessing.active_children()  # reaps the stopped engine process (no zombie left)


WEIGHT_BITS = {"bnb-4bit": 4, "bnb-8bit": 8}  # other checkpoints' own methods are counted as bnb 4-bit


def check_memory(model: TrainedModel, sampling, max_model_len: int | None) -> None:
    """Before anything loads on a GPU: the weights, one sequence of vLLM's context and its share must
    fit in the device's free memory (memory.check_sampler_memory names the keys that fix it). Larger hf
    batches are sized from memory (`memory_fits`) and halved on out-of-memory; vLLM schedules its own."""
    free_total = device_memory()
    config = local_config(model.base_model)
    if free_total is None or "hidden_size" not in config:
        return
    check_sampler_memory(
        config,
        model=model.base_model,
        weight_bits=WEIGHT_BITS.get(model.quantization, 4 if model.quantization else 16),
        rows=1,
        context=max_model_len or 1,  # the hf loop's batches are sized and halved by memory on their own
        backend=sampling.backend,
        free_bytes=free_total[0],
        total_bytes=free_total[1],
        tensor_parallel_size=sampling.tensor_parallel_size if sampling.backend == "vllm" else 1,
        gpu_memory_utilization=sampling.gpu_memory_utilization,
    )


class EngineRefused(ValueError):
    """vLLM's engine would not start (or take its first step) on the model with these settings."""


def load_sampler(model: TrainedModel, sampling, max_model_len: int | None = None):
    """The one sampler factory of sampling, eval and analyze, from upft.sampling resolved once
    (`resolve_sampling`); `max_model_len` is `engine_length`'s. With `backend: auto`, an engine that refuses
    the model at start falls back to the hf loop with one log line; `backend: vllm` keeps the error."""
    check_memory(model, sampling, max_model_len)
    if sampling.backend == "vllm":
        try:
            return VLLMSampler(model, sampling, max_model_len)
        except EngineRefused as err:
            if not sampling._auto:
                raise
            LOG.warning(
                "UPFT: backend auto: vLLM refused %s, sampling with the hf loop: %s", model.base_model, err
            )
    return HFSampler.load(model, sampling)
