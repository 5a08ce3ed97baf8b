"""What one oversized image upload costs the server: `streamlit run` on the page alone (no HTTP-layer limits, as
before issue #11's fix) and on app.py (the page behind pfcam_app/upload_limits.py). A browser-like session PUTs
SIZE MB named big.png, streamed, to an upload URL the server gave it; printed: the answer, the server's RSS before
and after, and what Streamlit's upload store holds (its own metrics).

    python benchmarks/bench_upload_limits.py [--mb 300]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the server and session helpers of the tests

from browser_support import app_server, fresh_env  # noqa: E402
from test_hostile_uploads import Session, stored_upload_bytes  # noqa: E402

ENTRIES = ("pfcam_app/page.py", "app.py")


def server_rss_mb(port: int) -> float:
    """RSS of the process listening on ``port`` (found through /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inode = fields[9]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(Path(link).readlink().as_posix() == f"socket:[{inode}]" for link in (proc / "fd").iterdir()):
                status = (proc / "status").read_text()
                return int(status.split("VmRSS:")[1].split()[0]) / 1024
        except OSError:
            continue
    raise RuntimeError(f"no process listens on {port}")


async def one_put(url: str, size_mb: int) -> tuple[int, float, float, float]:
    import websockets

    port = int(url.rsplit(":", 1)[1])
    session = Session(url)
    async with websockets.connect(url.replace("http", "ws") + "/_stcore/stream", subprotocols=["streamlit"]) as ws:
        (path,) = await session.upload_urls(ws, ["big.png"])
        before = server_rss_mb(port)
        status = await asyncio.to_thread(session.put, path, "big.png", size_mb << 20, True)
        after = server_rss_mb(port)
        await asyncio.sleep(5.5)  # the metrics' cache window
        return status, before, after, stored_upload_bytes(url) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the upload in MB (default 300)")
    args = parser.parse_args()
    for entry in ENTRIES:
        with tempfile.TemporaryDirectory() as tmp, \
                app_server(fresh_env(Path(tmp)), Path(tmp) / "server.log", ROOT / entry) as (url, _):
            status, before, after, stored = asyncio.run(one_put(url, args.mb))
        print(f"streamlit run {entry}: PUT {args.mb} MB big.png -> {status}; server RSS {before:.0f} -> "
              f"{after:.0f} MB; upload store {stored:.1f} MB")


if __name__ == "__main__":
    main()
