"""The upload limits, enforced by the server at the HTTP layer (issue #11).

Streamlit has one server-wide ``server.maxUploadSize`` (here the checkpoint cap); a widget's ``max_upload_size`` is
checked only in the browser, and its upload request names no widget (a PUT to
``/_stcore/upload_file/<session>/<file id>``). ``UploadLimits`` is an ASGI middleware in front of that route that
reads the file name from the multipart header before any of the file is kept, then:

- a file named like a checkpoint (``CHECKPOINT_TYPES``) may be up to ``CHECKPOINT_LIMIT_MB``; any other file (an
  image slot's) up to ``IMAGE_LIMIT_MB``;
- a session holds at most ``SESSION_UPLOAD_MB`` of uploads in all (what Streamlit's store holds for it, plus its
  uploads in flight), so PUTs to made-up file ids cannot pile up.

A refused upload is answered 413 while its body streams in: neither the middleware nor Streamlit keeps it.
``app.py`` and ``pfcam app`` (``pfcam_app/server.py``) run the page behind it (Streamlit's ``App``).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable

IMAGE_LIMIT_MB = 20  # per image file
CHECKPOINT_LIMIT_MB = 1024  # per checkpoint file (also server.maxUploadSize, Streamlit's own last bound)
SESSION_UPLOAD_MB = 2048  # all uploads one session holds at once: two full-size checkpoints, or one and images
CHECKPOINT_TYPES = ["pth", "pt", "bin", "safetensors", "ckpt", "tar"]
UPLOAD_ROUTE = re.compile(r"/_stcore/upload_file/(?P<session>[^/]+)/(?P<file>[^/]+)$")
HEAD_BYTES = 16 * 1024  # the multipart part header (boundary, Content-Disposition, Content-Type) fits in this
FRAMING_BYTES = 64 * 1024  # multipart framing allowed on top of the file's own bytes
FILENAME = re.compile(rb'filename="([^"\r\n]*)"')

Receive = Callable[[], Any]


class UploadRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def is_checkpoint_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in CHECKPOINT_TYPES


def part_file_name(head: bytes) -> str:
    """The file name of the first multipart part ('' when the header does not give one)."""
    match = FILENAME.search(head)
    return match.group(1).decode("utf-8", "replace") if match else ""


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
                 session_bytes: int | None = None) -> None:
        self.app = app
        self.held_bytes = held_bytes
        self.session_bytes = session_bytes if session_bytes is not None else SESSION_UPLOAD_MB * 2**20
        self.in_flight: dict[str, int] = defaultdict(int)  # session -> body bytes of its uploads being received

    async def __call__(self, scope: dict, receive: Receive, send: Callable) -> None:
        match = UPLOAD_ROUTE.search(scope.get("path", "")) if scope.get("type") == "http" else None
        if match is None or scope.get("method") != "PUT":
            await self.app(scope, receive, send)
            return
        body = BoundedBody(self, match["session"], receive)
        try:
            await body.read_head(dict(scope.get("headers", [])).get(b"content-length", b""))
            await self.app(scope, body.receive, send)
        except UploadRefused as refused:
            await refuse(send, refused.message)
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
        room = self.limits.session_bytes - self.limits.held_bytes(self.session) - self.limits.in_flight[self.session]
        self.limit = max(0, min(file_limit(name), room)) + FRAMING_BYTES
        kind = "a checkpoint" if is_checkpoint_name(name) else "an image"
        self.refusal = (f"Upload refused: over the limit for {kind} ({file_limit(name) // 2**20} MB per file, "
                        f"{self.limits.session_bytes // 2**20} MB of uploads per session).")
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


async def refuse(send: Callable, message: str) -> None:
    body = message.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def middleware() -> list:
    """The middleware list for Streamlit's ``App`` (``app.py``, ``pfcam_app/server.py``)."""
    from starlette.middleware import Middleware

    return [Middleware(UploadLimits)]
