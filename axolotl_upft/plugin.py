"""Axolotl glue: the `upft:` args, `type: upft`, and the prepared-data hash."""

import logging
import os
import sys
from pathlib import Path

from axolotl.integrations.base import BasePlugin, PluginManager

HASHED_CFG_KEYS = ("upft", "base_model")
SAVED_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
LOG = logging.getLogger(__name__)


class UPFTPlugin(BasePlugin):
    """Unsupervised Prefix Fine-Tuning: self-sampled prefixes as an Axolotl dataset type."""

    _evaluated = False

    def get_input_args(self) -> str:
        return "axolotl_upft.args.UPFTArgs"

    def register(self, cfg):
        from axolotl.utils.data import shared

        from . import dataset

        sys.modules.setdefault("axolotl.prompt_strategies.upft", dataset)
        # Axolotl's prepared-data hash ignores plugin keys; UPFT rows depend on these.
        missing = tuple(k for k in HASHED_CFG_KEYS if k not in shared.DATASET_HASH_CONFIG_EXTRA_FIELDS)
        shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = shared.DATASET_HASH_CONFIG_EXTRA_FIELDS + missing

    def get_trainer_cls(self, cfg):
        """`upft.loss_normalization: sample` (the default): every row weighs the same, as at micro-batch 1."""
        if cfg.get("upft") is None or cfg.rl or cfg.reward_model or cfg.process_reward_model:
            return None
        from .dataset import upft_config

        upft = upft_config(cfg)
        if upft.loss_normalization == "token":
            return None
        if (cfg.context_parallel_size or 1) > 1 or (cfg.tensor_parallel_size or 1) > 1:
            raise ValueError(
                "upft.loss_normalization: sample needs whole rows on each rank: drop context_parallel_size / "
                "tensor_parallel_size or set upft.loss_normalization: token"
            )
        from axolotl.core.trainers.base import AxolotlTrainer
        from axolotl.utils.import_helper import get_cls_from_module_str

        from .loss import sample_normalized_trainer

        # Axolotl's own SFT choice (core/builders/causal.py): cfg.trainer_cls, else AxolotlTrainer.
        base = get_cls_from_module_str(cfg.trainer_cls) if cfg.trainer_cls else AxolotlTrainer
        return sample_normalized_trainer(base, prefix_length=upft.prefix_length)

    def post_train(self, cfg, model):
        """`upft.eval_after_train`: greedy accuracy of the saved model, on the main process."""
        if cfg.get("upft") is None or int(os.environ.get("RANK", 0)) != 0:
            return
        from .dataset import upft_config

        upft = upft_config(cfg)
        out = Path(cfg.output_dir)
        saved = any((out / name).exists() for name in SAVED_WEIGHTS)
        # Axolotl calls post_train twice, before and after saving: evaluate once, what was saved.
        if not upft.eval_after_train or not saved or self._evaluated:
            return
        from .evaluate import evaluate

        self._evaluated = True
        adapter = str(out) if cfg.adapter else None
        model_path = cfg.base_model if adapter else str(out)
        for benchmark in upft.eval_after_train:
            summary = evaluate(
                model_path, benchmark, adapter=adapter, output_dir=out / "eval",
                system_prompt=upft.system_prompt, max_new_tokens=upft.sampling.max_new_tokens,
            )
            LOG.info("UPFT eval %s: %.1f%% of %d", benchmark, summary["accuracy"], summary["n"])


def plugin_is_registered() -> bool:
    return any(isinstance(p, UPFTPlugin) for p in PluginManager.get_instance().plugins.values())
