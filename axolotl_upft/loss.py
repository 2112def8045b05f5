"""Sample-normalised loss (every row weighs the same, as at micro-batch 1) and the trainer that applies it."""

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LossNormalization = Literal["sample", "token"]


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


def sample_normalized_trainer(
    base_cls: type, *, prefix_length: int, loss_normalization: LossNormalization = "sample"
) -> type:
    """Subclass a Trainer class so `sample` gives the reference loss: mean over rows of each row's mean NLL.

    The row count spans every micro-batch of the optimizer step and every rank, so packing, padding,
    gradient accumulation and data parallelism all give the micro-batch-1 gradient. `token` changes nothing.
    """
    if loss_normalization not in ("sample", "token"):
        raise ValueError(f"upft.loss_normalization must be 'sample' or 'token', got {loss_normalization!r}")

    class UPFTTrainer(base_cls):
        upft_prefix_length = prefix_length
        upft_loss_normalization = loss_normalization

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._upft_position_ids = None
            self._upft_window = None
            self._upft_logged_step = 0
            if self.upft_loss_normalization == "sample":
                self._upft_check_sample_mode()
                # HF's own hook: it runs the model without labels, keeps Axolotl's compute_loss around it,
                # and scales the loss by world size when averaging across devices.
                self.compute_loss_func = self._upft_row_mean_loss
                self.loss_is_scaled_for_ga = True

        def _upft_check_sample_mode(self):
            fix = "or set upft.loss_normalization: token"
            if self.compute_loss_func is not None:
                raise ValueError(
                    f"upft.loss_normalization: sample replaces the loss, but another loss is set "
                    f"({self.compute_loss_func!r}, e.g. use_eaft or use_dft): drop it {fix}"
                )
            if self.label_smoother is not None:
                raise ValueError(
                    f"upft.loss_normalization: sample has no label smoothing: "
                    f"drop label_smoothing_factor {fix}"
                )
            if self.args.n_gpu > 1:
                raise ValueError(
                    f"upft.loss_normalization: sample needs one GPU per process: launch with accelerate {fix}"
                )
            if self.get_tp_size() * self.get_cp_size() * self.get_sp_size() > 1:
                raise ValueError(
                    f"upft.loss_normalization: sample cannot see rows split over tensor-, context- or "
                    f"sequence-parallel ranks: drop that parallelism {fix}"
                )

        def _get_num_items_in_batch(self, batch_samples, device):
            if self.upft_loss_normalization != "sample":
                return super()._get_num_items_in_batch(batch_samples, device)
            if not batch_samples or "labels" not in batch_samples[0]:
                return None
            rows = torch.stack(
                [count_trained_rows(b["labels"], b.get("position_ids")).to(device) for b in batch_samples]
            ).sum()
            if self.args.world_size > 1:
                rows = self.accelerator.gather(rows).sum()
            return rows

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.upft_loss_normalization != "sample":
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            # compute_loss_func only receives (outputs, labels): the row boundaries travel here.
            self._upft_position_ids = inputs.get("position_ids")
            try:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            finally:
                self._upft_position_ids = None

        def _upft_row_mean_loss(self, outputs, labels, num_items_in_batch=None):
            if labels is None:
                raise ValueError("upft.loss_normalization: sample needs labels in every batch")
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            if logits is None:
                raise RuntimeError("the model returned no logits; upft.loss_normalization: sample needs them")
            stats = per_row_mean_nll(logits, labels, self._upft_position_ids)
            if self.model.training:
                self._upft_record(stats)
            if num_items_in_batch is None:
                return stats.row_mean_sum / stats.rows.clamp(min=1)
            loss = stats.row_mean_sum / torch.as_tensor(num_items_in_batch, device=logits.device).clamp(min=1)
            if self.args.world_size > 1 and not self.args.average_tokens_across_devices:
                # The row count is global; HF multiplies by the world size (undoing DDP's gradient mean)
                # only when average_tokens_across_devices is on, and Axolotl turns it off.
                loss = loss * self.args.world_size
            return loss

        def _upft_record(self, stats: RowNLL):
            # A row is a prefix row when it trains at most k tokens + EOS. A full trace that short
            # (or a prefix cut at sequence_len) is misfiled; the rows carry no kind of their own.
            prefix = (stats.row_tokens <= self.upft_prefix_length + 1).double()
            full = 1 - prefix
            mean = (stats.row_nll / stats.row_tokens).detach().double()
            tokens = stats.row_tokens.double()
            sums = torch.stack(
                [
                    *((mean * prefix).sum(), prefix.sum(), (tokens * prefix).sum()),
                    *((mean * full).sum(), full.sum(), (tokens * full).sum()),
                ]
            )
            self._upft_window = sums if self._upft_window is None else self._upft_window + sums

        def _upft_metrics(self) -> dict[str, float]:
            totals = self.accelerator.reduce(self._upft_window, reduction="sum").tolist()
            steps = max(self.state.global_step - self._upft_logged_step, 1)
            self._upft_window = None
            self._upft_logged_step = self.state.global_step
            prefix_loss, prefix_rows, prefix_tokens, full_loss, full_rows, full_tokens = totals
            metrics = {"upft/prefix_tokens": prefix_tokens / steps, "upft/full_tokens": full_tokens / steps}
            if prefix_rows:
                metrics["upft/prefix_loss"] = prefix_loss / prefix_rows
            if full_rows:
                metrics["upft/full_loss"] = full_loss / full_rows
            return metrics

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Every rank logs the training loss at the same step, so the reduce in _upft_metrics is safe.
            if "loss" in logs and self._upft_window is not None:
                logs = {**logs, **self._upft_metrics()}
            return super().log(logs, start_time)

    UPFTTrainer.__name__ = UPFTTrainer.__qualname__ = f"UPFT{base_cls.__name__}"
    return UPFTTrainer
