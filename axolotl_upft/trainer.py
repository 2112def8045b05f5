"""The trainer side of `upft.loss_normalization: sample`: a mixin over Axolotl's (or any HF) Trainer."""

import inspect

import torch

from .loss import RowNLL, count_trained_rows, per_row_mean_nll

FIX = "or set upft.loss_normalization: token"


class SampleNormalizedMixin:
    """The reference loss: mean over rows of each row's mean NLL.

    The row count spans every micro-batch of the optimizer step and every rank, so packing, padding,
    gradient accumulation and data parallelism all give the micro-batch-1 gradient. Per-kind losses and
    token counts (`upft/prefix_loss`, ...) join the training logs.
    """

    upft_prefix_length = 32
    upft_base_owner = "Axolotl"  # who supplied the trainer class under the mixin, for error messages

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._upft_position_ids = None
        self._upft_window = None
        self._upft_logged_step = 0
        self._upft_check()
        # HF's own hook: it runs the model without labels, keeps Axolotl's compute_loss around it,
        # and scales the loss by world size when averaging across devices.
        self.compute_loss_func = self._upft_row_mean_loss
        self.loss_is_scaled_for_ga = True

    def _upft_check(self):
        """Everything that would change the loss or split a row: the one place these are refused."""
        if self.compute_loss_func is not None:
            raise ValueError(
                f"upft.loss_normalization: sample replaces the loss, but another loss is set "
                f"({self.compute_loss_func!r}, e.g. use_eaft or use_dft): drop it {FIX}"
            )
        if self.label_smoother is not None:
            raise ValueError(
                f"upft.loss_normalization: sample has no label smoothing: drop label_smoothing_factor {FIX}"
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"upft.loss_normalization: sample needs one GPU per process: launch with accelerate {FIX}"
            )
        if self.get_tp_size() * self.get_cp_size() * self.get_sp_size() > 1:
            raise ValueError(
                "upft.loss_normalization: sample cannot see rows split over tensor-, context- or "
                "sequence-parallel "
                f"ranks: drop tensor_parallel_size / context_parallel_size / sequence parallelism {FIX}"
            )

    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        rows = torch.stack(
            [count_trained_rows(b["labels"], b.get("position_ids")).to(device) for b in batch_samples]
        ).sum()
        if self.args.world_size > 1:
            rows = self.accelerator.gather(rows).sum()
        return rows

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # compute_loss_func only receives (outputs, labels): the row boundaries travel here.
        self._upft_position_ids = inputs.get("position_ids")
        self._upft_applied = False
        labelled = "labels" in inputs
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            self._upft_position_ids = None
        if labelled and not self._upft_applied:
            raise ValueError(
                f"{self.upft_base_owner} supplies the trainer {type(self).__bases__[-1].__name__}, whose "
                "compute_loss computes a loss of its own, so upft.loss_normalization: sample (of "
                f"axolotl_upft.UPFTPlugin) cannot apply: use one of the two {FIX}"
            )
        return result

    def _upft_row_mean_loss(self, outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise ValueError("upft.loss_normalization: sample needs labels in every batch")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if logits is None:
            raise RuntimeError("the model returned no logits; upft.loss_normalization: sample needs them")
        stats = per_row_mean_nll(logits, labels, self._upft_position_ids)
        self._upft_applied = True
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


def check_compute_loss(cls: type, owner: str) -> None:
    """Refuse a trainer whose compute_loss has the pre-4.46 signature: transformers passes
    `num_items_in_batch` at every step, so it would fail at step 1, after sampling and model loading."""
    params = inspect.signature(cls.compute_loss).parameters
    if "num_items_in_batch" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    raise ValueError(
        f"{owner}: {cls.__module__}.{cls.__name__}.compute_loss{inspect.signature(cls.compute_loss)} "
        "has no num_items_in_batch parameter, which transformers passes at every training step. "
        "Add `num_items_in_batch=None` to its signature and pass it on to super().compute_loss."
    )


def sample_normalized_trainer(base: type, *, prefix_length: int, owner: str = "Axolotl") -> type:
    """`base` with the sample-normalised loss, composed as Axolotl composes its trainers from mixins.
    `owner` (the plugin or key that chose `base`) is named when `base` turns out to compute its own loss."""
    check_compute_loss(base, owner)
    attrs = {"upft_prefix_length": prefix_length, "upft_base_owner": owner}
    return type(f"UPFT{base.__name__}", (SampleNormalizedMixin, base), attrs)
