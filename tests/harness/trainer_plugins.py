"""Test-only plugins and trainers, listed in test configs by dotted name (tests/ on PYTHONPATH)."""

import sys

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin


class MarkedTrainer(AxolotlTrainer):
    """Keeps Axolotl's loss path (as MixLoRA's trainer does) and marks the training logs."""

    def log(self, logs, start_time=None):
        return super().log({**logs, "marked_by_plugin": 1.0}, start_time)


class OwnLossTrainer(AxolotlTrainer):
    """Computes a loss of its own from the logits, never calling Trainer.compute_loss (as KD's does)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("labels")
        outputs = model(**inputs)
        loss = outputs.logits.float().logsumexp(-1).mean()
        return (loss, outputs) if return_outputs else loss


class OldSignatureTrainer(AxolotlTrainer):
    """compute_loss as written before transformers 4.46, without num_items_in_batch."""

    def compute_loss(self, model, inputs, return_outputs=False):
        return super().compute_loss(model, inputs, return_outputs=return_outputs)


class MarkedTrainerPlugin(BasePlugin):
    def register(self, cfg):
        """Hides vLLM in the run's process, as in a venv without it: a config with no `upft:` block
        (`backend: auto`) then samples with the hf loop on the tests' tiny model, whose heads vLLM's CPU
        kernels refuse."""
        sys.modules["vllm"] = None  # importlib.util.find_spec("vllm") is None from here on

    def get_trainer_cls(self, cfg):
        return MarkedTrainer


class OwnLossTrainerPlugin(BasePlugin):
    def get_trainer_cls(self, cfg):
        return OwnLossTrainer
