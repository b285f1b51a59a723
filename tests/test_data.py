"""Dataset readers: LLaVA JSON with bad records, easy-vqa captions, answers, round trips."""

import json
import re

import pytest
from PIL import Image

from tinyalign.data import (CAPTION_INSTRUCTION, DataError, Example, LoadReport, easy_vqa,
                            easy_vqa_answers, easy_vqa_caption_stats, load_llava_json,
                            normalize_answer, save_llava_json)


def _conv(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


@pytest.fixture
def llava_dir(tmp_path):
    imgs = tmp_path / "images"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(imgs / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(imgs / "sub" / "b.jpg")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    records = [
        # kept: pretraining style, image only
        {"id": "p1", "image": "a.png", "conversations": _conv(("<image>", "A red square."))},
        # kept: pretraining style with a short instruction after the placeholder
        {"id": "p2", "image": "sub/b.jpg",
         "conversations": _conv(("<image>\nDescribe the image briefly.", "A blue square."))},
        # kept: multi-turn, placeholder after the text
        {"id": "m1", "image": "a.png",
         "conversations": _conv(("What colour is it?\n<image>", "Red."),
                                ("Is it round?", "No."))},
        # skipped: missing image
        {"id": "x1", "image": "nope.png", "conversations": _conv(("<image>\nWhat?", "x"))},
        # skipped: no <image>
        {"id": "x2", "image": "a.png", "conversations": _conv(("What is it?", "a square"))},
        # skipped: empty answers
        {"id": "x3", "image": "a.png", "conversations": _conv(("<image>\nWhat?", "  "))},
        {"id": "x4", "image": "a.png", "conversations": _conv(("<image>\nWhat?", "ok"), ("And?", ""))},
        # skipped: malformed in several ways
        {"id": "x5", "image": "a.png", "conversations": "not a list"},
        {"id": "x6", "image": "a.png", "conversations": [{"from": "gpt", "value": "<image>"},
                                                          {"from": "human", "value": "hi"}]},
        {"id": "x7", "image": "a.png", "conversations": [{"from": "human", "value": 3},
                                                          {"from": "gpt", "value": "hi"}]},
        {"id": "x8", "image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]},
        "just a string",
        None,
        {"id": "x9", "image": ["a.png", "sub/b.jpg"], "conversations": _conv(("<image>", "two"))},
        # skipped: text-only record
        {"id": "t1", "conversations": _conv(("Hello", "Hi"))},
        # skipped: unreadable image (only when check_images)
        {"id": "u1", "image": "broken.png", "conversations": _conv(("<image>", "broken"))},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, imgs


def test_llava_bad_records_are_counted(llava_dir):
    path, imgs = llava_dir
    exs, rep = load_llava_json(path, imgs)
    assert isinstance(rep, LoadReport)
    assert rep.total == 16 and rep.kept == 3 and len(exs) == 3
    assert rep.skipped == {"missing image": 1, "no <image>": 1, "empty answer": 2,
                           "malformed record": 7, "no image field": 1, "unreadable image": 1}
    assert rep.kept + sum(rep.skipped.values()) == rep.total
    s = rep.summary()
    assert "kept 3 of 16" in s and "missing image: 1" in s and "x1" in s

    p1, p2, m1 = exs
    assert p1.image == str((imgs / "a.png").resolve()) and p1.image_id == "a.png"
    assert p1.turns == [("", "A red square.")] and p1.caption == "A red square."
    assert p2.turns == [("Describe the image briefly.", "A blue square.")]
    assert p2.caption == "A blue square." and p2.image_id == "sub/b.jpg" and p2.id == "p2"
    assert m1.turns == [("What colour is it?", "Red."), ("Is it round?", "No.")]
    assert m1.caption == "" and m1.image_id == p1.image_id  # same image, same id
    assert all("<image>" not in q for e in exs for q, _ in e.turns)

    # without the Pillow check the broken file only has to exist
    exs2, rep2 = load_llava_json(path, imgs, check_images=False)
    assert rep2.kept == 4 and "unreadable image" not in rep2.skipped


def test_llava_file_level_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_llava_json(bad, tmp_path)
    obj = tmp_path / "obj.json"
    obj.write_text('{"id": 1}')
    with pytest.raises(DataError, match="not a list"):
        load_llava_json(obj, tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_llava_json(tmp_path / "missing.json", tmp_path)
    assert issubclass(DataError, ValueError)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    exs, rep = load_llava_json(empty, tmp_path)
    assert exs == [] and rep.total == 0 and "kept 0 of 0" in rep.summary()


def test_llava_jsonl_bad_lines(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    good = {"id": 1, "image": "a.png", "conversations": _conv(("<image>\nQ?", "A"))}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n{broken\n\n" + json.dumps(good) + "\n")
    exs, rep = load_llava_json(p, tmp_path)
    assert rep.total == 3 and rep.kept == 2 and rep.skipped == {"malformed record": 1}


def test_save_load_round_trip(llava_dir, tmp_path):
    path, imgs = llava_dir
    exs, _ = load_llava_json(path, imgs)
    out = tmp_path / "out" / "copy.json"
    save_llava_json(exs, out, image_folder=imgs)
    recs = json.loads(out.read_text())
    assert recs[0]["image"] == "a.png" and recs[0]["conversations"][0]["value"] == "<image>"
    assert recs[2]["conversations"][0]["value"].startswith("<image>\n")
    back, rep = load_llava_json(out, imgs)
    assert rep.kept == len(exs) and back == exs
    # absolute image paths load from any folder; no temp files are left behind
    save_llava_json(exs, out)
    back2, _ = load_llava_json(out, tmp_path / "elsewhere")
    assert back2 == exs
    assert sorted(x.name for x in out.parent.iterdir()) == ["copy.json"]


def test_normalize_answer():
    assert normalize_answer("The Red Circle!") == "red circle"
    assert normalize_answer("  A  cat. ") == "cat"
    assert normalize_answer("Yes") == normalize_answer("yes.") == "yes"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("don't") == "dont"
    assert normalize_answer("an apple, the end") == "apple end"
    assert normalize_answer("") == ""


def test_easy_vqa_answers():
    ans = easy_vqa_answers()
    assert len(ans) == 13 and {"yes", "no", "circle", "rectangle", "triangle", "red"} <= set(ans)


_COLOURS = {"green", "red", "gray", "teal", "black", "yellow", "brown", "blue"}
_SHAPES = {"circle", "rectangle", "triangle"}


def _contradicts(caption: str, q: str, a: str) -> bool:
    """True if the (question, answer) pair contradicts what the caption states."""
    words = caption.rstrip(".").split()[1:]
    colour = next((w for w in words if w in _COLOURS), None)
    shape = next((w for w in words if w in _SHAPES), None)
    qw = re.findall(r"[a-z]+", q)
    if a in _COLOURS:
        return colour is not None and colour != a
    if a in _SHAPES:
        return shape is not None and shape != a
    neg = "not" in qw or "no" in qw
    truth = (a == "yes") != neg
    for w in qw:
        if w in _COLOURS and colour is not None and (w == colour) != truth:
            return True
        if w in _SHAPES and shape is not None and (w == shape) != truth:
            return True
    return False


@pytest.mark.parametrize("split,n_img,n_q", [("train", 4000, 38575), ("test", 1000, 9673)])
def test_easy_vqa(split, n_img, n_q):
    caps, qa = easy_vqa(split)
    assert len(caps) == n_img and len(qa) == n_q
    by_id = {c.image_id: c for c in caps}
    assert len(by_id) == n_img
    assert all(re.fullmatch(r"a( [a-z]+)?( [a-z]+)?\.", c.caption) for c in caps)
    assert all(c.turns == [(CAPTION_INSTRUCTION, c.caption)] for c in caps)
    for e in qa[:50]:
        assert re.fullmatch(rf"easyvqa-{split}-\d+", e.image_id)
        assert e.image == by_id[e.image_id].image and e.image.endswith(".png")
        assert len(e.turns) == 1
    bad = [(e.image_id, e.turns[0]) for e in qa
           if _contradicts(by_id[e.image_id].caption, *e.turns[0])]
    assert bad == []
    # every directly answered "what color/shape" question is reflected in the caption
    for e in qa:
        q, a = e.turns[0]
        if a in _COLOURS | _SHAPES:
            assert a in by_id[e.image_id].caption
    st = easy_vqa_caption_stats(split)
    assert st["colour+shape"] + st["colour only"] + st["shape only"] + st["none"] == n_img
    assert st["colour+shape"] > 0.85 * n_img and st["conflicting facts"] == 0
    assert st.get("questions with an unknown template", 0) == 0


def test_easy_vqa_bad_split():
    with pytest.raises(ValueError):
        easy_vqa("val")


def test_example_defaults():
    e = Example(image="/x.png", image_id="x", turns=[("q", "a")])
    assert e.caption == "" and e.id == ""
