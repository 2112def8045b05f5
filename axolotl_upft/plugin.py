"""Axolotl glue: the `upft:` args, `type: upft`, and the prepared-data hash."""

import logging
import os
import sys
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin

from .args import ARGS_PATH, UPFTConfig
from .cache import weight_files

HASHED_CFG_KEYS = ("upft", "base_model", "upft_model")  # upft_model: set by load_datasets
LOG = logging.getLogger(__name__)


class UPFTPlugin(BasePlugin):
    """Unsupervised Prefix Fine-Tuning: self-sampled prefixes as an Axolotl dataset type."""

    _started = 0.0
    _trained = False

    def get_input_args(self) -> str:
        return ARGS_PATH

    def register(self, cfg):
        self._started = time.time()
        from axolotl.utils.data import shared

        from . import dataset

        sys.modules.setdefault("axolotl.prompt_strategies.upft", dataset)
        # Axolotl's prepared-data hash ignores plugin keys; UPFT rows depend on these.
        missing = tuple(k for k in HASHED_CFG_KEYS if k not in shared.DATASET_HASH_CONFIG_EXTRA_FIELDS)
        shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = shared.DATASET_HASH_CONFIG_EXTRA_FIELDS + missing

    def load_datasets(self, cfg, preprocess: bool = False):
        """Runs before Axolotl hashes and loads the data: the sampled model's identity (the sample cache
        key's files, sizes and dates, or a hub id's revision; its quantization and adapter) joins the
        hash, so changed weights rebuild the rows."""
        if cfg.get("upft") is not None:
            from .selfsample import model_fingerprint
            from .trained import TrainedModel

            sampled = TrainedModel.from_cfg(cfg, UPFTConfig.from_cfg(cfg).sampling)
            cfg["upft_model"] = {"model": model_fingerprint(cfg.base_model), **sampled.key()}

    def get_trainer_cls(self, cfg):
        """`upft.loss_normalization: sample` (the default): every row weighs the same, as at micro-batch 1."""
        if cfg.get("upft") is None or cfg.rl or cfg.reward_model or cfg.process_reward_model:
            return None
        upft = UPFTConfig.from_cfg(cfg)
        if upft.loss_normalization == "token":
            return None
        from axolotl.core.trainers.base import AxolotlTrainer
        from axolotl.utils.import_helper import get_cls_from_module_str

        from .trainer import sample_normalized_trainer

        # Axolotl's own SFT choice (core/builders/causal.py): cfg.trainer_cls, else AxolotlTrainer.
        base = get_cls_from_module_str(cfg.trainer_cls) if cfg.trainer_cls else AxolotlTrainer
        return sample_normalized_trainer(base, prefix_length=upft.prefix_length)

    def post_train(self, cfg, model):
        self._trained = True

    def post_train_unload(self, cfg):
        """`upft.eval_after_train`: greedy accuracy of what this run saved, once the trainer is freed."""
        if cfg.get("upft") is None or int(os.environ.get("RANK", "0")) != 0 or not self._trained:
            return
        upft = UPFTConfig.from_cfg(cfg)
        out = Path(cfg.output_dir)
        # Unload also runs after a failed save: weights left by an earlier run must not be evaluated.
        saved = weight_files(out)
        if not upft.eval_after_train or not any(p.stat().st_mtime >= self._started for p in saved):
            return
        from .dataset import config_chat_format
        from .evaluate import evaluate

        chat = config_chat_format(cfg)  # the prompts this run trained on
        adapter = str(out) if cfg.adapter else None
        model_path = cfg.base_model if adapter else str(out)
        for benchmark in upft.eval_after_train:
            summary = evaluate(
                model_path,
                benchmark,
                adapter=adapter,
                output_dir=out / "eval",
                system_prompt=upft.system_prompt,
                max_new_tokens=upft.sampling.max_new_tokens,
                chat=chat,
                backend=upft.sampling.backend,
            )
            LOG.info("UPFT eval %s: %.1f%% of %d", benchmark, summary["accuracy"], summary["n"])
