"""Downloading a zoo checkpoint (Google Drive, Hugging Face) into the cache: streamed to a temporary file, renamed
into place when complete, its sha256 recorded next to it and checked on every later load."""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Union

from pfnet import zoo
from pfnet.checkpoint import _looks_like_html, _sniff, max_bytes
from pfnet.errors import CheckpointError, PfnetError, WeightsUnavailableError


Progress = Callable[[int, Union[int, None]], None]
GDRIVE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
HF_URL = "{endpoint}/{repo}/resolve/main/{filename}"
HF_DEFAULT_FILE = "model.safetensors"
CHUNK = 1 << 20
USER_AGENT = "pfcam/1.0 (+https://github.com/naver-ai/PfLayer)"


def _timeout() -> float:
    try:
        return float(os.environ.get("PFCAM_TIMEOUT", "30"))
    except ValueError:
        return 30.0


def _sha_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_recorded(path: Path) -> str | None:
    try:
        text = _sha_file(path).read_text().strip()
    except OSError:
        return None
    match = re.match(r"^([0-9a-fA-F]{64})\b", text)
    return match.group(1).lower() if match else ""


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _verify(entry: zoo.ZooEntry, path: Path) -> None:
    """Check a cached/bundled file against the known or recorded sha256; record it the first time."""
    expected = (entry.source.sha256 or "").lower() or None
    recorded = None if entry.source.kind == "bundled" else _read_recorded(path)
    actual = _sha256_of(path)
    reference = expected or recorded or None  # "" (an unreadable record) counts as no record
    if reference is None:
        if entry.source.kind != "bundled":
            # Placed by hand: trust it now, notice any later change.
            with contextlib.suppress(OSError):
                _write_atomic(_sha_file(path), f"{actual}  {path.name}\n".encode())
        return
    if actual != reference:
        where = "bundled file" if entry.source.kind == "bundled" else "cached file"
        advice = (f"restore it from the repository (git checkout -- {path})" if entry.source.kind == "bundled"
                  else f"delete {path} and {_sha_file(path)} and download it again "
                       f"(or place a fresh copy from {entry.source.page} there)")
        raise CheckpointError(f"the {where} for {entry.name} is corrupt or was changed: its sha256 is "
                              f"{actual[:16]}..., expected {reference[:16]}...; {advice}")


def _unavailable(entry: zoo.ZooEntry, path: Path, reason: str) -> WeightsUnavailableError:
    """Not cached and cannot be downloaded: say where to get the file and where to save it (``path``)."""
    return WeightsUnavailableError(
        f"weights for {entry.name} are not cached and cannot be downloaded ({reason}). "
        f"To use them, download the file from {entry.source.page} and save it as {path} "
        f"(or upload it / pass its path as weights=...).")


def _source_url(entry: zoo.ZooEntry) -> str:
    source = entry.source
    if source.kind == "gdrive":
        template = os.environ.get("PFCAM_GDRIVE_URL") or GDRIVE_URL
        if "{id}" not in template:
            raise PfnetError("PFCAM_GDRIVE_URL must contain '{id}' where the Drive file id goes")
        return template.replace("{id}", urllib.parse.quote(source.ref, safe=""))
    if source.kind == "hf":
        parts = source.ref.split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or HF_DEFAULT_FILE
        template = os.environ.get("PFCAM_HF_URL") or HF_URL
        endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        try:
            return template.format(endpoint=endpoint, repo=repo, filename=filename)
        except (KeyError, IndexError, ValueError):
            raise PfnetError("PFCAM_HF_URL may only use {endpoint}, {repo} and {filename}") from None
    raise PfnetError(f"{entry.name} has no download source ({source.kind})")


def _html_reason(head: bytes) -> str:
    text = head.decode("utf-8", "replace").lower()
    if "quota" in text or "too many users" in text:
        return "Google Drive says the file's download quota is exceeded; try again later or download it by hand"
    if "virus" in text:
        return "Google Drive served its virus-scan warning page instead of the file"
    if "sign in" in text or "accounts.google" in text:
        return "Google Drive asks to sign in: the file is not shared publicly"
    return "the server sent a web page instead of the checkpoint"


class _Tqdm:
    """tqdm for the CLI (off when stderr is not a terminal); a no-op when tqdm is missing."""

    def __init__(self, name: str):
        self.bar = None
        self.name = name

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a requirement
                self.bar = False
                return
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.name,
                            disable=None, leave=False)
        if self.bar:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _download(url: str, path: Path, entry: zoo.ZooEntry, progress: Progress | None) -> None:
    """Stream ``url`` into a temporary file next to ``path``; rename it into place only when all is well."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PfnetError(f"cannot create the cache directory {path.parent}: {error.strerror or error}") from None
    limit = max_bytes()
    bar = None
    if progress is None:
        bar = progress = _Tqdm(entry.name)
    try:
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as error:
        raise PfnetError(f"cannot write to the cache directory {path.parent}: {error.strerror or error}") from None
    temp = Path(temp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            try:
                response = urllib.request.urlopen(request, timeout=_timeout())
            except urllib.error.HTTPError as error:
                error.close()
                raise _unavailable(entry, path, f"download failed: HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
                raise _unavailable(entry, path, f"network error: {_reason(error)}") from None
            with response:
                total = _content_length(response)
                if total is not None and total > limit:
                    raise _unavailable(entry, path, f"the file is {total} bytes, over the {limit}-byte limit "
                                              "(PFCAM_MAX_BYTES)")
                content_type = (response.headers.get("Content-Type") or "").lower()
                done = 0
                first = True
                progress(0, total)
                while True:
                    try:
                        block = response.read(CHUNK)
                    except http.client.IncompleteRead as error:
                        got = done + len(error.partial or b"")
                        raise _unavailable(entry, path, f"download interrupted after {got} of {total} bytes") from None
                    except (OSError, http.client.HTTPException) as error:
                        raise _unavailable(entry, path, f"download interrupted after {done} bytes: "
                                                  f"{_reason(error)}") from None
                    if not block:
                        break
                    if first:
                        first = False
                        if "text/html" in content_type or _looks_like_html(block):
                            raise _unavailable(entry, path, _html_reason(block))
                    done += len(block)
                    if done > limit:
                        raise _unavailable(entry, path, f"the file is over the {limit}-byte limit (PFCAM_MAX_BYTES)")
                    out.write(block)
                    digest.update(block)
                    progress(done, total)
            if total is not None and done != total:
                raise _unavailable(entry, path, f"download interrupted: got {done} of {total} bytes")
            if done == 0:
                raise _unavailable(entry, path, "the server sent an empty file")
            out.flush()
            os.fsync(out.fileno())
        value = digest.hexdigest()
        expected = (entry.source.sha256 or "").lower()
        if expected and value != expected:
            raise _unavailable(entry, path, f"the downloaded file's sha256 {value[:16]}... is not the expected "
                                      f"{expected[:16]}...")
        with open(temp, "rb") as check:
            head = check.read(64)
        try:
            _sniff(head, "the downloaded file", done)
        except CheckpointError as error:
            raise _unavailable(entry, path, str(error)) from None
        _write_atomic(_sha_file(path), f"{value}  {path.name}\n".encode())
        os.replace(temp, path)
    except OSError as error:  # disk full, permissions: the network errors were mapped above
        with contextlib.suppress(OSError):
            temp.unlink()
        raise PfnetError(f"cannot save the download in {path.parent}: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    finally:
        if bar is not None:
            bar.close()


def _content_length(response: Any) -> int | None:
    raw = response.headers.get("Content-Length")
    try:
        value = int(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return "host not found (no network?)"
    text = getattr(reason, "strerror", None) or str(reason)
    return text or type(reason).__name__


def hub_address() -> tuple[str, int]:
    """(host, port) of the Hugging Face hub: from ``HF_ENDPOINT`` when set, else huggingface.co:443."""
    endpoint = (os.environ.get("HF_ENDPOINT") or "").strip()
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        try:
            port = parts.port
        except ValueError:  # a port that is not a number
            port = None
        if parts.hostname:
            return parts.hostname, port or (80 if parts.scheme == "http" else 443)
    return "huggingface.co", 443


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub host answers a TCP connection (DNS lookup included) within ``timeout`` seconds; never raises.

    The lookup and connection run on a daemon thread so that a resolver which ignores socket timeouts cannot
    hold the caller for longer than ``timeout``.
    """
    import threading

    host, port = hub_address()
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except (OSError, ValueError):
            outcome.append(False)

    worker = threading.Thread(target=attempt, name="pfcam-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])
