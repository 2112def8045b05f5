"""Axolotl glue: the `upft:` args, `type: upft`, and the prepared-data hash."""

import sys

from axolotl.integrations.base import BasePlugin, PluginManager

HASHED_CFG_KEYS = ("upft", "base_model")


class UPFTPlugin(BasePlugin):
    """Unsupervised Prefix Fine-Tuning: self-sampled prefixes as an Axolotl dataset type."""

    def get_input_args(self) -> str:
        return "axolotl_upft.args.UPFTArgs"

    def register(self, cfg):
        from axolotl.utils.data import shared

        from . import dataset

        sys.modules.setdefault("axolotl.prompt_strategies.upft", dataset)
        # Axolotl's prepared-data hash ignores plugin keys; UPFT rows depend on these.
        missing = tuple(k for k in HASHED_CFG_KEYS if k not in shared.DATASET_HASH_CONFIG_EXTRA_FIELDS)
        shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = shared.DATASET_HASH_CONFIG_EXTRA_FIELDS + missing


def plugin_is_registered() -> bool:
    return any(isinstance(p, UPFTPlugin) for p in PluginManager.get_instance().plugins.values())
