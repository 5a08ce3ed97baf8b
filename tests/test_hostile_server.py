"""The app as a multi-user server under attack (issue #11): browser-given export folders stay under the server's
root, names are shown as plain text (no Markdown image fetched), oversized image uploads are refused on receipt,
30 large-pixel uploads keep the session's memory within its pixel budget, and exports keep to that budget too.
(The HTTP-layer upload limits: tests/test_hostile_uploads.py.)"""
from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from apptest_support import assert_clean, scene_png, upload
from cams.export import ExportError

EVIL = "![x](http://127.0.0.1:9/track.png) **bold** <img src=x>.png"
RSS_BUDGET_MB = 1500  # growth allowed for 30 uploads of 7999x7999 (SESSION_PIXELS = 100 MP: 300 MB held)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def with_text_chunk(png: bytes, text: str) -> bytes:
    """The same picture with a tEXt chunk after IHDR: other bytes (another upload), same pixels."""
    body = b"Comment\0" + text.encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


@pytest.mark.parametrize(("typed", "sub"), [("/etc", "etc"), ("../../..", "x"), ("~/.ssh", "ssh"),
                                        ("a/../../b", "a_.._.._b"), ("", ""), ("results 1", "results_1")])
def test_a_browser_typed_folder_becomes_one_safe_name_under_the_root(tmp_path, monkeypatch, typed, sub):
    from pfcam_app.exporting import export_folder

    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(tmp_path / "root"))
    root = (tmp_path / "root").resolve()
    folder = export_folder(typed)
    assert folder == (root / sub if sub else root)  # one component: no separator, never ".." itself


def test_a_symlinked_sub_folder_is_refused(tmp_path, monkeypatch):
    from pfcam_app.exporting import export_folder

    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "out").symlink_to(tmp_path)
    with pytest.raises(ExportError, match="symbolic link"):
        export_folder("out")


def test_an_absolute_path_typed_in_the_browser_writes_nothing_outside_the_root(blank, tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(root))
    upload(blank, [("a.png", scene_png(6))])
    outside = tmp_path / "outside"
    blank.text_input(key="export_dir").set_value(str(outside))
    blank.run()
    blank.button(key="export_folder").click()
    blank.run()
    assert_clean(blank)
    assert not blank.error, [e.value for e in blank.error]
    assert not outside.exists()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and all(path.is_relative_to(root) for path in written)
    assert len(list(root.glob("*/manifest.json"))) == 1


def test_names_are_shown_as_plain_text(blank):
    from pfcam_app.core import plain

    upload(blank, [(EVIL, b"not an image"), ("ok.png", scene_png(6))])
    assert [s.value for s in blank.subheader][:2] == [plain(EVIL), "ok.png"]
    shown = [e.value for kind in (blank.markdown, blank.subheader, blank.error, blank.warning, blank.caption,
                                  blank.success, blank.info) for e in kind]
    unescaped = [text for text in shown if re.search(r"(?<!\\)!\\?\[|(?<!\\)<img", text)]
    assert not unescaped, unescaped
    assert any("not an image" in text and "\\!\\[x\\]" in text for text in shown)


@pytest.mark.slow
def test_thirty_large_pixel_uploads_stay_within_the_session_budget(blank):
    """186 KB PNGs of 7999x7999 took an unbounded process cache from 0.88 to 8.7 GB; now a session holds at most
    SESSION_PIXELS decoded pixels and the rest are refused from their headers."""
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", (7999, 7999)).save(buffer, format="PNG", compress_level=9)
    base = buffer.getvalue()
    files = [(f"big{i:02d}.png", with_text_chunk(base, str(i))) for i in range(30)]
    before = rss_mb()
    upload(blank, files)
    grown = rss_mb() - before
    refused = [e.value for e in blank.error if "a session may hold 100 MP" in e.value]
    assert len(refused) == 29, [e.value for e in blank.error][:3]
    assert grown < RSS_BUDGET_MB, f"RSS grew {grown:.0f} MB"
    print(f"30 uploads of 7999x7999 ({sum(len(d) for _, d in files) / 2**20:.1f} MB): RSS +{grown:.0f} MB")


def test_an_export_reuses_the_sessions_images_and_keeps_to_its_pixel_budget(blank, tmp_path, monkeypatch):
    """"Export to folder" takes the session's decoded images: nothing is decoded again outside the budget, and an
    image the budget refused on the page is skipped by the export with the same reason."""
    import cams.export.inputs
    from pfcam_app import core

    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr(core, "SESSION_PIXELS", 128 * 128 + 1)  # room for one 128 x 128 scene
    decoded_again = []
    real = cams.export.inputs.load_image
    monkeypatch.setattr(cams.export.inputs, "load_image",
                        lambda *args, **kwargs: decoded_again.append(kwargs.get("name")) or real(*args, **kwargs))
    upload(blank, [("a.png", scene_png(6)), ("b.png", scene_png(7))])
    assert [e.value for e in blank.error if "a session may hold" in e.value and "b.png" in e.value]
    blank.button(key="export_folder").click()
    blank.run()
    assert_clean(blank)
    listed = json.loads(next((tmp_path / "root").glob("manifest.json")).read_text())
    assert {row["image"] for row in listed["rows"]} == {"a.png"}
    assert [(s["input"], "a session may hold" in s["reason"]) for s in listed["skipped"]] == [("b.png", True)]
    assert decoded_again == []
