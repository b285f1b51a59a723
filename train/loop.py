"""The training loop for the three stages (DESIGN.md section 1):

- `lm`: text-only pretraining of the tiny preset's LM (all LM weights) on the training text;
  with no `--init` it also trains the tiny preset's BPE tokenizer.
- `pretrain`: vision and LM frozen; connector + RAG connector trained on image captions.
  With retrieval on, the key encoder is made first (learned recipe: contrastive training on the
  bank's own image/caption pairs; paper/image recipes: a snapshot of the connector after a
  warm-up without retrieval), then the bank is built and every sample gets its k nearest
  entries, its own entry excluded (leave-one-out), as extra tokens after the image.
- `finetune`: LM + connectors trained on instructions (vision frozen).

Runs are resumable: `out/` holds the latest checkpoint plus `train_state.safetensors` (optimizer,
RNG, step); the data order is a pure function of (seed, epoch), so `--resume` continues at the
same step with the same batches. Multi-process through `torchrun` (DDP, gloo on CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..build import build_small, build_tiny
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import KeyRecipe, ModelConfig, preset as make_preset
from ..fsutil import check_output
from ..models.vlm import TinyAlignVLM
from . import pipeline as P

STAGES = ("lm", "pretrain", "finetune")
# (lr, epochs) per preset and stage
DEFAULTS = {
    "tiny": {"lm": (2e-3, 2.0), "pretrain": (1e-3, 3.0), "finetune": (5e-4, 1.0)},
    "small": {"lm": (2e-4, 1.0), "pretrain": (1e-3, 1.0), "finetune": (2e-5, 1.0)},
    "paper": {"lm": (2e-5, 1.0), "pretrain": (1e-3, 1.0), "finetune": (2e-5, 1.0)},
}


class TrainError(ValueError):
    pass


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds_per_step: float
    history: list = field(default_factory=list)
    retrieval_precision: dict | None = None


# ---- distributed ---------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """The examples of global step `step`: a pure function, so a resumed run sees the same data."""
    start = step * batch_size
    epoch, off = divmod(start, n)
    idx = _order(n, seed, epoch)[off:off + batch_size]
    while len(idx) < batch_size and n > 0:
        epoch += 1
        idx = np.concatenate([idx, _order(n, seed, epoch)[: batch_size - len(idx)]])
    return idx


def _lr_at(step: int, total: int, base: float) -> float:
    warm = max(1, int(0.03 * total))
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---- state save / load ---------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict):
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"opt.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    opt.load_state_dict({"param_groups": meta["param_groups"], "state": state})


def _save(model, tok, out: Path, opt, step: int, total: int, history: list, run: dict, final: bool):
    from safetensors.torch import save_file

    meta = {**run, "step": step, "total_steps": total, "finished": final,
            "final_loss": history[-1]["loss"] if history else None}
    save_checkpoint(model, tok, out, meta=meta, force=True, extra=lambda tmp: _write_extra(
        tmp, opt, step, history, final, save_file))


def _write_extra(tmp: Path, opt, step, history, final, save_file):
    with open(tmp / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    _plot_loss(history, tmp / "loss.png")
    if not final:
        tensors, meta = _optimizer_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "train_state.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "optimizer": meta}))


def _plot_loss(history: list, path: Path):
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- model construction ---------------------------------------------------------------------
def _initial_model(stage, preset, init, texts, config: ModelConfig | None, retrieval: bool, overrides: dict):
    if init:
        model, tok, meta = load_checkpoint(init, retrieval=retrieval)
        r = model.cfg.retrieval
        for k, v in overrides.items():
            if v is not None and getattr(r, k) != v:
                if meta.get("stage") in ("pretrain", "finetune") and k in ("recipe", "value_kind"):
                    raise TrainError(f"--{k.replace('_', '-')} cannot change after pretraining ({init} uses {getattr(r, k).value})")
                setattr(r, k, v)
        r.__post_init__()
        if any(v is not None for v in overrides.values()):
            fresh = TinyAlignVLM(model.cfg)
            want = fresh.state_dict()
            keep = {n: t for n, t in model.state_dict().items() if n in want and want[n].shape == t.shape}
            fresh.load_state_dict(keep, strict=False)
            model = fresh.eval()
        return model, tok
    if stage != "lm" and (config is None or config.preset in ("tiny",)) and preset == "tiny":
        raise TrainError(f"--stage {stage} needs --init CHECKPOINT (the tiny preset's LM comes from --stage lm)")
    cfg = config or make_preset(preset)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg.retrieval, k, v)
    cfg.retrieval.__post_init__()
    cfg.retrieval.enabled = retrieval
    if cfg.preset == "small":
        return build_small(cfg=cfg)
    if cfg.preset == "paper":
        raise TrainError("the paper preset needs --init: build it from local SigLIP and LM folders first")
    return build_tiny(texts, cfg=cfg, pretrained_vision=cfg.vision.kind.value == "efficientnet-lite0")


# ---- the train function ---------------------------------------------------------------------
def _quiet():
    import warnings

    # numpy warns about subnormals once flush-denormal is on; harmless
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")


def train(*, stage: str, out: str | Path, preset: str = "tiny", dataset: str | None = None, data: str | None = None,
          image_folder: str | None = None, init: str | Path | None = None, retrieval: str = "on",
          data_fraction: float = 1.0, seed: int = 0, bank: str | Path | None = None, steps: int | None = None,
          epochs: float | None = None, batch_size: int = 32, lr: float | None = None, save_every: int = 200,
          resume: bool = False, force: bool = False, tensorboard: bool = False, progress: bool = True,
          recipe: str | None = None, value_kind: str | None = None, k: int | None = None,
          alpha: float | None = None, caption_residual: bool | None = None, key_steps: int = 400, config: ModelConfig | None = None,
          log_every: int = 10, stop_after: int | None = None) -> TrainResult:
    """Train one stage and write a checkpoint folder to `out` (see module docstring).

    `stop_after` ends the process's work after that many steps as if killed (for tests).
    """
    torch.set_flush_denormal(True)
    _quiet()
    if stage not in STAGES:
        raise TrainError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if retrieval not in ("on", "off"):
        raise TrainError(f"--retrieval must be on or off, got {retrieval!r}")
    use_rag = retrieval == "on" and stage != "lm"
    out = Path(out)
    rank, world = _dist()
    if resume:
        if not (out / "train_state.json").is_file():
            raise TrainError(f"cannot resume: {out} has no train_state.json (it finished, or never saved a step)")
    elif rank == 0:
        check_output(out, force)
    if init and Path(init).resolve() == out.resolve():
        raise TrainError("--out must differ from --init: an input checkpoint is never modified")

    ds = P.load_dataset(dataset=dataset, data=data, image_folder=image_folder, split="train")
    if ds.report is not None and rank == 0 and progress:
        print(ds.report.summary())
    skipped = dict(ds.report.skipped) if ds.report is not None else {}
    if stage == "pretrain":
        examples = P.subset(ds.captions, data_fraction, seed)
    elif stage == "lm":  # all training text: instructions and captions, without images
        examples = P.subset(ds.qa + ds.captions, data_fraction, seed)
    else:
        examples = P.subset(ds.qa, data_fraction, seed)
    if not examples:
        raise TrainError(f"no training examples for stage {stage} in {ds.source}")
    texts = [q + " " + a for e in ds.qa for q, a in e.turns] + [e.caption for e in ds.captions]

    torch.manual_seed(seed)
    # strings are fine: RetrievalConfig.__post_init__ turns them into enums
    overrides = {"recipe": recipe, "value_kind": value_kind, "k": k, "alpha": alpha,
                 "caption_residual": caption_residual}
    src = out if resume else init
    model, tok = _initial_model(stage, preset, src, texts, config, use_rag, overrides if not resume else {})
    model.cfg.retrieval.enabled = use_rag
    cfg = model.cfg
    if stage == "pretrain" and use_rag and cfg.retrieval.caption_residual and not resume and init:
        from ..checkpoint import read_meta

        if read_meta(init).get("stage") == "lm":  # the RAG connector has never been trained
            model.zero_rag_output()
    presets = DEFAULTS.get(cfg.preset, DEFAULTS["tiny"])
    base_lr, default_epochs = presets[stage]
    lr = lr or base_lr
    if stage == "lm":
        model.set_trainable(vision=False, connector=False, lm=True, rag=False)
    elif stage == "pretrain":
        model.set_trainable(vision=False, connector=True, lm=False, rag=use_rag)
    else:
        model.set_trainable(vision=not cfg.vision.frozen, connector=True, lm=True, rag=use_rag, values=False)
    model.train()
    model.vision.eval()  # frozen BatchNorm statistics

    n_img, mem_len = cfg.vision.num_tokens, model.memory_len()
    max_text = cfg.lm.max_seq_len - n_img - mem_len - 1
    if max_text < 8:
        raise TrainError(f"max_seq_len {cfg.lm.max_seq_len} leaves no room for text after {n_img} image and {mem_len} memory tokens")
    if stage == "lm":
        encoded = [P.encode_text_only(tok, e) for e in examples]
        encoded = [(i[: cfg.lm.max_seq_len], l[: cfg.lm.max_seq_len]) for i, l in encoded]
        feats_of = None
    else:
        encoded = [P.encode_conversation(tok, e, max_text) for e in examples]
        table = P.FeatureTable(model, [e.image for e in examples] + [e.image for e in ds.captions],
                               progress=progress and rank == 0)
        feats_of = table

    total = steps or max(1, int(math.ceil((epochs or default_epochs) * len(examples) / batch_size)))
    run_info = {"stage": stage, "preset": cfg.preset, "retrieval": retrieval, "data_fraction": data_fraction,
                "seed": seed, "dataset": ds.source, "examples": len(examples), "batch_size": batch_size, "lr": lr,
                "world_size": world, "skipped_records": skipped}

    # ---- retrieval: keys, bank, neighbours (leave-one-out) --------------------------------------
    nbrs = None
    precision = None
    mem_bank = None
    if use_rag:
        entries = ds.captions
        if not entries:
            raise TrainError(f"{ds.source} has no caption records to build a memory bank from")
        entry_feats = table[[e.image for e in entries]]
        entry_caps = P.caption_ids(tok, [e.caption for e in entries], cfg.retrieval.caption_len)
        if stage == "pretrain" and not resume:
            prepare_keys(model, tok, entries, entry_feats, entry_caps, steps=key_steps, seed=seed,
                         progress=progress and rank == 0)
        if bank:
            from ..bank import MemoryBank

            mem_bank = MemoryBank.open(bank)
            mem_bank.check_fingerprint(model.key_fingerprint(tok.tok.to_str()))
            bank_ids = mem_bank.meta.extra.get("image_ids") or []
        else:
            mem_bank = P.build_bank(model, tok, entries, entry_feats, source=ds.source)
            bank_ids = [e.image_id for e in entries]
        nbrs, precision = training_neighbours(model, tok, mem_bank, bank_ids, examples, table, ds)
        run_info["retrieval_precision_train"] = precision
        if progress and rank == 0:
            print(f"retrieval (leave-one-out, train): top-1 caption match {precision['top1']:.3f}, "
                  f"top-{cfg.retrieval.k} {precision['topk']:.3f}")
        values_all = (P.bank_values(mem_bank, nbrs) if cfg.retrieval.value_kind.value == "caption" or stage != "pretrain"
                      else None)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if stage == "pretrain" else 0.01, betas=(0.9, 0.98))
    start, history = 0, []
    if resume:
        from safetensors.torch import load_file

        st = json.loads((out / "train_state.json").read_text())
        tensors = load_file(str(out / "train_state.safetensors"))
        _restore_optimizer(opt, tensors, st["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        start = st["step"]
        history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    writer = None
    if tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out.with_name(out.name + "-tb")))
        except ImportError as exc:
            raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc

    bar = tqdm(range(start, total), desc=stage if stage == "lm" else f"{stage} (retrieval {retrieval})", disable=not (progress and rank == 0),
               initial=start, total=total, unit="step")
    t0, timed = time.perf_counter(), 0
    last_loss = float("nan")
    for step in bar:
        idx = batch_indices(step, len(examples), batch_size, seed)[rank::world]
        ids, labels, mask = P.pad_batch([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], tok.pad_id)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, lr)
        fwd = ddp or model
        if stage == "lm":
            logits = model.lm(model.lm.embed_tokens(ids), key_mask=mask)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            feats = feats_of[[examples[i].image for i in idx]]
            values = None
            if use_rag:
                if values_all is not None:
                    values = values_all[idx]
                else:  # latent values from the (training) value encoder, computed on the fly
                    ent = torch.from_numpy(nbrs[idx])
                    values = model.value_encoder(entry_feats[ent.flatten()], entry_caps[ent.flatten()],
                                                 entry_caps[ent.flatten()] >= 0).view(*ent.shape, cfg.retrieval.value_tokens, -1)
            _, loss = fwd(ids, feats=feats, values=values, labels=labels, attn_mask=mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last_loss = float(loss.detach())
        timed += 1
        if step % log_every == 0 or step == total - 1:
            row = {"step": step + 1, "loss": last_loss, "lr": opt.param_groups[0]["lr"],
                   "sec_per_step": (time.perf_counter() - t0) / timed}
            history.append(row)
            bar.set_postfix(loss=f"{last_loss:.3f}")
            if writer:
                writer.add_scalar(f"{stage}/loss", last_loss, step + 1)
        done = step + 1
        if stop_after is not None and done - start >= stop_after and done < total:
            if rank == 0:
                _save(model, tok, out, opt, done, total, history, run_info, final=False)
            bar.close()
            return TrainResult(out, done, last_loss, (time.perf_counter() - t0) / max(1, timed), history, precision)
        if rank == 0 and save_every and done % save_every == 0 and done < total:
            _save(model, tok, out, opt, done, total, history, run_info, final=False)
    bar.close()
    sec = (time.perf_counter() - t0) / max(1, timed)
    run_info["sec_per_step"] = sec
    if world > 1:  # every rank must hold the same weights after DDP training
        local = torch.tensor([float(sum(p.double().sum() for p in params))], dtype=torch.float64)
        gathered = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        run_info["rank_weight_sums"] = [float(g) for g in gathered]
        run_info["ranks_agree"] = all(float(g) == float(gathered[0]) for g in gathered)
    if rank == 0:
        model.cfg.retrieval.enabled = use_rag or (stage == "lm" and cfg.retrieval.enabled)
        _save(model, tok, out, opt, total, total, history, run_info, final=True)
        for name in ("train_state.json", "train_state.safetensors"):
            (out / name).unlink(missing_ok=True)
        if progress:
            print(f"{stage}: {total} steps, final loss {last_loss:.4f}, {sec:.3f} s/step -> {out}")
    if writer:
        writer.close()
    if world > 1:
        dist.barrier()
    return TrainResult(out, total, last_loss, sec, history, precision)


# ---- retrieval helpers used by training ---------------------------------------------------------
def prepare_keys(model: TinyAlignVLM, tok, entries, entry_feats, entry_caps, *, steps: int, seed: int,
                 progress: bool, batch_size: int = 256, warmup_connector: bool = True):
    """Make the key encoder before the bank is built.

    learned: contrastive image/caption training, captions with the same text count as positives.
    paper/image: the connector is first trained briefly on the captions without retrieval, then
    snapshotted into the key encoder (the paper's keys live in the connector's output space)."""
    r = model.cfg.retrieval
    g = torch.Generator().manual_seed(seed)
    if r.recipe is KeyRecipe.LEARNED:
        groups = {}
        gid = torch.tensor([groups.setdefault(e.caption, len(groups)) for e in entries])
        enc = model.key_encoder
        params = list(enc.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
        bar = tqdm(range(steps), desc="key encoder (contrastive)", disable=not progress, unit="step", leave=False)
        for step in bar:
            idx = torch.randperm(len(entries), generator=g)[:batch_size]
            loss = enc.contrastive_loss(entry_feats[idx], entry_caps[idx], entry_caps[idx] >= 0, gid[idx])
            opt.zero_grad()
            loss.backward()
            for pg in opt.param_groups:
                pg["lr"] = _lr_at(step, steps, 2e-3)
            opt.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        for p in params:
            p.requires_grad_(False)
        return
    if warmup_connector:
        # a short caption-only pretraining of the connector (no retrieval) to snapshot from
        enabled = r.enabled
        r.enabled = False
        params = list(model.connector.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3)
        seqs = [P.encode_conversation(tok, e, 64) for e in entries]
        bar = tqdm(range(steps), desc="connector warm-up (for keys)", disable=not progress, unit="step", leave=False)
        for step in bar:
            idx = torch.randperm(len(entries), generator=g)[:32].tolist()
            ids, labels, mask = P.pad_batch([seqs[i][0] for i in idx], [seqs[i][1] for i in idx], tok.pad_id)
            _, loss = model(ids, feats=entry_feats[idx], labels=labels, attn_mask=mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        r.enabled = enabled
    model.key_encoder.snapshot(model.connector, model.lm.embed_tokens)
    for p in model.key_encoder.parameters():
        p.requires_grad_(False)


def training_neighbours(model, tok, bank, bank_image_ids, examples, table, ds) -> tuple[np.ndarray, dict]:
    """k neighbours per training example with its own image's entry excluded (leave-one-out),
    and how often they carry the example image's own caption."""
    k = model.cfg.retrieval.k
    row = {iid: i for i, iid in enumerate(bank_image_ids)}
    caption_of = {e.image_id: e.caption for e in ds.captions}
    feats = table[[e.image for e in examples]]
    questions = [e.turns[0][0] for e in examples]
    q = P.query_vectors(model, tok, feats, questions)
    exclude = np.array([row.get(e.image_id, -1) for e in examples], dtype=np.int64)
    ids = P.neighbours(bank, q, k, exclude)
    caps = bank.captions_of(ids)
    own = [caption_of.get(e.image_id, "") for e in examples]
    top1 = np.mean([c[0] == o for c, o in zip(caps, own) if o])
    topk = np.mean([o in c for c, o in zip(caps, own) if o])
    return ids, {"top1": float(top1), "topk": float(topk), "k": k}
