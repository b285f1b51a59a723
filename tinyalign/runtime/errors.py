"""The runtime's user errors. Each message says what is wrong and what to do.

`ImageError` (an unusable image) comes from `tinyalign.images` and is re-exported here, so a
caller can catch everything the runtime raises for bad input from one module.
"""

from __future__ import annotations

from tinyalign.images import ImageError

__all__ = ["BundleError", "ProgramError", "PromptTooLongError", "ImageError"]


class BundleError(ValueError):
    """A bundle cannot be opened: missing, tampered or truncated files, a newer schema, a bank
    that belongs to another model, or a program this machine cannot run."""


class ProgramError(RuntimeError):
    """The ExecuTorch program cannot be loaded or one of its methods failed."""


class PromptTooLongError(ValueError):
    """The prompt with its image and memory tokens does not fit the model's KV cache."""
