"""`tinyalign run`: answer one question about one image with a bundle, streaming the answer.

A thin click wrapper over `run`, whose keyword arguments match the flags. Imports no torch
(the lead registers `run_command` in `tinyalign/cli.py`).
"""

from __future__ import annotations

import json
import sys

import click

from .errors import BundleError, ImageError, ProgramError, PromptTooLongError

__all__ = ["run", "run_command"]


def run(bundle, image, question: str, json_out: bool = False, max_new_tokens: int = 32, temperature: float = 0.0,
        top_p: float = 1.0, seed: int | None = None, backend: str = "auto"):
    """Answer `question` about `image` with `bundle` (a folder or an opened Bundle).

    Streams the answer to stdout as it is decoded, then writes the retrieved memories and timings
    to stderr; with `json_out`, prints one JSON object instead (answer, token ids, memories,
    timings). Returns the `Answer`.
    """
    from .bundle import Bundle

    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, backend=backend)

    def echo(piece: str):
        sys.stdout.write(piece)
        sys.stdout.flush()

    ans = b.ask(image, question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                stream=None if json_out else echo)
    if json_out:
        sys.stdout.write(json.dumps({"question": question.strip(), "answer": ans.text, **_details(ans, b)}) + "\n")
        return ans
    sys.stdout.write("\n")
    err = sys.stderr
    for m in ans.memories:
        err.write(f"  memory {m.id:>6}  sim {m.similarity:+.3f}  {m.caption}\n")
    t, n = ans.timings, len(ans.token_ids)
    err.write(f"  encode {t.encode_s * 1e3:.1f} ms, retrieve {t.retrieve_s * 1e3:.1f} ms, prefill "
              f"{t.prefill_s * 1e3:.1f} ms ({ans.prompt_tokens} positions), {n} token{'' if n == 1 else 's'} at "
              f"{t.tokens_per_s:.1f} tok/s, total {t.total_s * 1e3:.1f} ms ({b.program.backend} backend)\n")
    return ans


def _details(ans, bundle) -> dict:
    d = ans.to_dict()
    d.pop("text")
    d["backend"] = bundle.program.backend
    d["bundle"] = str(bundle.path)
    return d


@click.command("run")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), required=True, help="Bundle folder.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True, help="Image file.")
@click.argument("question")
@click.option("--json", "json_out", is_flag=True, help="Print one JSON object (answer, memories, timings).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy decoding.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling (temperature > 0).")
@click.option("--backend", type=click.Choice(["auto", "native", "pybindings"]), default="auto", show_default=True,
              help="How to run the .pte: native (no torch; builds a small shim once) or ExecuTorch's pybindings.")
def run_command(**kw):
    """Answer a question about an image with a bundle, offline; the answer streams to stdout.

    Example: tinyalign run --bundle bundles/tiny-desktop --image shape.png "What color is the shape?"
    """
    try:
        run(**kw)
    except (BundleError, ImageError, PromptTooLongError, ProgramError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
