"""The plugin's loggers: under Axolotl's configured `axolotl` namespace, so their lines show in Axolotl's
console format, on the main process only (Axolotl's own `get_logger`), as its integrations log."""

NAMESPACE = "axolotl.integrations.upft"


def get_logger(module: str):
    """`axolotl_upft.dataset` logs as `axolotl.integrations.upft.dataset`."""
    from axolotl.utils.logging import get_logger as axolotl_logger

    return axolotl_logger(f"{NAMESPACE}.{module.rpartition('.')[2]}")
