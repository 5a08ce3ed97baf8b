"""Names as plain text and renamed uploads in the app (issue #26), in AppTest: a file name carrying Streamlit's own
markup (a colour span, an icon, a bare-URL autolink) reaches the page as text Streamlit's Markdown shows literally;
a file renamed between picking and upload, or an oversized one, gets a plain message naming it, no exception."""
from __future__ import annotations

import re

import pytest

from apptest_support import assert_clean, scene_png, upload
from pfcam_app.core import WORD_JOINER, plain

_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def shown(source: str) -> str:
    """The text a reader sees: CommonMark's backslash escapes resolved, the invisible word joiners dropped."""
    return _ESCAPE.sub(r"\1", source).replace(WORD_JOINER, "")


def markup_found(source: str) -> list[str]:
    """What Streamlit's Markdown (1.67's StreamlitMarkdown) would turn into markup in ``source``: colour and other
    directives and icons parsed from the source, icons and arrows matched in the parsed text, autolinks."""
    text = _ESCAPE.sub(r"\1", source)  # the parsed text nodes
    found = []
    if re.search(r"(?<!\\):[a-z][a-z0-9-]*\\?\[", source) or re.search(r":[a-z][a-z0-9-]*\[", text):
        found.append("directive")
    if ":material/" in source or re.search(r":material_\w+:|:streamlit:", text.replace(":material/", ":material_")):
        found.append("icon")
    if re.search(r"https?://|(?<!\\)www\.|(?<![\\\w])[\w.+-]+(?<!\\)@", source):
        found.append("autolink")
    if re.search(r"(^|\s)(<->|->|<-|--|>=|<=|~=)(\s|$)", text):
        found.append("arrow")
    return found


NAMES = {"colour span": ":red[alarm] scene.png", "icon": ":material/warning: scene.png",
         "streamlit logo": "a :streamlit: b.png", "bare URL": "https://evil.example/x.png",
         "www autolink": "see www.evil.example.png", "e-mail autolink": "me@evil.example.png",
         "arrow": "a -> b.png"}


@pytest.mark.parametrize("kind", sorted(NAMES))
def test_plain_leaves_no_streamlit_markup(kind):
    name = NAMES[kind]
    assert markup_found(name), "the name itself carries the markup"
    assert markup_found(plain(name)) == []
    assert shown(plain(name)) == name


@pytest.mark.parametrize("kind", ["colour span", "icon", "bare URL"])
def test_a_name_with_streamlit_markup_is_shown_as_text_in_the_app(blank, kind):
    name = NAMES[kind]
    upload(blank, [(name, scene_png(3))])
    headings = [s.value for s in blank.subheader]
    assert plain(name) in headings, headings
    for value in headings:
        assert markup_found(value) == [], value
    assert shown(plain(name)) == name


@pytest.mark.parametrize(("name", "reason"), [
    ("passwd", "without an extension"), ("a\\b.pth", "not an image"), ("x.png%00.pth", "not an image"),
    ("notes.csv", "not an image")])
def test_a_renamed_upload_gets_a_plain_message_and_no_exception(blank, name, reason):
    upload(blank, [(name, b"root:x:0:0:root:/root:/bin/bash\n"), ("ok.png", scene_png(4))])
    assert_clean(blank)
    messages = [e.value for e in blank.error]
    assert any(plain(name) in m and "was not used" in m and reason in m for m in messages), messages
    assert "ok.png" in [s.value for s in blank.subheader]  # the other file is still used


def test_an_oversized_upload_gets_a_plain_message_and_no_exception(blank):
    from pfcam_app.upload_limits import IMAGE_LIMIT_MB

    upload(blank, [("huge.png", b"\0" * ((IMAGE_LIMIT_MB + 1) * 2**20))])
    assert_clean(blank)
    messages = [e.value for e in blank.error]
    assert any("huge.png" in m and f"over the {IMAGE_LIMIT_MB} MB limit" in m for m in messages), messages
