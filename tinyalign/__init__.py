"""TinyAlign kit: train retrieval-augmented tiny vision-language models and ship them to devices.

The package root stays light (no torch import) so that the on-device runtime
(`tinyalign.runtime`) can be imported where torch is absent.
"""

__version__ = "0.1.0"
