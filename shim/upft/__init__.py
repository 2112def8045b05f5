"""`plugins: [upft.UPFTPlugin]`: Axolotl looks for unknown plugin modules under axolotl.integrations."""

from axolotl_upft.plugin import UPFTPlugin

__all__ = ["UPFTPlugin"]
