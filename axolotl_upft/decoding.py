"""The hf backend's decode loop: a pool of prompts decoded a running batch at a time, where a row that stops
leaves the batch and its KV cache at once and the next prompt takes its place (continuous batching).

transformers `generate` keeps computing every row of a batch until its longest row ends, and its
DynamicCache copies the whole cache at each step (`torch.cat`); here finished rows leave, new ones are
prefilled and merged in, and the cache grows in place (GrowingLayer).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW = 128  # positions of spare room a GrowingLayer allocates at a time


def left_pad(
    prompts: list[list[int]], pad_id: int, device, width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(width, *(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with GROW positions of spare room, so a
    decode step writes one position in place instead of copying the whole layer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            return self.keys, self.values
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self.buffers[0].shape[-2]:
            self.assign(self.keys, self.values)
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., length : length + new, :] = states
        self.keys, self.values = (b[..., : length + new, :] for b in self.buffers)
        return self.keys, self.values

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy keys and values into fresh buffers with room for GROW more positions."""
        self.buffers = []
        for states in (keys, values):
            shape = (*states.shape[:-2], states.shape[-2] + GROW, states.shape[-1])
            buffer = states.new_empty(shape)
            buffer[..., : states.shape[-2], :] = states
            self.buffers.append(buffer)
        self.keys, self.values = (b[..., : keys.shape[-2], :] for b in self.buffers)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.assign(self.keys[indices], self.values[indices])


def growing_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise NotImplementedError("the hf decode loop handles full-attention KV caches only")
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


@dataclass
class Running:
    """The rows being decoded: their prompt (pool index), attention mask, last position, ids so far
    (padded with each row's first prompt id, for a repetition penalty), tokens generated, next logits."""

    rows: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    ids: torch.Tensor
    steps: torch.Tensor
    logits: torch.Tensor
    cache: DynamicCache

    def select(self, keep: torch.Tensor) -> None:
        """Keep these rows only, and drop the leading positions that none of them attends to."""
        self.cache.batch_select_indices(keep)
        self.rows, self.mask, self.positions = self.rows[keep], self.mask[keep], self.positions[keep]
        self.ids, self.steps, self.logits = self.ids[keep], self.steps[keep], self.logits[keep]
        start = int(self.mask.any(0).int().argmax())
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.assign(layer.keys[..., start:, :], layer.values[..., start:, :])

    def merge(self, other: "Running") -> None:
        """Append other's rows, left-padding the narrower of the two masks and caches."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        ids_width = max(self.ids.shape[1], other.ids.shape[1])
        self.mask = torch.cat([pad_left(self.mask, width, 0), pad_left(other.mask, width, 0)])
        self.ids = torch.cat([pad_ids(self.ids, ids_width), pad_ids(other.ids, ids_width)])
        for name in ("rows", "positions", "steps", "logits"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.assign(
                torch.cat([pad_left(mine.keys, width, 0.0, -2), pad_left(theirs.keys, width, 0.0, -2)]),
                torch.cat([pad_left(mine.values, width, 0.0, -2), pad_left(theirs.values, width, 0.0, -2)]),
            )


def pad_left(tensor: torch.Tensor, width: int, value, dim: int = -1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)


def pad_ids(ids: torch.Tensor, width: int) -> torch.Tensor:
    """Ids left-padded with each row's first id, which a repetition penalty counts once either way."""
    return torch.cat([ids[:, :1].expand(-1, width - ids.shape[1]), ids], dim=1)


def prefill(model, prompts: list[list[int]], rows: list[int], pad_id: int) -> Running:
    ids, mask = left_pad(prompts, pad_id, model.device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = growing_cache(model.config)
    logits = (
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        .logits[:, -1]
        .float()
    )
    firsts = torch.tensor([p[0] for p in prompts], device=ids.device)[:, None]
    ids = torch.where(mask.bool(), ids, firsts)
    steps = torch.zeros(len(prompts), dtype=torch.long, device=ids.device)
    return Running(torch.tensor(rows, device=ids.device), mask, positions[:, -1:], ids, steps, logits, cache)


@torch.inference_mode()
def decode_pool(
    model,
    prompts: list[list[int]],
    *,
    running: int,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    pad_id: int,
    pick: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[list[int]]:
    """Each prompt's generated ids (a stop id ends them), decoding at most `running` rows at a time, in
    prompt order. `pick(ids, logits, rows, steps)` turns each row's ids so far and next-token logits into
    its token; `rows` name the rows' prompts (indices into `prompts`) and `steps` count the tokens each has
    generated, since rows join the batch at different steps (a seeded draw per row needs both)."""
    device = model.device
    stops = torch.tensor(sorted(stop_ids), device=device)
    out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    batch, queued = None, 0
    while batch is not None or queued < len(prompts):
        free = running - (0 if batch is None else len(batch.rows))
        if free and queued < len(prompts):
            take = list(range(queued, min(len(prompts), queued + free)))
            new = prefill(model, [prompts[i] for i in take], take, pad_id)
            queued += len(take)
            batch = new if batch is None else batch
            if new is not batch:
                batch.merge(new)
        token = pick(batch.ids, batch.logits, batch.rows, batch.steps)
        out[batch.rows, batch.steps] = token
        batch.steps += 1
        keep = (~torch.isin(token, stops) & (batch.steps < max_new_tokens)).nonzero().squeeze(-1)
        if len(keep) == 0:
            batch = None
            continue
        if len(keep) < len(batch.rows):
            batch.select(keep)
            token = token[keep]
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(token), 1)], dim=-1)
        batch.positions = batch.positions + 1
        batch.ids = torch.cat([batch.ids, token[:, None]], dim=-1)
        batch.logits = (
            model(
                input_ids=token[:, None],
                attention_mask=batch.mask,
                position_ids=batch.positions,
                past_key_values=batch.cache,
                use_cache=True,
            )
            .logits[:, -1]
            .float()
        )
    return out.tolist()
