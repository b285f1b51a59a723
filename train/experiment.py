"""`tinyalign experiment data-efficiency`: baseline vs TinyAlign at several finetune-data
fractions and seeds, every stage run for real, with the bank the TinyAlign arm needs.

Per seed: one `lm` stage (tiny preset) shared by both arms; a pretrain per arm (retrieval off /
on); a bank built from the TinyAlign pretrain checkpoint; then a finetune + evaluation per arm and
fraction. Results are appended to `results.json` after every run, so an interrupted experiment
continues where it stopped when run again with the same `--out`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..fsutil import atomic_write_text
from . import bank_tools
from . import pipeline as P
from .evaluate import evaluate, retrieval_precision
from .loop import train

ARMS = ("baseline", "tinyalign")


def _load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def data_efficiency(*, out: str | Path, preset: str = "tiny", dataset: str | None = None,
                    data: str | None = None, finetune_data: str | None = None, eval_data: str | None = None,
                    image_folder: str | None = None, fractions: tuple[float, ...] = (0.1, 0.2, 0.4, 0.7, 1.0),
                    seeds: int = 3, recipe: str | None = None, k: int | None = None, value_kind: str | None = None,
                    caption_residual: bool | None = None,
                    lm_steps: int = 600, pretrain_steps: int = 400, finetune_epochs: float = 1.0,
                    batch_size: int = 32, eval_limit: int | None = 1000, progress: bool = True, config=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = _load_results(res_file)
    done = {(r["arm"], r["fraction"], r["seed"]) for r in results}
    if dataset:
        pre_src = ft_src = dict(dataset=dataset)
        ev_src = dict(dataset=dataset)
    else:
        if not (data and finetune_data and eval_data and image_folder):
            raise ValueError("pass --dataset, or all of --data, --finetune-data, --eval-data and --image-folder")
        pre_src = dict(data=data, image_folder=image_folder)
        ft_src = dict(data=finetune_data, image_folder=image_folder)
        ev_src = dict(data=eval_data, image_folder=image_folder)
    extra = {"recipe": recipe, "k": k, "value_kind": value_kind, "caption_residual": caption_residual}
    meta = {"preset": preset, "fractions": list(fractions), "seeds": seeds, "source": pre_src | ft_src,
            "lm_steps": lm_steps, "pretrain_steps": pretrain_steps, "finetune_epochs": finetune_epochs,
            "batch_size": batch_size, "eval_limit": eval_limit, **extra}
    runs_meta = json.loads((out / "experiment.json").read_text()) if (out / "experiment.json").is_file() else {}
    runs_meta.setdefault("pretrain", {})
    for seed in range(seeds):
        sd = out / f"seed{seed}"
        lm = sd / "lm"
        if preset == "tiny" and not (lm / "checkpoint.json").is_file():
            train(stage="lm", out=lm, preset=preset, steps=lm_steps, batch_size=64, seed=seed, progress=progress,
                  force=True, config=config, **pre_src)
        init = lm if preset == "tiny" else None
        for arm in ARMS:
            pre = sd / f"pretrain-{arm}"
            if not (pre / "checkpoint.json").is_file() or not json.loads((pre / "checkpoint.json").read_text()).get("finished"):
                r = train(stage="pretrain", out=pre, init=init, preset=preset, steps=pretrain_steps,
                          retrieval="on" if arm == "tinyalign" else "off", seed=seed, batch_size=batch_size,
                          progress=progress, force=True, config=config, **pre_src,
                          **({k_: v for k_, v in extra.items() if v is not None} if arm == "tinyalign" else {}))
                runs_meta["pretrain"][f"{arm}-{seed}"] = {"sec_per_step": r.seconds_per_step,
                                                          "final_loss": r.final_loss,
                                                          "retrieval_precision_train": r.retrieval_precision}
                atomic_write_text(out / "experiment.json", json.dumps({**meta, **runs_meta}, indent=2))
        bank = sd / "bank"
        if not (bank / "meta.json").is_file():
            bank_tools.build(checkpoint=sd / "pretrain-tinyalign", out=bank, force=True, progress=progress,
                             **pre_src)
        key = f"bank-precision-{seed}"
        if key not in runs_meta:
            from ..bank import MemoryBank
            from ..checkpoint import load_checkpoint

            m, tok, _ = load_checkpoint(sd / "pretrain-tinyalign")
            ds = P.load_dataset(split="test", **ev_src) if dataset else P.load_dataset(**ev_src)
            runs_meta[key] = retrieval_precision(m, tok, MemoryBank.open(bank), ds)
            atomic_write_text(out / "experiment.json", json.dumps({**meta, **runs_meta}, indent=2))
    # fractions outermost, so an interrupted experiment has every seed of the fractions it reached
    for frac in fractions:
        for seed in range(seeds):
            sd = out / f"seed{seed}"
            bank = sd / "bank"
            for arm in ARMS:
                if (arm, frac, seed) in done:
                    continue
                ft = sd / f"finetune-{arm}-{frac}"
                t0 = time.perf_counter()
                r = train(stage="finetune", out=ft, init=sd / f"pretrain-{arm}", retrieval="on" if arm == "tinyalign" else "off",
                          bank=bank if arm == "tinyalign" else None, data_fraction=frac, seed=seed,
                          epochs=finetune_epochs, batch_size=batch_size, progress=progress, force=True, **ft_src)
                ev = evaluate(checkpoint=ft, split="test", bank=bank if arm == "tinyalign" else None,
                              limit=eval_limit, progress=progress, predictions=ft / "predictions.jsonl",
                              **({"dataset": dataset} if dataset else {"data": eval_data, "image_folder": image_folder}))
                row = {"arm": arm, "fraction": frac, "seed": seed, "accuracy": ev["accuracy"],
                       "questions": ev["questions"], "finetune_steps": r.steps, "final_loss": r.final_loss,
                       "sec_per_step": r.seconds_per_step, "wall_seconds": time.perf_counter() - t0}
                results.append(row)
                done.add((arm, frac, seed))
                atomic_write_text(res_file, json.dumps(results, indent=2))
                if progress:
                    print(f"[{arm} fraction={frac} seed={seed}] accuracy {ev['accuracy']:.4f}")
    summary = summarize(results, runs_meta)
    atomic_write_text(out / "results.md", summary["markdown"])
    plot(results, out / "accuracy.png")
    plot_pretrain(out, seeds, out / "pretrain_loss.png")
    return summary


def summarize(results: list[dict], runs_meta: dict) -> dict:
    fr = sorted({r["fraction"] for r in results})
    stats = {}
    for arm in ARMS:
        for f in fr:
            accs = [r["accuracy"] for r in results if r["arm"] == arm and r["fraction"] == f]
            if accs:
                stats[(arm, f)] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs))
    lines = ["| fraction | baseline acc (mean ± sd) | TinyAlign acc (mean ± sd) | Δ | seeds |", "|---|---|---|---|---|"]
    for f in fr:
        b, t = stats.get(("baseline", f)), stats.get(("tinyalign", f))
        if b and t:
            lines.append(f"| {f:g} | {b[0]:.4f} ± {b[1]:.4f} | {t[0]:.4f} ± {t[1]:.4f} | {t[0] - b[0]:+.4f} | {min(b[2], t[2])} |")
    full = stats.get(("baseline", max(fr))) if fr else None
    match = None
    if full:
        for f in fr:
            t = stats.get(("tinyalign", f))
            if t and t[0] >= full[0]:
                match = f
                break
    step_ratio = []
    for arm_seed, v in runs_meta.get("pretrain", {}).items():
        if arm_seed.startswith("tinyalign-"):
            b = runs_meta["pretrain"].get("baseline-" + arm_seed.split("-", 1)[1])
            if b:
                step_ratio.append(v["sec_per_step"] / b["sec_per_step"])
    ft_ratio = []
    for r in results:
        if r["arm"] == "tinyalign":
            b = [x for x in results if x["arm"] == "baseline" and x["fraction"] == r["fraction"] and x["seed"] == r["seed"]]
            if b:
                ft_ratio.append(r["sec_per_step"] / b[0]["sec_per_step"])
    prec = [v for k, v in runs_meta.items() if k.startswith("bank-precision-")]
    lines.append("")
    lines.append(f"Smallest fraction at which TinyAlign matches the baseline at {max(fr) if fr else '-'}: "
                 f"{match if match is not None else 'none'}")
    if step_ratio:
        lines.append(f"Time per step, TinyAlign / baseline: pretrain {statistics.median(step_ratio):.2f}x, "
                     f"finetune {statistics.median(ft_ratio) if ft_ratio else float('nan'):.2f}x (medians over runs)")
    if prec:
        lines.append(f"Retrieval precision on held-out images (top-1 / top-k own caption): "
                     + ", ".join(f"{p['top1']:.3f} / {p['topk']:.3f}" for p in prec))
    md = "\n".join(lines) + "\n"
    return {"markdown": md, "match_fraction": match, "pretrain_step_ratio": step_ratio, "finetune_step_ratio": ft_ratio,
            "stats": {f"{a}@{f}": v for (a, f), v in stats.items()}}


def plot(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        fr = sorted({r["fraction"] for r in results if r["arm"] == arm})
        if not fr:
            continue
        accs = [[r["accuracy"] for r in results if r["arm"] == arm and r["fraction"] == f] for f in fr]
        mean = [statistics.mean(a) for a in accs]
        sd = [statistics.stdev(a) if len(a) > 1 else 0 for a in accs]
        ax.errorbar(fr, mean, yerr=sd, marker="o", capsize=3, label=arm)
    ax.set_xlabel("fraction of finetune data")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if results:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pretrain(out: Path, seeds: int, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, colour in zip(ARMS, ("tab:blue", "tab:orange")):
        for seed in range(seeds):
            f = out / f"seed{seed}" / f"pretrain-{arm}" / "metrics.jsonl"
            if not f.is_file():
                continue
            rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=colour, alpha=0.7,
                    label=arm if seed == 0 else None)
    ax.set_xlabel("pretrain step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
