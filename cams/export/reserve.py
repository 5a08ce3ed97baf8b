"""Room for the manifest, held on the output folder's disk before an export writes any output (issue #11).

A full disk must never leave a folder whose ``manifest.json`` is out of date: ``run_export`` first allocates a
hidden temporary file as large as the manifest it will write (the current one plus a generous bound per result
and per image), writes the outputs, and frees that room just before it merges the manifest. A disk too full for
the room stops the export before anything is written. The file is named like the other temporary files
(``.manifest-room.PID.RANDOM.tmp``), so a killed run's is removed by the next run and never exported.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from cams.export.files import TEMP_SUFFIX

ROW_BYTES = 2048  # one result's row in manifest.json and manifest.csv, besides its settings (measured: ~700)
IMAGE_BYTES = 1024  # one image's entry (names, size, status), besides its grids
GRID_BYTES = 256  # one grid path in an image's entry (one per target)
BASE_BYTES = 32 * 1024  # versions, warnings, skipped inputs, this run's line in the history, file-system blocks


def manifest_room(root: Path, settings: Mapping[str, Any], results: int, images: int, targets: int) -> int:
    """Bytes the merged manifests may need: the current ones plus ``results`` rows and ``images`` entries."""
    settings_bytes = len(json.dumps(settings, indent=1, default=str).encode())  # each row carries its settings
    current = 0
    for name in ("manifest.json", "manifest.csv"):
        try:
            current += (root / name).stat().st_size
        except OSError:
            pass
    return (current + results * (ROW_BYTES + settings_bytes) + images * (IMAGE_BYTES + targets * GRID_BYTES)
            + 2 * settings_bytes + BASE_BYTES)


class ManifestRoom:
    """``hold()`` allocates ``nbytes`` in ``root`` (``OSError`` when the disk lacks them); ``release()`` frees them."""

    def __init__(self, root: Path, nbytes: int) -> None:
        self.root, self.nbytes = root, nbytes
        self.path: Path | None = None

    def hold(self) -> None:
        handle, name = tempfile.mkstemp(dir=self.root, prefix=f".manifest-room.{os.getpid()}.", suffix=TEMP_SUFFIX)
        self.path = Path(name)
        try:
            try:
                os.posix_fallocate(handle, 0, self.nbytes)  # real blocks, not a sparse file
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                    raise
                for start in range(0, self.nbytes, 2**20):
                    os.write(handle, bytes(min(2**20, self.nbytes - start)))
                os.fsync(handle)
        except BaseException:
            os.close(handle)
            self.release()
            raise
        os.close(handle)

    def release(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None
