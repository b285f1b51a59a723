"""`tinyalign quickstart`: the whole kit on the built-in default, end to end on a laptop CPU.

Trains the tiny preset on easy-vqa with TinyAlign (lm -> pretrain with retrieval -> bank ->
finetune with retrieval), exports a desktop bundle (XNNPACK, fp32), and answers test
questions both eagerly (PyTorch) and through the bundle with the torch-free runtime, printing
the two accuracies, their agreement and the bundle's size. Leaves `OUT/checkpoint/` (the final
TinyAlign checkpoint), `OUT/bank/`, `OUT/bundle/` and the intermediate stages in `OUT/stages/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def _step(n: int, total: int, text: str):
    click.secho(f"\n[{n}/{total}] {text}", bold=True)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def quickstart(*, out: str | Path = "tinyalign-quickstart", force: bool = False, questions: int = 300,
               data_fraction: float = 0.5, lm_steps: int = 500, pretrain_steps: int = 300, seed: int = 0) -> dict:
    from .fsutil import atomic_dir, check_output

    final = Path(out)
    check_output(final, force)
    # everything is built in a temporary sibling and renamed into place only when all steps
    # succeeded: a failed run leaves nothing behind and never destroys an earlier result
    with atomic_dir(final, force=force) as out:
        summary, size, files = _run(out, questions=questions, data_fraction=data_fraction, lm_steps=lm_steps,
                                    pretrain_steps=pretrain_steps, seed=seed)
    out = final
    click.secho("\nTinyAlign quickstart — results", bold=True)
    click.echo(f"  eager accuracy (PyTorch)     {summary['eager_accuracy']:.3f}  on {summary['questions']} test questions")
    click.echo(f"  bundle accuracy (ExecuTorch) {summary['bundle_accuracy']:.3f}  "
               f"(identical answers: {summary['answers_identical']:.1%})")
    click.echo(f"  bundle size                  {size / 1e6:.1f} MB  " +
               ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in files.items()))
    if summary["median_prefill_ms"] is not None:
        click.echo(f"  bundle latency               prefill {summary['median_prefill_ms']:.1f} ms, "
                   f"decode {summary['median_decode_ms_per_token']:.2f} ms/token (medians)")
    click.echo(f"  wall time                    {summary['wall_seconds'] / 60:.1f} min")
    click.echo(f"\n  checkpoint: {out / 'checkpoint'}\n  bank:       {out / 'bank'}\n  bundle:     {out / 'bundle'}")
    click.echo(f"  try: tinyalign run --bundle {out / 'bundle'} --image IMAGE.png \"What color is the shape?\"")
    return summary


def _run(out: Path, *, questions: int, data_fraction: float, lm_steps: int, pretrain_steps: int, seed: int):
    """All seven steps inside the (temporary) output folder `out`."""
    import torch

    from .data import normalize_answer
    from .train import bank_tools
    from .train import pipeline as P
    from .train.evaluate import evaluate
    from .train.loop import train

    stages = out / "stages"
    t_all = time.perf_counter()
    total = 7
    common = dict(dataset="easy-vqa", seed=seed, progress=True)

    _step(1, total, "language model: text-only pretraining of the tiny LM and its tokenizer on easy-vqa's text")
    train(stage="lm", out=stages / "lm", steps=lm_steps, batch_size=64, **common)

    _step(2, total, "pretrain with retrieval: key encoder, bank of training captions, connector + RAG connector")
    r = train(stage="pretrain", out=stages / "pretrain", init=stages / "lm", retrieval="on", steps=pretrain_steps,
              batch_size=64, **common)

    _step(3, total, "memory bank: one entry per training image (usearch, f16 keys, caption-id values)")
    bank_tools.build(checkpoint=stages / "pretrain", out=out / "bank", dataset="easy-vqa", exact=True)
    info = bank_tools.info(out / "bank")
    click.echo(f"bank: {info['count']} entries, {info['bytes_per_entry']['total']:.0f} bytes per entry")

    _step(4, total, f"finetune with retrieval on {data_fraction:.0%} of the QA pairs (LM + connectors)")
    train(stage="finetune", out=out / "checkpoint", init=stages / "pretrain", retrieval="on", bank=out / "bank",
          data_fraction=data_fraction, batch_size=64, **common)

    _step(5, total, "export: desktop bundle (ExecuTorch + XNNPACK, fp32), checked against eager PyTorch")
    from .export import export_bundle

    export_bundle(checkpoint=out / "checkpoint", bank=out / "bank", out=out / "bundle", target="desktop",
                  quantize="fp32")

    _step(6, total, f"eager accuracy on {questions} easy-vqa test questions")
    pred_eager = stages / "eager_predictions.jsonl"
    ev = evaluate(checkpoint=out / "checkpoint", dataset="easy-vqa", split="test", bank=out / "bank",
                  limit=questions, seed=seed, predictions=pred_eager)
    eager_rows = [json.loads(l) for l in pred_eager.read_text().splitlines()]

    _step(7, total, f"the same {questions} questions through the bundle (torch-free runtime)")
    from tqdm import tqdm

    from .runtime import Bundle

    ds = P.load_dataset(dataset="easy-vqa", split="test")
    image_of = {e.image_id: e.image for e in ds.qa}
    bundle = Bundle.open(out / "bundle")
    correct = agree = 0
    decode, prefill = [], []
    for row in tqdm(eager_rows, desc="bundle", unit="question"):
        ans = bundle.ask(image_of[row["image_id"]], row["question"], max_new_tokens=8)
        ok = normalize_answer(ans.text) == normalize_answer(row["answer"])
        correct += ok
        agree += normalize_answer(ans.text) == normalize_answer(row["prediction"])
        prefill.append(ans.timings.prefill_s)
        decode.extend(ans.timings.decode_s)
    bundle.close()
    n = len(eager_rows)
    files = {p.name: _dir_size(p) if p.is_dir() else p.stat().st_size for p in sorted((out / "bundle").iterdir())}
    size = sum(files.values())
    wall = time.perf_counter() - t_all
    summary = {
        "eager_accuracy": ev["accuracy"], "bundle_accuracy": correct / n, "answers_identical": agree / n,
        "questions": n, "bundle_bytes": size, "bundle_files": files,
        "retrieval_precision_train": r.retrieval_precision, "wall_seconds": wall,
        "median_prefill_ms": 1000 * sorted(prefill)[len(prefill) // 2] if prefill else None,
        "median_decode_ms_per_token": 1000 * sorted(decode)[len(decode) // 2] if decode else None,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))
    return summary, size, files
