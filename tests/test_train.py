"""Training stages, resume, multi-process DDP, bad records, evaluation and bank tools."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from helpers import make_llava  # noqa: E402

from tinyalign.train.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    os.environ["TINYALIGN_CACHE"] = str(root / "cache")
    return make_llava(root)


@pytest.fixture(scope="module")
def lm_ckpt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "lm"
    js, imgs = data
    train(stage="lm", out=out, data=str(js), image_folder=str(imgs), config=tiny_config(), steps=40,
          batch_size=16, progress=False, log_every=1)
    return out


def _drop(history):
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    return first, last


def test_lm_stage_lowers_loss(lm_ckpt):
    hist = [json.loads(l) for l in (lm_ckpt / "metrics.jsonl").read_text().splitlines()]
    first, last = _drop(hist)
    assert last < 0.7 * first
    assert (lm_ckpt / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("recipe", ["learned", "paper"])
def test_pretrain_stage_with_retrieval_lowers_loss(data, lm_ckpt, tmp_path, recipe):
    js, imgs = data
    r = train(stage="pretrain", out=tmp_path / "pre", init=lm_ckpt, data=str(js), image_folder=str(imgs),
              retrieval="on", recipe=recipe, steps=30, batch_size=8, progress=False, log_every=1, key_steps=60)
    first, last = _drop(r.history)
    assert last < first
    assert r.retrieval_precision is not None and 0 <= r.retrieval_precision["top1"] <= 1
    meta = json.loads((tmp_path / "pre" / "checkpoint.json").read_text())
    assert meta["stage"] == "pretrain" and meta["finished"] is True


def test_finetune_stage_lowers_loss(data, lm_ckpt, tmp_path):
    js, imgs = data
    train(stage="pretrain", out=tmp_path / "pre", init=lm_ckpt, data=str(js), image_folder=str(imgs),
          retrieval="off", steps=15, batch_size=8, progress=False)
    r = train(stage="finetune", out=tmp_path / "ft", init=tmp_path / "pre", data=str(js), image_folder=str(imgs),
              retrieval="off", steps=30, batch_size=8, progress=False, log_every=1)
    first, last = _drop(r.history)
    assert last < first


def test_resume_after_interruption_reaches_the_same_weights(data, lm_ckpt, tmp_path):
    from safetensors.torch import load_file

    js, imgs = data
    kw = dict(stage="pretrain", init=lm_ckpt, data=str(js), image_folder=str(imgs), retrieval="on", steps=12,
              batch_size=8, progress=False, key_steps=20, save_every=4)
    train(out=tmp_path / "full", **kw)
    train(out=tmp_path / "cut", stop_after=6, **kw)  # "killed" after step 6; last save at step 6
    state = json.loads((tmp_path / "cut" / "train_state.json").read_text())
    assert state["step"] == 6
    train(out=tmp_path / "cut", resume=True, **{k: v for k, v in kw.items() if k != "init"})
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "train_state.json").exists()


def test_existing_output_is_refused_and_input_checkpoint_untouched(data, lm_ckpt, tmp_path):
    js, imgs = data
    before = (lm_ckpt / "model.safetensors").read_bytes()
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        train(stage="pretrain", out=tmp_path / "x", init=lm_ckpt, data=str(js), image_folder=str(imgs), steps=2)
    with pytest.raises(ValueError, match="--out must differ"):
        train(stage="pretrain", out=lm_ckpt, init=lm_ckpt, data=str(js), image_folder=str(imgs), steps=2, force=True)
    assert (lm_ckpt / "model.safetensors").read_bytes() == before


def test_bad_records_are_skipped_and_counted(tmp_path, lm_ckpt):
    js, imgs = make_llava(tmp_path / "bad", n_per=1, bad=True)
    r = train(stage="finetune", out=tmp_path / "ft", init=lm_ckpt, data=str(js), image_folder=str(imgs),
              retrieval="off", steps=3, batch_size=4, progress=False)
    meta = json.loads((tmp_path / "ft" / "checkpoint.json").read_text())
    assert sum(meta["skipped_records"].values()) == 5
    assert meta["skipped_records"]["missing image"] == 1
    assert r.steps == 3


@pytest.mark.slow
def test_two_process_gloo_run_trains_and_ranks_agree(data, lm_ckpt, tmp_path):
    js, imgs = data
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_config
        from tinyalign.train.loop import train
        train(stage="finetune", out={str(tmp_path / 'ddp')!r}, init={str(lm_ckpt)!r}, data={str(js)!r},
              image_folder={str(imgs)!r}, retrieval="off", steps=6, batch_size=8, progress=False, log_every=1)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["ranks_agree"] is True
    hist = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_eval_and_bank_tools_on_llava_data(data, lm_ckpt, tmp_path):
    from tinyalign.bank import BankError
    from tinyalign.train import bank_tools
    from tinyalign.train.evaluate import evaluate

    js, imgs = data
    train(stage="pretrain", out=tmp_path / "pre", init=lm_ckpt, data=str(js), image_folder=str(imgs),
          retrieval="on", steps=5, batch_size=8, progress=False, key_steps=60)
    bank_tools.build(checkpoint=tmp_path / "pre", out=tmp_path / "bank", data=str(js), image_folder=str(imgs),
                     progress=False)
    info = bank_tools.info(tmp_path / "bank")
    assert info["count"] == 24 and info["value_kind"] == "caption"
    hits = bank_tools.search(bank=tmp_path / "bank", checkpoint=tmp_path / "pre",
                             image=str(imgs / "red_circle_0.png"), k=3)
    assert len(hits) == 3 and hits[0]["similarity"] >= hits[-1]["similarity"]
    prec = bank_tools.evaluate_bank(bank=tmp_path / "bank", checkpoint=tmp_path / "pre", data=str(js),
                                    image_folder=str(imgs), progress=False)
    assert prec["queries"] == 24 and 0 <= prec["top1"] <= prec["topk"] <= 1
    res = evaluate(checkpoint=tmp_path / "pre", data=str(js), image_folder=str(imgs), bank=tmp_path / "bank",
                   predictions=tmp_path / "pred.jsonl", progress=False)
    assert res["questions"] == 72 and 0 <= res["accuracy"] <= 1
    rows = [json.loads(l) for l in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == 72 and len(rows[0]["retrieved"]) == 2
    # a bank made by another model is refused
    train(stage="pretrain", out=tmp_path / "pre2", init=lm_ckpt, data=str(js), image_folder=str(imgs),
          retrieval="on", steps=2, batch_size=8, progress=False, key_steps=5, seed=1)
    with pytest.raises(BankError, match="fingerprint"):
        evaluate(checkpoint=tmp_path / "pre2", data=str(js), image_folder=str(imgs), bank=tmp_path / "bank",
                 progress=False)


@pytest.mark.slow
def test_data_efficiency_experiment_writes_results_table_and_plots(tmp_path):
    from click.testing import CliRunner

    from tinyalign.cli import main

    js, imgs = make_llava(tmp_path / "d", n_per=2)
    import tinyalign.train.experiment as E

    s = E.data_efficiency(out=tmp_path / "de", data=str(js), finetune_data=str(js), eval_data=str(js),
                          image_folder=str(imgs), fractions=(0.5, 1.0), seeds=2, lm_steps=10, pretrain_steps=6,
                          finetune_epochs=1.0, batch_size=8, eval_limit=None, progress=False, config=tiny_config())
    res = json.loads((tmp_path / "de" / "results.json").read_text())
    assert len(res) == 8
    assert {r["arm"] for r in res} == {"baseline", "tinyalign"}
    assert all(0 <= r["accuracy"] <= 1 for r in res)
    for f in ("results.md", "accuracy.png", "pretrain_loss.png"):
        assert (tmp_path / "de" / f).stat().st_size > 100
    assert "| 0.5 |" in s["markdown"]
    # re-running continues: nothing is trained again, same results
    s2 = E.data_efficiency(out=tmp_path / "de", data=str(js), finetune_data=str(js), eval_data=str(js),
                           image_folder=str(imgs), fractions=(0.5, 1.0), seeds=2, progress=False)
    assert json.loads((tmp_path / "de" / "results.json").read_text()) == res
    r = CliRunner().invoke(main, ["experiment", "data-efficiency", "--help"])
    assert r.exit_code == 0 and "--fractions" in r.output


def test_latent_values_train_build_a_bank_and_evaluate(data, lm_ckpt, tmp_path):
    from tinyalign.train import bank_tools
    from tinyalign.train.evaluate import evaluate

    js, imgs = data
    src = dict(data=str(js), image_folder=str(imgs))
    r = train(stage="pretrain", out=tmp_path / "pre", init=lm_ckpt, retrieval="on", value_kind="latent", steps=10,
              batch_size=8, progress=False, key_steps=20, log_every=1, **src)
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    b = bank_tools.build(checkpoint=tmp_path / "pre", out=tmp_path / "bank", progress=False, **src)
    assert b.meta.value_kind == "latent" and b.values([0])["latent"].shape == (1, 2, 8)
    train(stage="finetune", out=tmp_path / "ft", init=tmp_path / "pre", bank=tmp_path / "bank", retrieval="on",
          steps=4, batch_size=8, progress=False, **src)
    res = evaluate(checkpoint=tmp_path / "ft", bank=tmp_path / "bank", limit=10, progress=False, **src)
    assert res["questions"] == 10


def test_bank_merge_command_joins_shards_and_keeps_leave_one_out_ids(data, lm_ckpt, tmp_path):
    from click.testing import CliRunner

    from tinyalign.bank import MemoryBank
    from tinyalign.checkpoint import load_checkpoint
    from tinyalign.cli import main
    from tinyalign.train import pipeline as P

    js, imgs = data
    train(stage="pretrain", out=tmp_path / "pre", init=lm_ckpt, data=str(js), image_folder=str(imgs),
          retrieval="on", steps=2, batch_size=8, progress=False, key_steps=5)
    model, tok, _ = load_checkpoint(tmp_path / "pre")
    ds = P.load_dataset(data=str(js), image_folder=str(imgs))
    table = P.FeatureTable(model, [e.image for e in ds.captions], progress=False)
    halves = [ds.captions[:10], ds.captions[10:]]
    for i, part in enumerate(halves):
        P.build_bank(model, tok, part, table[[e.image for e in part]]).save(tmp_path / f"s{i}")
    r = CliRunner().invoke(main, ["bank", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                                  "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged = MemoryBank.open(tmp_path / "merged")
    whole = P.build_bank(model, tok, ds.captions, table[[e.image for e in ds.captions]])
    assert len(merged) == len(whole) == 24
    assert merged.meta.extra["image_ids"] == [e.image_id for e in ds.captions]
    q = P.query_vectors(model, tok, table[[e.image for e in ds.captions[:5]]], None)
    assert (merged.search(q, 3)[0] == whole.search(q, 3)[0]).all()
    again = CliRunner().invoke(main, ["bank", "merge", str(tmp_path / "s0"), "--out", str(tmp_path / "merged")])
    assert again.exit_code != 0 and "--force" in again.output
