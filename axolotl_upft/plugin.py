"""Axolotl glue: the `upft:` args, `type: upft`, and the prepared-data hash."""

import os
import sys
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin

from .args import ARGS_PATH, UPFTConfig
from .cache import weight_files
from .inputs import check_inputs
from .logs import get_logger

HASHED_CFG_KEYS = ("upft", "base_model", "upft_model")  # upft_model: set by load_datasets
LOG = get_logger(__name__)


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
        check_inputs(cfg)
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
        """`upft.eval_after_train`: greedy accuracy of what this run saved, in a child process: this one may
        still hold the trained model (Axolotl only drops its names), and vLLM needs the device's memory."""
        if cfg.get("upft") is None or int(os.environ.get("RANK", "0")) != 0 or not self._trained:
            return
        upft = UPFTConfig.from_cfg(cfg)
        out = Path(cfg.output_dir)
        # Unload also runs after a failed save: weights left by an earlier run must not be evaluated.
        saved = weight_files(out)
        if not upft.eval_after_train or not any(p.stat().st_mtime >= self._started for p in saved):
            return
        import multiprocessing

        from .evaluate import check_adapter

        check_adapter(saved_model(cfg)[1])  # a sentence here, before a child process starts

        child = multiprocessing.get_context("spawn").Process(target=evaluate_saved, args=(cfg,))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(
                f"upft.eval_after_train: the evaluation of {out} failed (exit code {child.exitcode}; the "
                "error is above). The model is saved: evaluate it with "
                "`axolotl-upft eval --config <this config>`."
            )


def saved_model(cfg) -> tuple[str, str | None]:
    """(model, adapter) a run saved in output_dir: base_model + the adapter, or the full model."""
    if cfg.adapter:
        return cfg.base_model, str(cfg.output_dir)
    return str(cfg.output_dir), None


def evaluate_saved(cfg) -> None:
    """upft.eval_after_train's benchmarks on what the run saved, with the config's prompts and upft.sampling
    (the rule of `eval --config`: `evaluate.eval_sampling`)."""
    from axolotl.logging_config import configure_logging

    from .dataset import config_chat_format
    from .evaluate import eval_fields, evaluate

    configure_logging()
    upft = UPFTConfig.from_cfg(cfg)
    chat = config_chat_format(cfg)  # the prompts this run trained on
    model_path, adapter = saved_model(cfg)
    for benchmark in upft.eval_after_train:
        summary = evaluate(
            model_path,
            benchmark,
            adapter=adapter,
            output_dir=Path(cfg.output_dir) / "eval",
            system_prompt=upft.system_prompt,
            chat=chat,
            sampling=upft.sampling,
            **eval_fields(benchmark, upft),
        )
        LOG.info("UPFT eval %s: %.1f%% of %d", benchmark, summary["accuracy"], summary["n"])
