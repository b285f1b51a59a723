"""The Qt desktop demo (`tinyalign.demo`), offscreen: open the session's bundle, set an image, ask,
wait for the streamed answer, and check the window's screenshot and labels."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_runtime import runtime_bundle  # noqa: E402

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed: pip install 'tinyalign[demo]'")


@pytest.fixture(scope="module")
def app():
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication(["tinyalign-test"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return runtime_bundle(tmp_path_factory)


def _wait(app, window, timeout=60.0):
    t0 = time.monotonic()
    while window.busy and time.monotonic() - t0 < timeout:
        app.processEvents()
        time.sleep(0.01)
    app.processEvents()
    assert not window.busy, "the demo did not finish answering in time"


def _pixels(widget, path: Path) -> np.ndarray:
    from PIL import Image

    assert widget.grab().save(str(path))
    return np.asarray(Image.open(path).convert("RGB"))


def test_demo_answers_streams_and_renders(app, inputs, tmp_path):
    from tinyalign.demo import create_window
    from tinyalign.runtime import Bundle

    bundle = Bundle.open(inputs["bundle"])
    img = inputs["images"] / "red_circle_0.png"
    question = "what color is the circle?"
    want = bundle.ask(img, question)
    win = create_window(bundle)
    win.show()
    app.processEvents()
    blank = _pixels(win, tmp_path / "before.png")
    assert win.set_image(img)
    pieces = []
    win._signals.piece.connect(pieces.append)
    assert win.ask(question)
    _wait(app, win)
    assert win.last_answer is not None
    assert win.answer.text() == (want.text or "(empty answer)")
    assert want.text in win.answer.text()
    assert "".join(pieces).strip() == want.text
    assert win.memories.count() == len(want.memories)
    assert want.memories[0].caption in win.memories.item(0).text()
    assert "encode" in win.timings.text() and "total" in win.timings.text()
    shot = _pixels(win, tmp_path / "demo.png")
    assert shot.shape[0] >= 400 and shot.shape[1] >= 600
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    assert colours > 50 and shot.std() > 20, (colours, shot.std())
    assert np.abs(shot.astype(int) - blank.astype(int)).sum() > 0  # the image and answer appeared
    red = (shot[..., 0] > 180) & (shot[..., 1] < 80) & (shot[..., 2] < 80)
    assert red.sum() > 1000  # the red circle's preview is on screen
    win.close()


def test_demo_shows_errors_instead_of_crashing(app, inputs, tmp_path):
    from tinyalign.demo import create_window

    win = create_window(inputs["bundle"])
    win.show()
    assert not win.ask("what shape is this?")  # no image yet
    assert "Open an image" in win.answer.text()
    bad = tmp_path / "truncated.png"
    bad.write_bytes((inputs["images"] / "blue_square_0.png").read_bytes()[:60])
    assert not win.set_image(bad)
    assert "truncated" in win.answer.text() or "corrupt" in win.answer.text()
    assert win.set_image(inputs["images"] / "blue_square_0.png")
    assert win.ask("what color is the square? " * 30)  # too long: reported by the worker
    _wait(app, win)
    assert "maximum sequence length" in win.answer.text()
    assert win.ask_button.isEnabled()
    win.close()


def test_demo_command_help_and_missing_bundle():
    from click.testing import CliRunner

    from tinyalign.demo import demo_command

    r = CliRunner().invoke(demo_command, ["--help"])
    assert r.exit_code == 0 and "--bundle" in r.output
    r = CliRunner().invoke(demo_command, ["--bundle", "/nonexistent/bundle"])
    assert r.exit_code == 2 and "does not exist" in r.output
