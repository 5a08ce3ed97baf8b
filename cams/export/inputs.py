"""What an export reads: files, folders and uploads expanded into images (``collect_inputs``), and the safe,
hashed names their output folders get (``safe_name``)."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from collections.abc import Callable, Iterable

from PIL import Image

from cams.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, has_image_extension, load_image


STEM_CHARS = 48
UploadSource = tuple[str, bytes]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_name(text: object, max_len: int = 64, fallback: str = "x") -> str:
    """One path component from arbitrary text: ASCII ``[A-Za-z0-9._-]``, no leading dot, no ``..``, capped."""
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"_+", "_", _UNSAFE.sub("_", ascii_text)).strip("._-")
    name = name[:max_len].rstrip("._-")
    if not name:
        return fallback
    if name.split(".")[0].upper() in _RESERVED:
        name = "_" + name
    return name


def _printable(text: str) -> str:
    """A label safe for JSON/CSV: undecodable bytes replaced, control characters escaped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def short_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


@dataclass(frozen=True)
class InputItem:
    """One image to export: a file or an upload."""

    label: str  # what the manifest calls it: the path as given, or the upload name
    key: str  # what the folder hash is taken from
    stem: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    @property
    def folder(self) -> str:
        return f"{safe_name(self.stem, STEM_CHARS, 'image')}-{short_hash(self.key)}"

    def load(self) -> Image.Image:
        return load_image(self.path if self.data is None else self.data, name=self.label)

    def content_digest(self) -> str:
        """sha256 (16 hex digits) of the input's bytes, so a re-run can tell a file changed in place; "" when the
        file cannot be read now. Called after the image decoded, so the decoder's byte cap already held."""
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()[:16]
        try:
            with open(self.path, "rb") as handle:  # type: ignore[arg-type]
                return hashlib.file_digest(handle, "sha256").hexdigest()[:16]
        except (OSError, TypeError, ValueError):
            return ""


def decode_input(item: InputItem, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 read_image: Callable[[InputItem], Image.Image] | None = None) -> Image.Image:
    """One input decoded as every engine decodes it (``ImageError`` for a bad one). ``read_image`` replaces the
    decoder (the app's session-budgeted one)."""
    if read_image is not None:
        return read_image(item)
    return load_image(item.path if item.data is None else item.data, name=item.label, max_bytes=max_bytes,
                      max_pixels=max_pixels)


def input_records(item: InputItem, decoded: Image.Image | ImageError
                  ) -> tuple[dict[str, Any], dict[str, str] | None]:
    """What the manifest says of an input once decoded (or refused): its "images" record, and its "skipped"
    entry for a bad input (else None)."""
    info: dict[str, Any] = {"input": item.label, "image_dir": None, "status": "bad"}
    if isinstance(decoded, ImageError):
        info["reason"] = decoded.reason
        return info, {"input": item.label, "stage": "load", "reason": decoded.reason}
    info.update({"image_dir": item.folder, "status": "ok", "width": decoded.width, "height": decoded.height})
    return info, None


def read_input(item: InputItem, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               read_image: Callable[[InputItem], Image.Image] | None = None
               ) -> tuple[Image.Image | None, dict[str, Any], dict[str, str] | None]:
    """One input read as every engine reads it: ``(image, its manifest "images" record, None)``, or for a bad
    input ``(None, its record with the reason, its "skipped" entry)``."""
    try:
        image = decode_input(item, max_bytes, max_pixels, read_image)
    except ImageError as exc:
        return (None, *input_records(item, exc))
    return (image, *input_records(item, image))


def _upload_item(name: object, data: object) -> InputItem:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"an upload must be (name, bytes); got ({type(name).__name__}, {type(data).__name__})")
    data = bytes(data)
    label = _printable(str(name))
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    stem = PurePosixPath(base).stem if base not in ("", ".", "..") else ""
    key = f"upload:{name}:{hashlib.sha256(data).hexdigest()}"
    return InputItem(label, key, stem, None, data)


def inside(path: Path, root: Path | None) -> bool:
    if root is None:
        return False
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symbolic link loop
        return False


def collect_inputs(sources: Iterable[str | os.PathLike | UploadSource],
                   exclude: Path | None = None) -> tuple[list[InputItem], list[dict[str, str]]]:
    """Expand files, folders (recursively, sorted) and uploads into images; list everything else as skipped.

    Files and folders keep the order given; a folder's images come in sorted path order. Files under
    ``exclude`` (the output folder) are ignored. Duplicates (same file, same upload) are listed once.
    """
    items: list[InputItem] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    root = exclude.resolve() if exclude is not None else None

    def add(item: InputItem) -> None:
        if item.key not in seen:
            seen.add(item.key)
            items.append(item)

    def skip(path: Path, reason: str) -> None:
        skipped.append({"input": _printable(str(path)), "stage": "scan", "reason": reason})

    def add_file(path: Path) -> None:
        if not has_image_extension(path):
            skip(path, f"not a supported image type ({path.suffix.lower() or 'no extension'})")
            return
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (Python < 3.13)
            skip(path, _unreadable(exc))
            return
        if not resolved.is_file():
            skip(path, "not a regular file")
            return
        add(InputItem(_printable(str(path)), str(resolved), path.stem, path))

    for source in sources:
        if isinstance(source, tuple):
            add(_upload_item(*source))
            continue
        path = Path(source)
        if (path.is_dir() or path.is_file()) and inside(path, root):
            skip(path, "inside the output folder (the export's own files are never read back as inputs)")
        elif path.is_dir():
            def unreadable(exc: OSError, top: Path = path) -> None:
                skip(Path(exc.filename or top), _unreadable(exc))

            for folder, dirs, files in os.walk(path, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs if not inside(Path(folder, d), root))
                for name in sorted(files):
                    add_file(Path(folder, name))
        elif path.is_file():
            add_file(path)
        elif path.is_symlink():
            try:
                path.resolve(strict=True)
                skip(path, "not a regular file")
            except (OSError, RuntimeError) as exc:
                skip(path, _unreadable(exc))
        elif path.exists():
            skip(path, "not a regular file")
        else:
            skip(path, "no such file or folder")
    return items, skipped


def _unreadable(exc: BaseException) -> str:
    """Why a path cannot be read, in words (symbolic link loops, permissions, dangling links)."""
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "a symbolic link loop"
    if getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if getattr(exc, "errno", None) == errno.ENOENT:
        return "a symbolic link to nothing (no such file)"
    return getattr(exc, "strerror", None) or type(exc).__name__
