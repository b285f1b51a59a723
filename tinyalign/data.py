"""Dataset readers: LLaVA-format JSON (users' own data) and easy-vqa (offline, from its package).

No torch here (the on-device runtime and tools import this module where torch is absent).

Readers never crash on a bad record: they skip it and count it by reason in a `LoadReport`.
A file that is not a dataset at all (not JSON, not a list) raises `DataError`.
"""

from __future__ import annotations

import json
import os
import re
import string
import tempfile
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

__all__ = [
    "DataError",
    "Example",
    "LoadReport",
    "CAPTION_INSTRUCTION",
    "load_llava_json",
    "save_llava_json",
    "easy_vqa",
    "easy_vqa_answers",
    "easy_vqa_caption_stats",
    "normalize_answer",
]

IMAGE_TOKEN = "<image>"

#: The instruction paired with captions built here (easy-vqa caption examples).
CAPTION_INSTRUCTION = "Describe the image briefly."

# Skip reasons (keys of LoadReport.skipped).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
NO_IMAGE_FIELD = "no image field"
NO_PLACEHOLDER = "no <image>"
SEVERAL_PLACEHOLDERS = "several <image>"
EMPTY_ANSWER = "empty answer"
EMPTY_QUESTION = "empty question"
MALFORMED = "malformed record"


class DataError(ValueError):
    """A data file cannot be read as a dataset at all; the message says what to fix."""


@dataclass
class Example:
    """One conversation about one image."""

    image: str  # absolute path of the image file
    image_id: str  # stable id of the image (same for all questions about it)
    turns: list[tuple[str, str]]  # (question/instruction, answer); "<image>" removed from the text
    caption: str = ""  # a caption of the image when known
    id: str = ""  # the record's own id when it had one (LLaVA "id")


@dataclass
class LoadReport:
    """What a reader read, kept and skipped (reason -> count), with a few sample ids per reason."""

    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def skip(self, reason: str, where: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if where:
            lst = self.samples.setdefault(reason, [])
            if len(lst) < 5:
                lst.append(where)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        src = f"{self.source}: " if self.source else ""
        head = f"{src}kept {self.kept} of {self.total} records"
        if not self.skipped:
            return head + ", skipped none"
        parts = []
        for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            sample = self.samples.get(reason)
            parts.append(f"{reason}: {n}" + (f" (e.g. {', '.join(sample[:3])})" if sample else ""))
        return f"{head}, skipped {self.n_skipped} ({'; '.join(parts)})"


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}


def normalize_answer(s: str) -> str:
    """Normalise an answer for exact-match accuracy.

    Unicode NFKC, lower case, punctuation removed (a "." or "," between digits is kept, so
    "3.5" stays "3.5"; apostrophes are dropped, "don't" -> "dont"; other punctuation becomes a
    space), the articles a/an/the removed, whitespace collapsed.
    """
    if not isinstance(s, str):
        s = "" if s is None else str(s)
    s = unicodedata.normalize("NFKC", s).lower()
    out = []
    for i, ch in enumerate(s):
        if ch in _PUNCT:
            if ch in ".," and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit():
                out.append(ch)
            elif ch in "'\u2019":
                continue
            else:
                out.append(" ")
        else:
            out.append(ch)
    s = _ARTICLES.sub(" ", "".join(out))
    return " ".join(s.split())


# ---------------------------------------------------------------------------------------------
# LLaVA JSON
# ---------------------------------------------------------------------------------------------

_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "model"}

# Single-turn instructions that ask for a caption (LLaVA-558K's brief templates and the like).
_CAPTION_WORDS = re.compile(
    r"\b(describe|description|caption|summary|summarize|summarise|explanation|narrative|"
    r"account|interpretation|depict|depiction)\b")
_LONG_FORM = re.compile(r"\b(detail|detailed|elaborate|comprehensive|thorough|in depth)\b")


def _is_caption_instruction(q: str) -> bool:
    q = q.strip().lower()
    if not q:
        return True
    if "?" in q or len(q.split()) > 15:
        return False
    return bool(_CAPTION_WORDS.search(q)) and not _LONG_FORM.search(q)


def _strip_image_token(text: str) -> str:
    return re.sub(r"\s*<image>\s*", " ", text).strip()


def _read_records(path: Path, report: LoadReport) -> list:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"data file not found: {path}") from e
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text, so not a LLaVA JSON file ({e})") from e
    if path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append(_BadLine(n))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        "a LLaVA data file is a JSON list of records") from e
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list; a LLaVA data file "
                        'is a list of {"id", "image", "conversations"} records')
    return data


class _BadLine:
    def __init__(self, line: int):
        self.line = line


def _verify_image(path: str) -> bool:
    from PIL import Image  # imported lazily: listing a dataset without checks needs no Pillow

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.verify()
        return True
    except Exception:
        return False


def _parse_record(rec, image_folder: Path, check_images: bool, exists_cache: dict,
                  verify_cache: dict) -> tuple[Example | None, str | None]:
    """One LLaVA record -> (Example, None) or (None, skip reason)."""
    if not isinstance(rec, dict):
        return None, MALFORMED
    convs = rec.get("conversations")
    if not isinstance(convs, list) or len(convs) < 2:
        return None, MALFORMED
    if "image" not in rec or rec["image"] in (None, ""):
        return None, NO_IMAGE_FIELD
    image_rel = rec["image"]
    if not isinstance(image_rel, str):  # a list = a multi-image record: not supported
        return None, MALFORMED

    turns: list[tuple[str, str]] = []
    n_tokens = 0
    first_has_token = False
    for k in range(0, len(convs), 2):
        pair = convs[k:k + 2]
        if len(pair) != 2 or not all(isinstance(t, dict) for t in pair):
            return None, MALFORMED
        h, g = pair
        h_from = h.get("from", h.get("role"))
        g_from = g.get("from", g.get("role"))
        hv = h.get("value", h.get("content"))
        gv = g.get("value", g.get("content"))
        if (not isinstance(h_from, str) or h_from.lower() not in _HUMAN
                or not isinstance(g_from, str) or g_from.lower() not in _GPT
                or not isinstance(hv, str) or not isinstance(gv, (str, type(None)))):
            return None, MALFORMED
        c = hv.count(IMAGE_TOKEN)
        n_tokens += c + (gv or "").count(IMAGE_TOKEN)
        if k == 0:
            first_has_token = c > 0
        q = _strip_image_token(hv)
        a = (gv or "").strip()
        if not a:
            return None, EMPTY_ANSWER
        if not q and k > 0:
            return None, EMPTY_QUESTION
        turns.append((q, a))
    if not first_has_token:
        return None, NO_PLACEHOLDER
    if n_tokens > 1:
        return None, SEVERAL_PLACEHOLDERS

    image_path = os.path.abspath(os.path.join(image_folder, os.path.expanduser(image_rel)))
    ok = exists_cache.get(image_path)
    if ok is None:
        ok = exists_cache[image_path] = os.path.isfile(image_path)
    if not ok:
        return None, MISSING_IMAGE
    if check_images:
        ok = verify_cache.get(image_path)
        if ok is None:
            ok = verify_cache[image_path] = _verify_image(image_path)
        if not ok:
            return None, UNREADABLE_IMAGE

    caption = rec.get("caption") if isinstance(rec.get("caption"), str) else ""
    if not caption and len(turns) == 1 and _is_caption_instruction(turns[0][0]):
        caption = turns[0][1]
    image_id = rec.get("image_id")
    if not isinstance(image_id, (str, int)) or image_id == "":
        image_id = Path(image_rel).as_posix()
    rid = rec.get("id")
    return Example(image=image_path, image_id=str(image_id), turns=turns, caption=caption,
                   id="" if rid is None else str(rid)), None


def load_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike,
                    check_images: bool = True) -> tuple[list[Example], LoadReport]:
    """Read a LLaVA-format data file: a JSON list of
    ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``.

    The first human turn must hold one ``<image>`` placeholder (before or after the text); it
    is removed from the text. Turns must alternate human, gpt. ``image`` is relative to
    `image_folder` (or absolute). ``.jsonl`` files (one record per line) are read too.

    Bad records are skipped and counted by reason, never raised: missing image file,
    unreadable image (Pillow ``verify``, only when `check_images`), no image field (text-only
    record), no ``<image>`` in the first human turn, several ``<image>``, an empty answer, an
    empty later question, malformed structure.

    A single-turn record whose instruction is empty or a short caption request
    ("Describe the image briefly.", LLaVA-558K's templates) gets its answer as `caption`.
    `image_id` is the record's ``image_id`` key if present (written by `save_llava_json`),
    else the ``image`` path as written in the file.

    Raises `DataError` if the file is missing, not JSON, or not a list.
    """
    path = Path(path).expanduser()
    image_folder = Path(image_folder).expanduser()
    report = LoadReport(source=str(path))
    records = _read_records(path, report)
    examples: list[Example] = []
    exists_cache: dict[str, bool] = {}
    verify_cache: dict[str, bool] = {}
    for i, rec in enumerate(records):
        report.total += 1
        where = f"#{i}"
        if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
            where = f"#{i} id={rec['id']}"
        if isinstance(rec, _BadLine):
            report.skip(MALFORMED, f"line {rec.line} (not JSON)")
            continue
        try:
            ex, reason = _parse_record(rec, image_folder, check_images, exists_cache, verify_cache)
        except Exception as e:  # belt and braces: a reader never crashes on one record
            ex, reason = None, MALFORMED
            where += f" ({type(e).__name__})"
        if ex is None:
            report.skip(reason, where)
        else:
            examples.append(ex)
            report.kept += 1
    return examples, report


def save_llava_json(examples: Iterable[Example], path: str | os.PathLike,
                    image_folder: str | os.PathLike | None = None) -> None:
    """Write examples as a LLaVA JSON list, atomically (temp file + ``os.replace``).

    ``image`` is written relative to `image_folder` when given and the image lies under it,
    else as the absolute path. The extra keys ``image_id`` and ``caption`` (ignored by LLaVA
    tools) keep a round trip through `load_llava_json` lossless.
    """
    path = Path(path).expanduser()
    base = Path(image_folder).expanduser().resolve() if image_folder is not None else None
    records = []
    for i, ex in enumerate(examples):
        image = str(ex.image)
        if base is not None:
            try:
                image = Path(os.path.abspath(image)).relative_to(base).as_posix()
            except ValueError:
                pass
        convs = []
        for j, (q, a) in enumerate(ex.turns):
            value = f"{IMAGE_TOKEN}\n{q}" if j == 0 and q else (IMAGE_TOKEN if j == 0 else q)
            convs.append({"from": "human", "value": value})
            convs.append({"from": "gpt", "value": a})
        rec = {"id": ex.id or f"{ex.image_id}-{i}", "image": image, "image_id": ex.image_id,
               "conversations": convs}
        if ex.caption:
            rec["caption"] = ex.caption
        records.append(rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------------------------
# easy-vqa
# ---------------------------------------------------------------------------------------------

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def _easy_vqa_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the easy-vqa package is not installed: pip install easy-vqa==1.0 "
                        "(or the 'pretrained' extra of tinyalign)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (d / "answers.txt").is_file():
        raise DataError(f"easy-vqa data not found under {d}; reinstall easy-vqa==1.0")
    return d


def easy_vqa_answers() -> list[str]:
    """The 13 easy-vqa answers, in the package's order (answers.txt)."""
    text = (_easy_vqa_dir() / "answers.txt").read_text(encoding="utf-8")
    return [a.strip() for a in text.splitlines() if a.strip()]


def _easy_vqa_vocab() -> tuple[list[str], list[str]]:
    answers = easy_vqa_answers()
    shapes = [a for a in answers if a in EASY_VQA_SHAPES]
    colours = [a for a in answers if a not in EASY_VQA_SHAPES and a not in ("yes", "no")]
    return colours, shapes


_NEGATION = re.compile(r"\b(not|no)\b")


class _Facts:
    """What an image's questions reveal about its one shape: positives and ruled-out values."""

    __slots__ = ("pos_colour", "neg_colour", "pos_shape", "neg_shape")

    def __init__(self):
        self.pos_colour: set[str] = set()
        self.neg_colour: set[str] = set()
        self.pos_shape: set[str] = set()
        self.neg_shape: set[str] = set()


def _add_facts(facts: _Facts, question: str, answer: str, colours: list[str],
               shapes: list[str]) -> bool:
    """Record what (question, answer) says about the image; False if the template is unknown."""
    words = re.findall(r"[a-z]+", question.lower())
    cs = [w for w in words if w in colours]
    ss = [w for w in words if w in shapes]
    answer = answer.strip().lower()
    if answer in ("yes", "no"):
        # "is there a red shape?", "does the image not contain a circle?", "is no circle present?"
        if len(cs) + len(ss) != 1:
            return False
        truth = (answer == "yes") != bool(_NEGATION.search(question.lower()))
        if cs:
            (facts.pos_colour if truth else facts.neg_colour).add(cs[0])
        else:
            (facts.pos_shape if truth else facts.neg_shape).add(ss[0])
        return True
    if words[:1] != ["what"] or _NEGATION.search(question.lower()):
        return False
    # "what color is the circle?" / "what is the red shape?": the named attribute is presupposed.
    if answer in colours:
        facts.pos_colour.add(answer)
    elif answer in shapes:
        facts.pos_shape.add(answer)
    else:
        return False
    facts.pos_colour.update(cs)
    facts.pos_shape.update(ss)
    return True


def _resolve(pos: set[str], neg: set[str], values: list[str]) -> tuple[str | None, bool]:
    """The single value the facts imply (directly or by elimination), and whether they conflict."""
    if len(pos) > 1 or (pos & neg):
        return None, True
    if pos:
        return next(iter(pos)), False
    left = [v for v in values if v not in neg]
    if not left:
        return None, True
    return (left[0] if len(left) == 1 else None), False


def _caption(colour: str | None, shape: str | None) -> str:
    if colour and shape:
        return f"a {colour} {shape}."
    if colour:
        return f"a {colour} shape."
    if shape:
        return f"a {shape}."
    return "a shape."


def _easy_vqa_build(split: str):
    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    d = _easy_vqa_dir() / split
    colours, shapes = _easy_vqa_vocab()
    try:
        questions = json.loads((d / "questions.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read easy-vqa {split} questions at {d / 'questions.json'}: {e}") from e
    images: dict[int, str] = {}
    for p in (d / "images").iterdir():
        if p.suffix == ".png" and p.stem.isdigit():
            images[int(p.stem)] = str(p.resolve())

    stats = Counter()
    facts: dict[int, _Facts] = {}
    qa: list[Example] = []
    for rec in questions:
        if (not isinstance(rec, list) or len(rec) != 3 or not isinstance(rec[0], str)
                or not isinstance(rec[1], str) or not isinstance(rec[2], int)):
            stats["malformed questions"] += 1
            continue
        q, a, iid = rec
        if iid not in images:
            stats["questions without image"] += 1
            continue
        if not _add_facts(facts.setdefault(iid, _Facts()), q, a, colours, shapes):
            stats["questions with an unknown template"] += 1
        qa.append(Example(image=images[iid], image_id=f"easyvqa-{split}-{iid}", turns=[(q, a)]))

    captions: list[Example] = []
    for iid in sorted(images):
        f = facts.get(iid, _Facts())
        colour, c_conflict = _resolve(f.pos_colour, f.neg_colour, colours)
        shape, s_conflict = _resolve(f.pos_shape, f.neg_shape, shapes)
        stats["conflicting facts"] += int(c_conflict or s_conflict)
        stats["colour by elimination"] += int(colour is not None and not f.pos_colour)
        stats["shape by elimination"] += int(shape is not None and not f.pos_shape)
        key = ("colour+shape" if colour and shape else "colour only" if colour
               else "shape only" if shape else "none")
        stats[key] += 1
        cap = _caption(colour, shape)
        captions.append(Example(image=images[iid], image_id=f"easyvqa-{split}-{iid}",
                                turns=[(CAPTION_INSTRUCTION, cap)], caption=cap))
    stats["images"] = len(images)
    stats["questions"] = len(qa)
    return captions, qa, dict(stats)


def easy_vqa(split: str) -> tuple[list[Example], list[Example]]:
    """easy-vqa from the installed package (no download): ``(caption_examples, qa_examples)``.

    - qa_examples: one Example per question, in the file's order, ``turns=[(question, answer)]``,
      ``image_id = f"easyvqa-{split}-{id}"``, ``caption`` left empty (join on image_id for it;
      the caption is built from the answers, so it must never be model input for those
      questions).
    - caption_examples: one per image, sorted by id, ``turns=[(CAPTION_INSTRUCTION, caption)]``
      and ``caption`` set. The caption names the colour and shape that the image's questions
      reveal: "what color ...?" / "what shape ...?" answers, attributes presupposed by a
      question ("what color is the circle?" -> circle, "what is the red shape?" -> red),
      yes/no questions (negated ones included), and elimination (two shapes ruled out -> the
      third; seven colours ruled out -> the eighth). "a red circle." / "a red shape." /
      "a circle." / "a shape.". Facts that conflict leave the attribute unknown.
      `easy_vqa_caption_stats` reports the coverage.
    """
    captions, qa, _ = _easy_vqa_build(split)
    return captions, qa


def easy_vqa_caption_stats(split: str) -> dict[str, int]:
    """Coverage of the easy-vqa captions: images with colour+shape, colour only, shape only,
    none, how many attributes came by elimination, conflicts and skipped questions."""
    return _easy_vqa_build(split)[2]
