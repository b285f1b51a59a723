"""The on-device runtime: open a bundle and answer questions about images, with retrieval,
offline and without torch (numpy, Pillow, ExecuTorch's native runtime, usearch, tokenizers).

    from tinyalign.runtime import Bundle
    bundle = Bundle.open("bundles/tiny-desktop")          # verifies every sha256 first
    answer = bundle.ask("shape.png", "What color is the shape?", stream=print)
    answer.text, answer.memories, answer.timings

`bundle.py` verifies and loads a bundle, `engine.py` runs docs/bundle.md's steps, `program.py`
runs the .pte on numpy arrays, `cli.py` is `tinyalign run`.
"""

from .bundle import Bundle
from .engine import Answer, Engine, Memory, Timings
from .errors import BundleError, ImageError, ProgramError, PromptTooLongError
from .program import BACKENDS, open_program

__all__ = ["Bundle", "Engine", "Answer", "Memory", "Timings", "BundleError", "ImageError", "ProgramError",
           "PromptTooLongError", "BACKENDS", "open_program", "run"]


def run(*args, **kwargs):
    """`tinyalign.runtime.cli.run` (answer one question, streaming to stdout)."""
    from .cli import run as _run

    return _run(*args, **kwargs)
