"""Self-sampling with transformers `generate`: batched, left-padded, seeded, token ids in and out."""

import logging

import torch

LOG = logging.getLogger(__name__)


def sampling_device() -> torch.device:
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


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
    if temperature and top_p is not None:
        options["top_p"] = top_p
    if temperature and top_k is not None:
        options["top_k"] = top_k
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
        **options,
    )
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        for end, token in enumerate(row):
            if token in stop_ids:
                results.append((row[: end + 1], True))
                break
        else:
            results.append((row, False))
    return results
