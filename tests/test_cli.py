"""pfcam's command line: the subcommands, --version, the `python -m cams` door, and the command `pfcam app` runs
(checked as a command; no server is started)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pfcam import launch
from pfcam import cli
from pfcam.cli import build_parser, main
from pfnet.version import __version__

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("app", "export", "bench-loc", "sanity", "train-demo")
HEAVY = ("torch", "timm", "cams", "pfdemo", "pfcam_app", "streamlit", "numpy")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_python_m_pfcam_help_and_version():
    done = run("-m", "pfcam", "--help")
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in COMMANDS), done.stdout
    version = run("-m", "pfcam", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"pfcam {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["app", "--help"], []])
def test_help_and_version_load_no_heavy_module(argv):
    """`pfcam --help` / `--version` answer without importing torch, timm or the layers below (checked in a fresh
    interpreter: what the command line really loads)."""
    code = (f"import sys\nfrom pfcam.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}), file=sys.stderr)")
    done = run("-c", code)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
    assert ("usage: pfcam" in done.stdout + done.stderr) or done.stdout.strip() == f"pfcam {__version__}"


def test_import_pfcam_loads_no_heavy_module_until_explain_is_used():
    code = ("import sys, pfcam; first = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'cams'}); "
            "pfcam.explain; print(first, 'torch' in sys.modules, pfcam.__version__)")
    done = run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", __version__]


def test_the_light_help_lists_what_the_modules_register():
    """`pfcam --help` lists the commands without importing them: the same text as with every module loaded."""
    assert build_parser(commands=[]).format_help() == build_parser().format_help()


def test_version_is_read_without_importing_pfnet():
    assert cli.version() == __version__


def test_python_m_cams_still_works():
    done = run("-m", "cams", "export", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: python -m cams export" in done.stdout and "--out" in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: pfcam {command}" in capsys.readouterr().out


def test_export_help_says_what_the_smoothing_options_do_and_cost(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--aug-smooth" in text and "6 augmented passes" in text and "about 6x the time" in text
    assert "--eigen-smooth" in text and "first principal component" in text and "SVD per map" in text
    parsed = build_parser().parse_args(["export", "photo.jpg", "--out", "out", "--aug-smooth", "--eigen-smooth"])
    assert (parsed.aug_smooth, parsed.eigen_smooth) == (True, True)
    plain = build_parser().parse_args(["export", "photo.jpg", "--out", "out"])
    assert (plain.aug_smooth, plain.eigen_smooth) == (False, False)


def test_unknown_options_are_refused_except_by_app(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "photo.jpg", "--out", "out", "--no-such-option"])
    assert exit_.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_app_runs_streamlit_on_the_app_page_with_the_project_settings():
    command = launch.streamlit_command(["--server.port", "8502"])
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(command[4]) == ROOT / "pfcam_app" / "server.py"  # the checkout's package, found without importing it
    flags = command[5:-2]
    # the settings of .streamlit/config.toml, whatever folder the app is started from
    assert {"--server.maxUploadSize=1024", "--browser.gatherUsageStats=false", "--client.showErrorDetails=type",
            "--theme.primaryColor=#d9480f"} <= set(flags)
    assert command[-2:] == ["--server.port", "8502"]  # the user's options last: they win


def test_config_flags_read_any_config(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[server]\nport = 9000\nheadless = true\n[theme]\nbase = "dark"\n')
    assert launch.config_flags(config) == ["--server.port=9000", "--server.headless=true", "--theme.base=dark"]
    assert launch.config_flags(tmp_path / "missing.toml") == []
    config.write_text("not [ toml")
    assert launch.config_flags(config) == []


class Started(Exception):
    pass


def test_pfcam_app_hands_its_options_to_streamlit(tmp_path, monkeypatch):
    page = tmp_path / "page.py"
    page.write_text("")
    monkeypatch.setattr(launch, "entry_path", lambda: page)
    started = []

    def execv(path, argv):
        started.append((path, argv))
        raise Started

    monkeypatch.setattr(launch.os, "execv", execv)
    monkeypatch.setattr(launch.os, "name", "posix")
    with pytest.raises(Started):
        main(["app", "--server.port", "8502", "--server.headless=true"])
    path, argv = started[0]
    assert path == sys.executable and argv[4] == str(page)
    assert argv[-3:] == ["--server.port", "8502", "--server.headless=true"]
    with pytest.raises(Started):
        main(["app", "--", "--help"])  # after "--", even pfcam's own options go to Streamlit
    assert started[1][1][-1] == "--help"


def test_pfcam_app_says_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch, "entry_path", lambda: tmp_path / "page.py")
    assert main(["app"]) == 2
    assert "the app entry" in capsys.readouterr().err
    real = launch.importlib.util.find_spec
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None if name == "streamlit" else real(name))
    assert main(["app"]) == 2
    assert "Streamlit is not installed" in capsys.readouterr().err
