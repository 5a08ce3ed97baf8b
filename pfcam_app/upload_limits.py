"""The upload limits, enforced by the server at the HTTP layer (issue #11).

Streamlit has one server-wide ``server.maxUploadSize`` (here the checkpoint cap); a widget's ``max_upload_size`` is
checked only in the browser, and its upload request names no widget (a PUT to
``/_stcore/upload_file/<session>/<file id>``). ``UploadLimits`` is an ASGI middleware in front of that route that
reads the file name from the multipart header before any of the file is kept, then:

- a file named like a checkpoint (``CHECKPOINT_TYPES``) may be up to ``CHECKPOINT_LIMIT_MB``; any other file (an
  image slot's) up to ``IMAGE_LIMIT_MB``;
- a session holds at most ``SESSION_UPLOAD_MB`` of uploads in all (what Streamlit's store holds for it, plus its
  uploads in flight), so PUTs to made-up file ids cannot pile up;
- the whole server holds at most :func:`server_upload_bytes` (``PFCAM_SERVER_UPLOAD_MB``, default a quarter of the
  machine's memory) of uploads, every session's together, in the store and in flight;
- a name that fits no uploader of the page (an image, a checkpoint or a boxes CSV: ``WIDGET_TYPES``), or that
  holds a NUL or another control character, is refused (400) before any of its bytes are kept.

A refused upload is answered 413 while its body streams in: neither the middleware nor Streamlit keeps it. When a
browser's websocket closes, the uploads of every session that is no longer connected are dropped from Streamlit's
store at once (Streamlit would keep them for a reconnect until the next client arrives) and the freed memory is
handed back to the system (``malloc_trim``): a session that went away holds nothing.
``app.py`` and ``pfcam app`` (``pfcam_app/server.py``) run the page behind it (Streamlit's ``App``).
"""
from __future__ import annotations

import ctypes
import os
import re
from collections import defaultdict
from typing import Any
from collections.abc import Callable

from cams.images import IMAGE_EXTENSIONS

IMAGE_LIMIT_MB = 20  # per image file
CHECKPOINT_LIMIT_MB = 1024  # per checkpoint file (also server.maxUploadSize, Streamlit's own last bound)
SESSION_UPLOAD_MB = 2048  # all uploads one session holds at once: two full-size checkpoints, or one and images
CHECKPOINT_TYPES = ["pth", "pt", "bin", "safetensors", "ckpt", "tar"]
IMAGE_TYPES = sorted(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
WIDGET_TYPES = {"image": IMAGE_TYPES, "checkpoint": CHECKPOINT_TYPES, "boxes CSV": ["csv"]}  # the page's uploaders
STREAM_ROUTE = re.compile(r"/_stcore/stream$")
UPLOAD_ROUTE = re.compile(r"/_stcore/upload_file/(?P<session>[^/]+)/(?P<file>[^/]+)$")
HEAD_BYTES = 16 * 1024  # the multipart part header (boundary, Content-Disposition, Content-Type) fits in this
FRAMING_BYTES = 64 * 1024  # multipart framing allowed on top of the file's own bytes
FILENAME = re.compile(rb'filename="([^"\r\n]*)"')

Receive = Callable[[], Any]


class UploadRefused(Exception):
    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def is_checkpoint_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in CHECKPOINT_TYPES


def part_file_name(head: bytes) -> str:
    """The file name of the first multipart part ('' when the header does not give one)."""
    match = FILENAME.search(head)
    return match.group(1).decode("utf-8", "replace") if match else ""


def server_upload_bytes() -> int:
    """The server-wide budget for uploads held in memory: env ``PFCAM_SERVER_UPLOAD_MB``, else a quarter of the
    machine's memory (at least one checkpoint's ``CHECKPOINT_LIMIT_MB``)."""
    raw = os.environ.get("PFCAM_SERVER_UPLOAD_MB", "").strip()
    try:
        if raw and float(raw) > 0:
            return int(float(raw) * 2**20)
    except ValueError:
        pass  # an unreadable setting: the default (the app still starts)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GB
        memory = 16 * 2**30
    return max(memory // 4, CHECKPOINT_LIMIT_MB * 2**20)


def name_problem(name: str) -> str | None:
    """Why an upload's file name fits no uploader of the page (its kind is not in ``WIDGET_TYPES``, or it holds
    a NUL or control character), or None."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "its name holds a NUL or control character"
    extension = name.rsplit(".", 1)[1].lower() if "." in name else ""
    if not any(extension in types for types in WIDGET_TYPES.values()):
        kinds = ", ".join(f".{ext}" for types in WIDGET_TYPES.values() for ext in types)
        return f"no uploader takes {'.' + extension if extension else 'a file without an extension'} ({kinds})"
    return None


def widget_problem(name: str, kind: str) -> str | None:
    """Why a file named ``name`` does not fit the ``kind`` uploader (``WIDGET_TYPES``), or None: a file renamed or
    retyped between picking and upload, or sent to another uploader's URL."""
    problem = name_problem(name)
    if problem is not None:
        return problem
    extension = name.rsplit(".", 1)[1].lower()
    if extension not in WIDGET_TYPES[kind]:
        return f"it is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({', '.join(WIDGET_TYPES[kind])})"
    return None


def total_held_bytes() -> int:
    """Bytes Streamlit's upload store holds for every session together (0 without a runtime)."""
    try:
        from streamlit.runtime import get_instance

        storage = getattr(get_instance().uploaded_file_mgr, "file_storage", {})
        return sum(len(record.data) for files in list(storage.values()) for record in list(files.values()))
    except Exception:  # noqa: BLE001 - no runtime (yet): nothing is held
        return 0


def release_gone_sessions() -> int:
    """Drop the uploads of every session that is no longer connected from Streamlit's store and hand the memory
    back to the system; returns the bytes dropped. Called when a browser's websocket closes."""
    try:
        from streamlit.runtime import get_instance

        runtime = get_instance()
        manager = runtime.uploaded_file_mgr
        storage = getattr(manager, "file_storage", {})
        gone = [session for session in list(storage) if not runtime.is_active_session(session)]
        dropped = sum(len(record.data) for session in gone for record in list(storage.get(session, {}).values()))
        for session in gone:
            manager.remove_session_files(session)
    except Exception:  # noqa: BLE001 - no runtime: nothing to release
        return 0
    if dropped:
        trim_memory()
    return dropped


def trim_memory() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def file_limit(name: str) -> int:
    """The byte limit for one uploaded file, by its kind."""
    return (CHECKPOINT_LIMIT_MB if is_checkpoint_name(name) else IMAGE_LIMIT_MB) * 2**20


def session_held_bytes(session_id: str) -> int:
    """Bytes Streamlit's upload store holds for a session (0 without a runtime)."""
    try:
        from streamlit.runtime import get_instance

        storage = getattr(get_instance().uploaded_file_mgr, "file_storage", {})
        return sum(len(record.data) for record in dict(storage.get(session_id, {})).values())
    except Exception:  # noqa: BLE001 - no runtime (yet): nothing is held
        return 0


class UploadLimits:
    """ASGI middleware: the per-kind and per-session upload limits above, on Streamlit's upload route."""

    def __init__(self, app: Any, held_bytes: Callable[[str], int] = session_held_bytes,
                 session_bytes: int | None = None, server_bytes: int | None = None,
                 total_held: Callable[[], int] = total_held_bytes,
                 release: Callable[[], int] = release_gone_sessions) -> None:
        self.app = app
        self.held_bytes = held_bytes
        self.session_bytes = session_bytes if session_bytes is not None else SESSION_UPLOAD_MB * 2**20
        self.server_bytes = server_bytes if server_bytes is not None else server_upload_bytes()
        self.total_held = total_held
        self.release = release
        self.in_flight: dict[str, int] = defaultdict(int)  # session -> body bytes of its uploads being received

    def room(self, session: str) -> int:
        """Bytes ``session`` may still upload: its own budget and the server's, whichever is smaller."""
        own = self.session_bytes - self.held_bytes(session) - self.in_flight[session]
        server = self.server_bytes - self.total_held() - sum(self.in_flight.values())
        return min(own, server)

    async def __call__(self, scope: dict, receive: Receive, send: Callable) -> None:
        if scope.get("type") == "websocket" and STREAM_ROUTE.search(scope.get("path", "")):
            try:
                await self.app(scope, receive, send)
            finally:  # the browser went away: its session's uploads go now, not when the next client connects
                self.release()
            return
        match = UPLOAD_ROUTE.search(scope.get("path", "")) if scope.get("type") == "http" else None
        if match is None or scope.get("method") != "PUT":
            await self.app(scope, receive, send)
            return
        body = BoundedBody(self, match["session"], receive)
        try:
            await body.read_head(dict(scope.get("headers", [])).get(b"content-length", b""))
            await self.app(scope, body.receive, send)
        except UploadRefused as refused:
            await refuse(send, refused.message, refused.status)
        finally:
            body.release()


class BoundedBody:
    """One upload's request body: its part header read first to choose the limit, the rest counted against it."""

    def __init__(self, limits: UploadLimits, session: str, receive: Receive) -> None:
        self.limits, self.session, self.upstream = limits, session, receive
        self.pending: list[dict] = []
        self.received = 0
        self.limit = 0
        self.refusal = ""

    def count(self, size: int) -> None:
        self.received += size
        self.limits.in_flight[self.session] += size
        if self.received > self.limit:
            raise UploadRefused(self.refusal)

    async def read_head(self, declared: bytes) -> None:
        head, more = b"", True
        while more and len(head) < HEAD_BYTES and b"\r\n\r\n" not in head:
            message = await self.upstream()
            self.pending.append(message)
            if message["type"] != "http.request":
                return  # the client went away: the app sees it as it is
            head += message.get("body", b"")
            more = message.get("more_body", False)
        name = part_file_name(head)
        problem = name_problem(name)
        if problem is not None:
            raise UploadRefused(f"Upload refused: {name!r}: {problem}.", 400)
        room = self.limits.room(self.session)
        self.limit = max(0, min(file_limit(name), room)) + FRAMING_BYTES
        kind = "a checkpoint" if is_checkpoint_name(name) else "an image"
        self.refusal = (f"Upload refused: over the limit for {kind} ({file_limit(name) // 2**20} MB per file, "
                        f"{self.limits.session_bytes // 2**20} MB of uploads per session, "
                        f"{self.limits.server_bytes // 2**20} MB for the whole server).")
        if declared.isdigit() and int(declared) > self.limit:
            raise UploadRefused(self.refusal)
        self.count(len(head))

    async def receive(self) -> dict:
        if self.pending:
            return self.pending.pop(0)
        message = await self.upstream()
        self.count(len(message.get("body", b"")))
        return message

    def release(self) -> None:
        """The body is no longer in flight (kept by Streamlit's store, or dropped)."""
        left = self.limits.in_flight[self.session] - self.received
        if left > 0:
            self.limits.in_flight[self.session] = left
        else:
            self.limits.in_flight.pop(self.session, None)
        self.received = 0


async def refuse(send: Callable, message: str, status: int = 413) -> None:
    body = message.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def middleware() -> list:
    """The middleware list for Streamlit's ``App`` (``app.py``, ``pfcam_app/server.py``)."""
    from starlette.middleware import Middleware

    return [Middleware(UploadLimits)]
