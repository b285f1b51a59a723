"""Tiny synthetic data for tests: coloured shapes drawn with Pillow, written as LLaVA JSON."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SHAPES = ("circle", "square")


def draw(colour: str, shape: str, size: int = 32, jitter: int = 0) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    a, b = 6 + jitter % 4, size - 6 - jitter % 3
    (d.ellipse if shape == "circle" else d.rectangle)([a, a, b, b], fill=COLOURS[colour])
    return im


def make_llava(root: Path, n_per: int = 4, bad: bool = False) -> tuple[Path, Path]:
    """Write images + a LLaVA JSON with caption and QA records; returns (json, image folder)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    i = 0
    for c in COLOURS:
        for s in SHAPES:
            for j in range(n_per):
                name = f"{c}_{s}_{j}.png"
                draw(c, s, jitter=j).save(images / name)
                records.append({"id": f"cap{i}", "image": name, "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": f"a {c} {s}."}]})
                records.append({"id": f"qa{i}a", "image": name, "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the shape?"},
                    {"from": "gpt", "value": c}]})
                records.append({"id": f"qa{i}b", "image": name, "conversations": [
                    {"from": "human", "value": "<image>\nWhat shape is this?"},
                    {"from": "gpt", "value": s}]})
                i += 1
    if bad:
        (images / "broken.png").write_bytes(b"not a png at all")
        records += [
            {"id": "bad1", "image": "missing.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
            {"id": "bad2", "image": "broken.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
            {"id": "bad3", "image": "red_circle_0.png", "conversations": [
                {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]},
            {"id": "bad4", "image": "red_circle_0.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "  "}]},
            {"id": "bad5", "conversations": "nonsense"},
        ]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, images
