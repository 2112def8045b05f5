"""Sample-normalised loss math: every row weighs the same, as at micro-batch 1 (pure torch, no trainer)."""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .rows import IGNORE_INDEX


class RowNLL(NamedTuple):
    """Next-token NLL of a batch, for the rows that have at least one trained token."""

    row_mean_sum: torch.Tensor  # sum over rows of the row's mean NLL; carries the graph
    rows: torch.Tensor
    row_tokens: torch.Tensor  # [rows] trained tokens
    row_nll: torch.Tensor  # [rows] NLL summed over the row's trained tokens


def row_ids(position_ids: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Row id of every token: a row starts at each batch row and, when packed, wherever position_ids is 0."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, length], got shape {tuple(labels.shape)}")
    if position_ids is None:
        return torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    if position_ids.dim() != 2 or position_ids.shape[-1] != labels.shape[-1]:
        raise ValueError(
            f"position_ids of shape {tuple(position_ids.shape)} do not match labels {tuple(labels.shape)}"
        )
    starts = (position_ids == 0).expand_as(labels).clone()
    starts[:, 0] = True
    return starts.flatten().cumsum(0).view_as(labels) - 1


def _shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None):
    """HF causal-LM targets (labels[:, 1:] for logits[:, :-1]) and the row of each target."""
    ids = row_ids(position_ids, labels)
    # HF shifts across a whole packed sequence; a target that starts a row would be predicted from the
    # previous row. UPFT rows start with a masked prompt token, so this only guards other row layouts.
    targets = labels[:, 1:].masked_fill(ids[:, 1:] != ids[:, :-1], IGNORE_INDEX)
    return targets, ids[:, 1:]


def count_trained_rows(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rows with at least one trained next-token target: the denominator of the sample-mean loss."""
    targets, ids = _shifted_targets(labels, position_ids)
    has_target = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    return has_target.index_fill_(0, ids[targets != IGNORE_INDEX], True).sum()


def per_row_mean_nll(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> RowNLL:
    """Sum over rows of each row's mean next-token NLL, with per-row token counts and NLL sums."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    targets, ids = _shifted_targets(labels, position_ids)
    trained = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits[:, :-1][trained].float(), targets[trained], reduction="none")
    unique_rows, row = torch.unique(ids[trained], return_inverse=True)
    rows = unique_rows.numel()
    row_tokens = torch.bincount(row, minlength=rows)
    row_nll = nll.new_zeros(rows).index_add(0, row, nll)
    return RowNLL((row_nll / row_tokens).sum(), torch.tensor(rows, device=labels.device), row_tokens, row_nll)
