"""Memory of one app session given 30 small PNG uploads of 7999x7999 pixels (issue #11, item 2), through
Streamlit's AppTest in this process: prints the upload bytes, RSS before/after and the images refused.
``python benchmarks/bench_server_memory.py [COUNT]`` from a checkout (offline; the bundled demo models)."""
from __future__ import annotations

import io
import os
import struct
import sys
import time
import zlib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def variant(png: bytes, text: str) -> bytes:
    body = b"Comment\0" + text.encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:33] + chunk + png[33:]


def main(count: int = 30) -> None:
    os.environ.setdefault("PFCAM_OFFLINE", "1")
    from streamlit.testing.v1 import AppTest

    buffer = io.BytesIO()
    Image.new("RGB", (7999, 7999)).save(buffer, format="PNG", compress_level=9)
    files = [(f"big{i:02d}.png", variant(buffer.getvalue(), str(i)), "image/png") for i in range(count)]
    at = AppTest.from_file(str(ROOT / "pfcam_app" / "page.py"), default_timeout=1800)
    at.run()
    at.multiselect(key="examples").set_value([])
    at.run()
    before = rss_mb()
    started = time.perf_counter()
    at.file_uploader(key="uploads").set_value(files)
    at.run()
    after = rss_mb()
    refused = sum("MP" in e.value for e in at.error)
    print(f"{count} uploads, {sum(len(f[1]) for f in files) / 2**20:.1f} MB in all: RSS {before:.0f} -> {after:.0f} MB "
          f"(+{after - before:.0f} MB), {refused} refused for the pixel budget, {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
