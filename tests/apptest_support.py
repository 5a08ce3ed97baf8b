"""What the AppTest suites share: the app's path, page readers, a loopback server (the `app` and `blank`
fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import re
import threading
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "pfcam_app" / "page.py"  # app.py serves this page behind the upload limits
TIMEOUT = 900  # seconds per script run: the CPU is small and shared
DEMO = ("demo_r50", "demo_r50_hybrid")
CAPTION = re.compile(r"^(?P<cls>[a-z_]+) · (?P<pct>\d+\.\d)%")
UPLOAD_NOTE = " · ⚠ 10-shape demo model: meaningful on shape scenes only"  # demo models on an upload
FIRST_SCENE = "scene_01_triangle.png"  # selected on the demo first screen


def demo_weights_bundled() -> bool:
    from pfcam_app import core
    from pfnet import weights

    # The app's offline default pair; demo R50-max is optional.
    return all(weights.weight_status(model_id) == "bundled" for model_id in core.DEMO_DEFAULT)


DEMO_MISSING = "bundled demo weights missing in assets/weights (made by `pfcam train-demo`)"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_png(index: int) -> bytes:
    """A demo scene at the demo input size, from a stream the app does not offer (seed 31337)."""
    from pfdemo import scenes
    from pfnet import zoo

    return png(scenes.render_scene(31337, index, zoo.get("demo_r50").preprocess.input_size).image)


def originals(at) -> list:
    return [image for image in at.image if image.captions[0].startswith("Original")]


def overlays(at) -> list:
    """The heatmap cells (the colour scale has no caption)."""
    return [image for image in at.image if " · " in image.captions[0] and not image.captions[0].startswith("Original")]


def row_notes(at) -> list[str]:
    return [m.value for m in at.markdown if "computed in" in m.value]


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def expected_top1(model_id: str, data: bytes) -> tuple[str, float]:
    """What the model itself predicts for the image (computed here, independently of the app)."""
    from cams.images import load_image
    from pfnet import weights, zoo
    from pfnet.preprocess import prepare

    entry = zoo.get(model_id)
    model = weights.load(model_id, device="cpu")
    tensor = prepare(load_image(data, "x.png"), entry.preprocess, "full").tensor.unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(model(tensor), dim=1)[0]
    index = int(probs.argmax())
    return entry.class_names()[index], float(probs[index])


def upload(at, files: list[tuple[str, bytes]]) -> None:
    mime = {"png": "image/png", "jpg": "image/jpeg"}
    at.file_uploader(key="uploads").set_value([(n, d, mime.get(n.rsplit(".", 1)[-1], "image/png")) for n, d in files])
    at.run()
    assert_clean(at)


def zero_checkpoint(model_id: str) -> dict:
    from pfnet import zoo

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in zoo.get(model_id).build().state_dict().items()}
    return {k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
            for k, s in shapes.items()}


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """A loopback HTTP server for the files under ``folder``; yields its base URL."""
    class HubLikeHandler(http.server.SimpleHTTPRequestHandler):
        """Files as a plain server sends them, with the two headers huggingface_hub needs from the Hub."""

        def log_message(self, *args, **kwargs):
            pass

        def end_headers(self):
            self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
            self.send_header("ETag", '"' + hashlib.sha256(self.path.encode()).hexdigest() + '"')
            super().end_headers()

    handler = functools.partial(HubLikeHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
