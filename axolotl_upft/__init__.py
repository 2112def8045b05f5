"""Unsupervised Prefix Fine-Tuning (UPFT) for Axolotl."""

__all__ = ["UPFTPlugin"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "UPFTPlugin":
        from .plugin import UPFTPlugin

        return UPFTPlugin
    raise AttributeError(f"module 'axolotl_upft' has no attribute {name!r}")
