"""`tinyalign demo`: a small Qt (PySide6) desktop app over the runtime. Open an image (file dialog
or drag and drop), type a question, and watch the answer stream in beside the retrieved memories,
their similarities and the timings of every step.

The window only displays; all inference is `tinyalign.runtime` (no torch), run on a worker
thread so the window stays responsive, with streamed pieces delivered back through Qt signals.
PySide6 is imported only when a window is made (`pip install 'tinyalign[demo]'`), so this module
imports without Qt and without torch.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import click

__all__ = ["create_window", "demo", "demo_command"]

IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.gif *.webp *.tif *.tiff);;All files (*)"
PREVIEW = 300


def _require_qt():
    try:
        import PySide6  # noqa: F401
    except ImportError as exc:
        raise click.ClickException("the desktop demo needs PySide6: pip install 'tinyalign[demo]' "
                                   "(or pip install PySide6-Essentials)") from exc


@functools.cache
def _window_class():
    """The QMainWindow subclass, defined on first use so that importing this module needs no Qt."""
    from PySide6.QtCore import QObject, Qt, Signal
    from PySide6.QtGui import QFont, QImage, QPixmap
    from PySide6.QtWidgets import (QFileDialog, QFrame, QGridLayout, QHBoxLayout, QLabel, QLineEdit,
                                   QListWidget, QMainWindow, QPushButton, QSizePolicy, QVBoxLayout, QWidget)

    from tinyalign.images import load_image
    from tinyalign.runtime import BundleError, ImageError, ProgramError, PromptTooLongError

    user_errors = (ImageError, PromptTooLongError, ProgramError, BundleError, ValueError)

    class _Signals(QObject):
        piece = Signal(str)
        done = Signal(object)
        failed = Signal(str)

    class DemoWindow(QMainWindow):
        """The demo window over one opened Bundle. `set_image(path)`, `ask(question)`; `busy`
        tells whether an answer is being generated and `last_answer` holds the last result."""

        def __init__(self, bundle, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0):
            super().__init__()
            self.bundle = bundle
            self.options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
            self.image_path: Path | None = None
            self.last_answer = None
            self.busy = False
            self._signals = _Signals()
            self._signals.piece.connect(self._on_piece)
            self._signals.done.connect(self._on_done)
            self._signals.failed.connect(self._on_failed)
            self.setWindowTitle(f"TinyAlign demo: {Path(bundle.path).name}")
            self.setAcceptDrops(True)
            self._build()
            self.resize(900, 560)

        # ---- layout ------------------------------------------------------------------------
        def _build(self):
            self.preview = QLabel("Drop an image here\nor click Open image…")
            self.preview.setObjectName("preview")
            self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
            self.preview.setFixedSize(PREVIEW, PREVIEW)
            self.preview.setFrameShape(QFrame.Shape.StyledPanel)
            self.preview.setStyleSheet("QLabel#preview { background: #fafafa; color: #777; }")
            self.open_button = QPushButton("Open image…")
            self.open_button.clicked.connect(self.open_dialog)
            self.image_label = QLabel("no image")
            self.image_label.setWordWrap(True)
            left = QVBoxLayout()
            left.addWidget(self.preview)
            left.addWidget(self.open_button)
            left.addWidget(self.image_label)
            left.addStretch(1)

            self.question = QLineEdit()
            self.question.setPlaceholderText("Ask a question about the image, e.g. What color is the shape?")
            self.question.returnPressed.connect(lambda: self.ask())
            self.ask_button = QPushButton("Ask")
            self.ask_button.setDefault(True)
            self.ask_button.clicked.connect(lambda: self.ask())
            row = QHBoxLayout()
            row.addWidget(self.question, 1)
            row.addWidget(self.ask_button)

            self.answer = QLabel("")
            self.answer.setObjectName("answer")
            self.answer.setWordWrap(True)
            self.answer.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.answer.setMinimumHeight(80)
            self.answer.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
            self.answer.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
            font = QFont(self.answer.font())
            font.setPointSize(font.pointSize() + 4)
            self.answer.setFont(font)
            self.answer.setStyleSheet("QLabel#answer { background: white; border: 1px solid #ccc; padding: 8px; }")
            self.memories = QListWidget()
            self.memories.setObjectName("memories")
            self.timings = QLabel("")
            self.timings.setObjectName("timings")
            self.timings.setWordWrap(True)

            right = QGridLayout()
            right.addLayout(row, 0, 0)
            right.addWidget(QLabel("Answer"), 1, 0)
            right.addWidget(self.answer, 2, 0)
            right.addWidget(QLabel("Retrieved memories (cosine similarity)"), 3, 0)
            right.addWidget(self.memories, 4, 0)
            right.addWidget(self.timings, 5, 0)
            right.setRowStretch(4, 1)

            body = QHBoxLayout()
            body.addLayout(left)
            body.addLayout(right, 1)
            central = QWidget()
            central.setLayout(body)
            self.setCentralWidget(central)
            m = self.bundle.manifest
            bank = f"{len(self.bundle.bank)} memories" if self.bundle.bank is not None else "no retrieval"
            self.statusBar().showMessage(
                f"{m.get('target')} bundle, {(m.get('quantization') or {}).get('preset', '?')}, {bank}, "
                f"{self.bundle.program.backend} ExecuTorch backend, offline")

        # ---- image ---------------------------------------------------------------------------
        def open_dialog(self):
            path, _ = QFileDialog.getOpenFileName(self, "Open image", "", IMAGE_FILTER)
            if path:
                self.set_image(path)

        def set_image(self, path) -> bool:
            """Show `path` as the model will see it (EXIF applied, transparency on white)."""
            try:
                rgb = load_image(path, max_pixels=int(self.bundle.manifest["image"].get("max_pixels") or 40_000_000))
            except ImageError as exc:
                self._show_error(str(exc))
                return False
            data = rgb.tobytes()
            qimg = QImage(data, rgb.width, rgb.height, 3 * rgb.width, QImage.Format.Format_RGB888).copy()
            pix = QPixmap.fromImage(qimg).scaled(PREVIEW, PREVIEW, Qt.AspectRatioMode.KeepAspectRatio,
                                                 Qt.TransformationMode.SmoothTransformation)
            self.preview.setPixmap(pix)
            self.image_path = Path(path)
            self.image_label.setText(f"{self.image_path.name}  ({rgb.width}×{rgb.height})")
            self.answer.setText("")
            return True

        def dragEnterEvent(self, event):  # noqa: N802 (Qt's name)
            if any(u.isLocalFile() for u in event.mimeData().urls()):
                event.acceptProposedAction()

        def dropEvent(self, event):  # noqa: N802
            files = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
            if files:
                self.set_image(files[0])
                event.acceptProposedAction()

        # ---- asking -----------------------------------------------------------------------------
        def ask(self, question: str | None = None) -> bool:
            """Start answering `question` (default: the text field) on a worker thread."""
            if self.busy:
                return False
            if question is not None:
                self.question.setText(question)
            q = self.question.text().strip()
            if self.image_path is None:
                self._show_error("Open an image first (button or drag and drop).")
                return False
            if not q:
                self._show_error("Type a question first.")
                return False
            self.busy = True
            self.ask_button.setEnabled(False)
            self.answer.setText("")
            self.answer.setStyleSheet("QLabel#answer { background: white; border: 1px solid #ccc; padding: 8px; }")
            self.memories.clear()
            self.timings.setText("thinking…")
            threading.Thread(target=self._work, args=(self.image_path, q), daemon=True).start()
            return True

        def _work(self, image, question):
            try:
                ans = self.bundle.ask(image, question, stream=self._signals.piece.emit, **self.options)
            except user_errors as exc:
                self._signals.failed.emit(str(exc))
            except Exception as exc:  # never let a worker error kill the app
                self._signals.failed.emit(f"{type(exc).__name__}: {exc}")
            else:
                self._signals.done.emit(ans)

        def _on_piece(self, piece: str):
            self.answer.setText(self.answer.text() + piece)

        def _on_done(self, ans):
            self.last_answer = ans
            self.answer.setText(ans.text or "(empty answer)")
            for m in ans.memories:
                self.memories.addItem(f"{m.similarity:+.3f}   #{m.id}   {m.caption}")
            t, n = ans.timings, len(ans.token_ids)
            self.timings.setText(
                f"preprocess {t.preprocess_s * 1e3:.1f} ms · encode {t.encode_s * 1e3:.1f} ms · "
                f"retrieve {t.retrieve_s * 1e3:.1f} ms · prefill {t.prefill_s * 1e3:.1f} ms "
                f"({ans.prompt_tokens} positions) · {n} token{'' if n == 1 else 's'} at {t.tokens_per_s:.0f} tok/s · "
                f"total {t.total_s * 1e3:.1f} ms")
            self._finish()

        def _on_failed(self, msg: str):
            self._show_error(msg)
            self.timings.setText("")
            self._finish()

        def _finish(self):
            self.busy = False
            self.ask_button.setEnabled(True)

        def _show_error(self, msg: str):
            self.answer.setStyleSheet("QLabel#answer { background: #fff4f4; color: #a00; border: 1px solid #e99; "
                                      "padding: 8px; }")
            self.answer.setText(msg)

    return DemoWindow


def create_window(bundle, **options):
    """A DemoWindow over `bundle` (a folder or an opened Bundle); a QApplication must exist."""
    from tinyalign.runtime import Bundle

    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    return _window_class()(b, **options)


def demo(bundle, image=None, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0) -> int:
    """Open the demo window on `bundle` (optionally with `image` loaded) and run Qt's event loop."""
    _require_qt()
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(["tinyalign demo"])
    win = create_window(bundle, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if image is not None:
        win.set_image(image)
    win.show()
    return app.exec()


@click.command("demo")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), required=True, help="Bundle folder.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="An image to open at start.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
def demo_command(**kw):
    """Desktop demo: open an image, ask a question, see the answer stream in with the retrieved
    memories and timings. Needs PySide6 (pip install 'tinyalign[demo]').

    Example: tinyalign demo --bundle bundles/tiny-desktop
    """
    from tinyalign.runtime import BundleError, ProgramError

    try:
        raise SystemExit(demo(**kw))
    except (BundleError, ProgramError) as exc:
        raise click.ClickException(str(exc)) from exc
