"""Axolotl glue: the `upft:` args, `type: upft`, and the prepared-data hash."""

import os
import sys
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin, PluginManager

from .args import ARGS_PATH, UPFTConfig, misplaced_keys, uses_upft
from .cache import weight_files
from .inputs import check_inputs
from .logs import get_logger

HASHED_CFG_KEYS = ("upft", "base_model", "upft_model")  # upft_model: set by register
LOG = get_logger(__name__)


class UPFTPlugin(BasePlugin):
    """Unsupervised Prefix Fine-Tuning: self-sampled prefixes as an Axolotl dataset type."""

    _started = 0.0
    _trained = False

    def get_input_args(self) -> str:
        return ARGS_PATH

    def register(self, cfg):
        """Runs on the raw config, before Axolotl validates it, in every command and in scripts that call
        load_cfg: the checks that must come before any sampling, and the model's fingerprint."""
        self._started = time.time()
        from axolotl.utils.data import shared

        from . import dataset

        sys.modules.setdefault("axolotl.prompt_strategies.upft", dataset)
        # Axolotl's prepared-data hash ignores plugin keys; UPFT rows depend on these.
        missing = tuple(k for k in HASHED_CFG_KEYS if k not in shared.DATASET_HASH_CONFIG_EXTRA_FIELDS)
        shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = shared.DATASET_HASH_CONFIG_EXTRA_FIELDS + missing
        self._ask_first()
        refuse_misplaced_keys(cfg)
        if uses_upft(cfg):
            cfg["upft"] = cfg.get("upft") or {}  # no block means the defaults, for every hook alike
            if cfg.get("trainer_cls"):
                check_trainer_cls(cfg.trainer_cls)
            cfg["upft_model"] = hashed_fingerprint(cfg)

    def _ask_first(self):
        """Axolotl takes the first plugin's trainer; UPFT composes its loss over another plugin's trainer
        (get_trainer_cls), so it is asked first."""
        plugins = PluginManager.get_instance().plugins
        name = next((name for name, plugin in plugins.items() if plugin is self), None)
        if name is not None:
            plugins.move_to_end(name, last=False)

    def load_datasets(self, cfg, preprocess: bool = False):
        """Runs on every rank before Axolotl loads the data: local question files and cache_dir are checked,
        then every GPU samples (`workers.sample_first`), so Axolotl, which prepares data on one process,
        builds its rows from the complete cache. None: Axolotl's own loading goes on."""
        from .workers import sample_first

        check_inputs(cfg)
        sample_first(cfg)

    def get_trainer_cls(self, cfg):
        """`upft.loss_normalization: sample` (the default): every row weighs the same, as at micro-batch 1."""
        if cfg.get("upft") is None or cfg.rl or cfg.reward_model or cfg.process_reward_model:
            return None
        upft = UPFTConfig.from_cfg(cfg)
        if upft.loss_normalization == "token":
            return None
        from .trainer import sample_normalized_trainer

        base, owner = self._base_trainer(cfg)
        return sample_normalized_trainer(base, prefix_length=upft.prefix_length, owner=owner)

    def _base_trainer(self, cfg) -> tuple[type, str]:
        """Axolotl's own SFT choice (core/builders/causal.py): another plugin's trainer, else
        cfg.trainer_cls, else AxolotlTrainer; with who chose it."""
        from axolotl.core.trainers.base import AxolotlTrainer
        from axolotl.utils.import_helper import get_cls_from_module_str

        others = {
            name: trainer
            for name, plugin in PluginManager.get_instance().plugins.items()
            if not isinstance(plugin, UPFTPlugin) and (trainer := plugin.get_trainer_cls(cfg)) is not None
        }
        if len(others) > 1:
            raise ValueError(
                f"plugins {', '.join(others)} each supply a trainer; UPFT composes its loss over one at "
                "most. Keep one of them, or set upft.loss_normalization: token."
            )
        if others:
            ((name, trainer),) = others.items()
            return trainer, f"plugin {name}"
        if cfg.trainer_cls:
            return get_cls_from_module_str(cfg.trainer_cls), f"trainer_cls: {cfg.trainer_cls}"
        return AxolotlTrainer, "Axolotl"

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
    from .trained import eval_quantization

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
            quantization=eval_quantization(cfg, upft.sampling, model_path),
            **eval_fields(benchmark, upft),
        )
        LOG.info("UPFT eval %s: %.1f%% of %d", benchmark, summary["accuracy"], summary["n"])


def refuse_misplaced_keys(cfg) -> None:
    """A `upft:` setting written at the top level would be dropped by Axolotl's validation, and the run
    would sample with the default instead."""
    from axolotl.integrations.config import merge_input_args

    _, config = merge_input_args()  # Axolotl's keys and every registered plugin's
    known = set(config.model_fields) | {f.alias for f in config.model_fields.values() if f.alias}
    misplaced = misplaced_keys(cfg, known)
    if misplaced:
        moves = "; ".join(f"`{key}:` -> `{place}`" for key, place in misplaced.items())
        raise ValueError(
            f"{', '.join(misplaced)}: not Axolotl keys but `upft:` settings, which Axolotl would drop. "
            f"Indent them under the `upft:` block: {moves}."
        )


def check_trainer_cls(name: str) -> None:
    """`trainer_cls` is imported and checked at start-up, before any sampling or model loading."""
    from axolotl.utils.import_helper import get_cls_from_module_str

    from .trainer import check_compute_loss

    try:
        trainer = get_cls_from_module_str(name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"trainer_cls: {name} cannot be imported ({err}); fix the dotted path") from None
    check_compute_loss(trainer, f"trainer_cls: {name}")


def hashed_fingerprint(cfg) -> dict | None:
    """The sampled model's identity for the prepared-data hash: the base's fingerprint, its quantization and
    adapter. A hub id whose revision cannot be resolved now (offline, not downloaded yet) is hashed by its
    name; loading the model needs it resolved anyway."""
    from .cache import model_fingerprint
    from .trained import TrainedModel

    base_model = cfg.get("base_model")
    if not base_model:
        return None
    try:
        sampled = TrainedModel.from_cfg(cfg, UPFTConfig.from_cfg(cfg).sampling)
        return {"model": model_fingerprint(base_model), **sampled.key()}
    except OSError as err:
        LOG.warning("UPFT: %s: no revision resolved (%s); prepared rows keyed by its name", base_model, err)
        return {"name": base_model, "revision": None}
