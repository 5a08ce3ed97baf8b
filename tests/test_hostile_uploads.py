"""Upload limits at the HTTP layer (issue #11): an oversized image PUT is refused by the server while it streams in,
and never reaches Streamlit's upload store; checkpoints keep their own cap; a session cannot pile up uploads.

The live test runs `streamlit run app.py` on a loopback port and talks to it as the browser does: a websocket
session asks for upload URLs (a ``file_urls_request``), then PUTs multipart bodies to them."""
from __future__ import annotations

import asyncio
import http.client
import urllib.request
import uuid

import pytest

from pfcam_app.upload_limits import IMAGE_LIMIT_MB, UploadLimits, part_file_name

MB = 2**20


def multipart(name: str, size: int) -> tuple[bytes, bytes, str]:
    """(head, tail, boundary) of a one-file multipart body as the browser sends it; the file is ``size`` bytes."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head, f"\r\n--{boundary}--\r\n".encode(), boundary


# ------------------------------------------------------------------------------------------------ the middleware


class Store:
    """Stands in for Streamlit's upload route: reads the whole body, keeps it per session."""

    def __init__(self) -> None:
        self.kept: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.kept[scope["path"]] = len(body)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def put(middleware, name: str, size: int, declare: bool = True, session: str = "s1", chunk: int = MB):
    """PUT ``size`` bytes named ``name`` through ``middleware`` in ``chunk``-byte messages; returns the status."""
    head, tail, boundary = multipart(name, size)
    body = head + b"\0" * size + tail
    messages = [{"type": "http.request", "body": body[i:i + chunk], "more_body": i + chunk < len(body)}
                for i in range(0, len(body), chunk)]
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    if declare:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "PUT", "path": f"/_stcore/upload_file/{session}/{uuid.uuid4()}",
             "headers": headers}
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], messages


@pytest.mark.parametrize("declare", [True, False])
def test_an_oversized_image_is_refused_before_the_app_keeps_it(declare):
    store = Store()
    limits = UploadLimits(store, held_bytes=lambda session: 0)
    status, unread = put(limits, "photo.png", (IMAGE_LIMIT_MB + 1) * MB, declare=declare)
    assert status == 413 and store.kept == {}
    if declare:  # refused from Content-Length: the body is not even read
        assert len(unread) > IMAGE_LIMIT_MB
    assert limits.in_flight == {}  # nothing left counted against the session


def test_images_up_to_their_cap_and_checkpoints_up_to_theirs_are_accepted():
    store = Store()
    limits = UploadLimits(store, held_bytes=lambda session: 0)
    assert put(limits, "photo.png", IMAGE_LIMIT_MB * MB)[0] == 204
    assert put(limits, "weights.PTH", 3 * IMAGE_LIMIT_MB * MB)[0] == 204
    assert sorted(store.kept.values())[-1] > 3 * IMAGE_LIMIT_MB * MB
    assert limits.in_flight == {}


def test_a_session_cannot_pile_up_uploads():
    store = Store()
    held = {"s1": 90 * MB}
    limits = UploadLimits(store, held_bytes=lambda session: held.get(session, 0), session_bytes=100 * MB)
    assert put(limits, "w.pth", 20 * MB, session="s1")[0] == 413  # 90 + 20 > 100
    assert put(limits, "w.pth", 9 * MB, session="s1")[0] == 204
    assert put(limits, "w.pth", 20 * MB, session="s2")[0] == 204  # another session has its own budget
    assert len(store.kept) == 2


def test_other_requests_pass_untouched():
    store = Store()
    limits = UploadLimits(store, held_bytes=lambda session: 0)
    scope = {"type": "http", "method": "GET", "path": "/_stcore/health", "headers": []}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"x" * 100, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(limits(scope, receive, send))
    assert sent[0]["status"] == 204 and store.kept == {"/_stcore/health": 100}


def test_the_session_total_is_read_from_streamlits_upload_store(monkeypatch):
    import streamlit.runtime
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
    from streamlit.runtime.uploaded_file_manager import UploadedFileRec

    from pfcam_app.upload_limits import session_held_bytes

    store = MemoryUploadedFileManager("/_stcore/upload_file")
    store.add_file("s1", UploadedFileRec(file_id="f1", name="a.png", type="image/png", data=b"x" * 1234))
    store.add_file("s1", UploadedFileRec(file_id="f2", name="w.pth", type="application/octet-stream", data=b"y" * 10))
    monkeypatch.setattr(streamlit.runtime, "get_instance", lambda: type("Runtime", (), {"uploaded_file_mgr": store}))
    assert session_held_bytes("s1") == 1244 and session_held_bytes("s2") == 0


def test_the_file_name_is_read_from_the_part_header():
    head, _, _ = multipart("a b.safetensors", 0)
    assert part_file_name(head) == "a b.safetensors"
    assert part_file_name(b"--x\r\nContent-Disposition: form-data; name=file\r\n\r\n") == ""


# ------------------------------------------------------------------------------------------------ a live server


class Session:
    """A browser-like session on a running app: XSRF cookie, websocket, upload URLs, multipart PUTs."""

    def __init__(self, url: str) -> None:
        self.host, self.port = url.removeprefix("http://").split(":")
        with urllib.request.urlopen(url + "/_stcore/health") as response:  # sets the XSRF cookie, as for a browser
            cookie = response.headers.get("Set-Cookie", "")
        self.xsrf = cookie.split("_streamlit_xsrf=", 1)[1].split(";", 1)[0] if "_streamlit_xsrf=" in cookie else ""

    async def upload_urls(self, ws, names: list[str]) -> list[str]:
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        request = BackMsg()
        request.file_urls_request.request_id = "urls"
        request.file_urls_request.file_names.extend(names)
        await ws.send(request.SerializeToString())
        while True:
            message = ForwardMsg()
            message.ParseFromString(await asyncio.wait_for(ws.recv(), 30))
            if message.WhichOneof("type") == "file_urls_response":
                return [info.upload_url for info in message.file_urls_response.file_urls]

    def put(self, path: str, name: str, size: int, chunked: bool = False) -> int:
        head, tail, boundary = multipart(name, size)
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if self.xsrf:
            headers.update({"X-Xsrftoken": self.xsrf, "Cookie": f"_streamlit_xsrf={self.xsrf}"})

        def body():
            yield head
            for start in range(0, size, MB):
                yield b"\0" * min(MB, size - start)
            yield tail

        connection = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        try:
            if chunked:  # no Content-Length: the limit must hold while the body streams
                connection.request("PUT", path, body=body(), headers=headers, encode_chunked=True)
            else:
                connection.request("PUT", path, body=b"".join(body()), headers=headers)
            return connection.getresponse().status
        finally:
            connection.close()


def stored_upload_bytes(url: str) -> int:
    """What Streamlit's upload store holds, from the server's own metrics (refreshed every 5 s)."""
    with urllib.request.urlopen(url + "/_stcore/metrics") as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if 'cache_type="UploadedFileManager"' in line]
    return int(float(lines[0].rsplit(" ", 1)[1])) if lines else 0


@pytest.mark.parametrize("entry", ["app.py", "pfcam_app/server.py"])  # `streamlit run app.py`, `pfcam app`
def test_a_live_server_refuses_an_oversized_image_put_and_keeps_a_checkpoint(tmp_path, entry):
    import websockets
    from browser_support import ROOT, app_server, fresh_env

    async def scenario(url: str) -> tuple[dict, int]:
        session = Session(url)
        async with websockets.connect(url.replace("http", "ws") + "/_stcore/stream", subprotocols=["streamlit"],
                                      max_size=None) as ws:
            image_slot, checkpoint_slot, small_slot = await session.upload_urls(ws, ["big.png", "w.pth", "ok.png"])
            oversized = (IMAGE_LIMIT_MB + 10) * MB
            statuses = {
                "small image": await asyncio.to_thread(session.put, small_slot, "ok.png", 1000),
                "oversized image": await asyncio.to_thread(session.put, image_slot, "big.png", oversized),
                "oversized image, chunked": await asyncio.to_thread(session.put, image_slot, "big.png", oversized,
                                                                    True),
                "checkpoint": await asyncio.to_thread(session.put, checkpoint_slot, "w.pth", oversized),
            }
            await asyncio.sleep(5.5)  # the metrics' cache window
            return statuses, stored_upload_bytes(url)

    with app_server(fresh_env(tmp_path), tmp_path / "server.log", ROOT / entry) as (url, _):
        statuses, stored = asyncio.run(scenario(url))
    assert statuses == {"small image": 204, "oversized image": 413, "oversized image, chunked": 413,
                        "checkpoint": 204}, (tmp_path / "server.log").read_text()[-2000:]
    assert stored == 1000 + (IMAGE_LIMIT_MB + 10) * MB  # the small image and the checkpoint; no refused byte


# ------------------------------------------------------------------------------------------------ the server's budget


def test_the_server_budget_counts_every_session_together():
    store = Store()
    held = {"s1": 60 * MB, "s2": 30 * MB}
    limits = UploadLimits(store, held_bytes=lambda session: held.get(session, 0), session_bytes=100 * MB,
                          server_bytes=100 * MB, total_held=lambda: sum(held.values()))
    assert put(limits, "w.pth", 20 * MB, session="s3")[0] == 413  # s3's own budget is free; the server's is not
    assert put(limits, "w.pth", 9 * MB, session="s3")[0] == 204
    assert limits.in_flight == {}


@pytest.mark.parametrize("name", ["passwd", "x.png\x00.pth", "a\nb.png", "w.exe"])
def test_a_name_that_fits_no_uploader_is_refused_before_its_bytes_are_kept(name):
    store = Store()
    limits = UploadLimits(store, held_bytes=lambda session: 0)
    status, unread = put(limits, name, 3 * MB)
    assert status == 400 and store.kept == {} and len(unread) >= 3


def test_a_websocket_that_closes_releases_the_gone_sessions_uploads():
    released = []

    async def app(scope, receive, send):
        return None

    limits = UploadLimits(app, held_bytes=lambda session: 0, release=lambda: released.append(1) or 0)
    asyncio.run(limits({"type": "websocket", "path": "/_stcore/stream"}, None, None))
    asyncio.run(limits({"type": "websocket", "path": "/other"}, None, None))
    assert released == [1]


def server_rss_mb(port: str) -> float:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "--server.port" in child.cmdline() and port in child.cmdline():
                return child.memory_info().rss / MB
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no server process")


def test_a_live_server_refuses_sessions_past_its_budget_and_frees_them_when_they_close(tmp_path):
    """Three browser sessions of 120 MB checkpoints against a 300 MB server budget: the third gets 413; when the
    sessions close, the store is empty and the server's RSS returns near where it started."""
    import websockets
    from browser_support import ROOT, app_server, fresh_env

    size = 120 * MB
    env = {**fresh_env(tmp_path), "PFCAM_SERVER_UPLOAD_MB": "300"}

    async def scenario(url: str) -> dict:
        port = url.rsplit(":", 1)[1]
        stream = url.replace("http", "ws") + "/_stcore/stream"
        sockets = [await websockets.connect(stream, subprotocols=["streamlit"], max_size=None) for _ in range(3)]
        sessions = [Session(url) for _ in sockets]
        slots = [(await session.upload_urls(ws, ["w.pth"]))[0] for session, ws in zip(sessions, sockets)]
        start = server_rss_mb(port)
        statuses = [await asyncio.to_thread(session.put, slot, "w.pth", size) for session, slot in zip(sessions, slots)]
        full = server_rss_mb(port)
        for ws in sockets:
            await ws.close()
        after = full
        for _ in range(40):  # bounded: up to 20 s for the server to see the sockets close
            await asyncio.sleep(0.5)
            after = server_rss_mb(port)
            if after < start + 100:
                break
        await asyncio.sleep(5.5)  # the metrics' cache window
        return {"statuses": statuses, "start": start, "full": full, "after": after,
                "stored": stored_upload_bytes(url)}

    with app_server(env, tmp_path / "server.log", ROOT / "app.py") as (url, _):
        result = asyncio.run(scenario(url))
    print(result)
    assert result["statuses"] == [204, 204, 413], (tmp_path / "server.log").read_text()[-2000:]
    assert result["full"] > result["start"] + 200  # two sessions' 240 MB were held
    assert result["stored"] == 0
    assert result["after"] < result["start"] + 100, result
