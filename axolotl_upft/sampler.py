"""Self-sampling backends, token ids in and out: transformers `generate` (hf) and vLLM (vllm)."""

import importlib.util
import logging
import os

import torch

LOG = logging.getLogger(__name__)
AUTO_BATCH = {"cuda": 256, "cpu": 16}


def sampling_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def is_vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "vllm" if is_vllm_available() and torch.cuda.is_available() else "hf"
    return backend


def resolve_batch_size(batch_size: int | None, backend: str) -> int:
    if batch_size is not None:
        return batch_size
    if backend == "vllm":
        return 4096  # vLLM schedules its own batches; this only sizes the cache's part files
    return AUTO_BATCH[sampling_device().type]


def load_model(base_model: str, device: torch.device, **kwargs):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    LOG.info("UPFT: loading %s on %s (%s) for self-sampling", base_model, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, **kwargs)
    return model.to(device).eval()


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(row: list[int], stop_ids: frozenset[int]) -> tuple[list[int], bool]:
    for end, token in enumerate(row):
        if token in stop_ids:
            return row[: end + 1], True
    return row, False


@torch.inference_mode()
def generate_batch(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    pad_id: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seed: int,
) -> list[tuple[list[int], bool]]:
    """One sample per prompt: (generated ids up to and including the first stop id, stopped)."""
    ids, mask = left_pad(prompts, pad_id, model.device)
    torch.manual_seed(seed)
    options = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    if temperature:
        options |= {"top_p": top_p if top_p is not None else 1.0, "top_k": top_k or 0}
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


class HFSampler:
    """transformers `generate`; a batch that runs out of GPU memory is split in halves."""

    def __init__(self, base_model: str):
        self.model = load_model(base_model, sampling_device())

    def generate(self, prompts: list[list[int]], *, seed: int, **kwargs) -> list[tuple[list[int], bool]]:
        try:
            return generate_batch(self.model, prompts, seed=seed, **kwargs)
        except torch.cuda.OutOfMemoryError:
            if len(prompts) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(prompts) // 2
            LOG.warning("UPFT: batch of %d ran out of GPU memory; splitting it (set upft.sampling.batch_size)", len(prompts))
            return self.generate(prompts[:half], seed=seed + 1, **kwargs) + self.generate(
                prompts[half:], seed=seed + 2, **kwargs
            )


class VLLMSampler:
    """vLLM offline engine; every request carries its own seed (batch seed + position)."""

    def __init__(self, base_model: str, tensor_parallel_size: int):
        if not is_vllm_available():
            raise ImportError('upft.sampling.backend: vllm needs vLLM: pip install "axolotl-upft[vllm]"')
        from vllm import LLM

        self.llm = LLM(model=base_model, tensor_parallel_size=tensor_parallel_size, dtype="bfloat16")

    def generate(self, prompts, *, max_new_tokens, stop_ids, pad_id, temperature, top_p, top_k, seed):
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p if top_p is not None else 1.0,
                top_k=top_k if top_k else -1,
                max_tokens=max_new_tokens,
                stop_token_ids=sorted(stop_ids),
                seed=seed + i,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [cut_at_stop(list(o.outputs[0].token_ids), stop_ids) for o in outputs]


def load_sampler(base_model: str, backend: str, tensor_parallel_size: int = 1):
    if resolve_backend(backend) == "vllm":
        return VLLMSampler(base_model, tensor_parallel_size)
    return HFSampler(base_model)
