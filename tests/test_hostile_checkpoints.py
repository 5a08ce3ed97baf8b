"""Hostile checkpoints (issue #11), each failure of the attack run on c48be40 recreated with the outcome now
expected: size caps checked before anything is read or inflated, code-running pickles named as such, bad values
refused naming the tensor, and no NaN ever written into the export's JSON. Memory is measured in a fresh
process (hostile_files.measure_load); the before/after figures come from benchmarks/bench_hostile.py."""
from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save as save_safetensors

import hostile_files as hostile
from pfnet import weights, zoo
from pfnet.checkpoint import check_size
from pfnet.checkpoint_sizes import pickle_storage_bytes, safetensors_tensor_bytes
from pfnet.errors import CheckpointError

DEMO = "demo_r50"
GiB = 1 << 30
unix_only = pytest.mark.skipif(sys.platform == "win32", reason="peak RSS is read with the resource module")


@pytest.fixture(scope="module")
def demo_state() -> dict[str, torch.Tensor]:
    return load_file(str(zoo.DEMO_DIR / "demo_r50.safetensors"))


def _saved(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# 2. Zip bombs and declared sizes: refused before anything is inflated or allocated
# ----------------------------------------------------------------------------------------------------------------


@unix_only
@pytest.mark.slow
def test_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = hostile.zip_bomb_checkpoint(tmp_path / "bomb.pth", 2 * GiB)
    assert path.stat().st_size < 3 * 2**20  # 2 GiB of zeros in about 2 MB
    result = hostile.measure_load("checkpoint", path)
    assert result["outcome"].startswith("CheckpointError: 'bomb.pth' would decompress to 2,147,48"), result
    assert "over the 1,073,741,824-byte limit (PFCAM_MAX_BYTES)" in result["outcome"]
    assert result["peak_growth_mb"] < 400, result  # c48be40 inflated it: +2,093 MB


def test_zip_members_are_checked_for_paths_and_bytes(tmp_path, monkeypatch):
    path = hostile.zip_bomb_checkpoint(tmp_path / "bomb.pth", 64 << 20)
    monkeypatch.setenv("PFCAM_MAX_BYTES", str(32 << 20))
    for source, name in ((path, "'bomb.pth'"), (path.read_bytes(), "the uploaded file")):
        with pytest.raises(CheckpointError, match=f"^{name} would decompress to 67,10[89],"):
            weights.read_checkpoint(source)
    monkeypatch.setenv("PFCAM_MAX_BYTES", str(128 << 20))  # under the cap the same file is read (and is zeros)
    assert weights.read_checkpoint(path)["fc.weight"].abs().sum() == 0


def test_storages_the_pickle_declares_are_checked(tmp_path):
    small = hostile.stored("archive/data/0", bytes(64))  # the member is small; the pickle claims 1 TiB
    path = hostile.torch_zip(tmp_path / "declared.pth", hostile.torch_pickle(hostile.declared_state(1 << 38)),
                             [small])
    for source in (path, path.read_bytes()):
        with pytest.raises(CheckpointError, match=r"declares tensors of 1,099,511,627,776 bytes, over the"):
            weights.read_checkpoint(source)


def _legacy_file(state_pickle: bytes) -> bytes:
    """torch's pre-zip layout: magic number, protocol, system info, the state, its storage keys, raw data."""
    head = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
    return b"".join(pickle.dumps(part, protocol=2) for part in head) + state_pickle + pickle.dumps(["0"]) + bytes(8)


def test_legacy_format_declaring_a_huge_storage_is_refused():
    data = _legacy_file(hostile.torch_pickle(hostile.declared_state(1 << 38)))
    with pytest.raises(CheckpointError, match=r"declares tensors of 1,099,511,627,776 bytes"):
        weights.read_checkpoint(data)


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_walk_counts_what_torch_stores(protocol):
    base = torch.zeros(6, 5)
    state = {"w": base, "view": base[2:], "half": torch.ones(7, dtype=torch.float16),
             "count": torch.tensor(3), "mask": torch.zeros(9, dtype=torch.bool),
             "nested": {"c": torch.zeros(2, dtype=torch.complex64)}}
    expected = 6 * 5 * 4 + 7 * 2 + 8 + 9 + 2 * 8  # the view shares the storage of "w"
    data = _saved(state, pickle_protocol=protocol)
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    assert pickle_storage_bytes(io.BytesIO(reader.get_record("data.pkl"))) == expected
    legacy = _saved(state, pickle_protocol=protocol, _use_new_zipfile_serialization=False)
    assert pickle_storage_bytes(io.BytesIO(legacy), pickles=4) == expected
    assert pickle_storage_bytes(io.BytesIO(b"\x80\x02}q\x00(")) == 0  # truncated: nothing found, no error


def test_safetensors_header_sizes_are_checked(monkeypatch):
    real = save_safetensors({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64)})
    assert safetensors_tensor_bytes(real) == 3 * 4 * 4 + 5 * 8
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 16]}}).encode()
    claim = len(header).to_bytes(8, "little") + header + bytes(16)
    monkeypatch.setenv("PFCAM_MAX_BYTES", str(1 << 20))
    with pytest.raises(CheckpointError, match=r"^the uploaded file declares tensors of 1,073,741,824 bytes"):
        weights.read_checkpoint(claim)


def test_check_size_is_the_cap_for_every_source(monkeypatch):
    monkeypatch.setenv("PFCAM_MAX_BYTES", "1000")
    check_size(1000, "the download is")
    with pytest.raises(CheckpointError, match=r"^the download is 1,001 bytes, over the 1,000-byte limit"):
        check_size(1001, "the download is")


# ----------------------------------------------------------------------------------------------------------------
# 6. A path over the cap is refused from its size, never read
# ----------------------------------------------------------------------------------------------------------------


@unix_only
@pytest.mark.slow
def test_path_over_the_cap_is_refused_without_reading_it(tmp_path):
    path = hostile.sparse_checkpoint(tmp_path / "big.bin")
    assert path.stat().st_size > 1.5 * GiB
    result = hostile.measure_load("checkpoint", path, {"PFCAM_MAX_BYTES": str(1 << 20)})
    assert result["outcome"].startswith("CheckpointError: 'big.bin' is 1,610,61"), result
    assert "over the 1,048,576-byte limit (PFCAM_MAX_BYTES); refused before reading it" in result["outcome"]
    assert result["peak_growth_mb"] < 50, result  # c48be40 read the torch file whole: +1,582 MB


@pytest.mark.parametrize("make", [hostile.sparse_checkpoint, hostile.sparse_safetensors])
def test_sparse_path_over_the_default_cap_is_refused(make, tmp_path):
    path = make(tmp_path / "big.pth")
    with pytest.raises(CheckpointError, match=r"^'big.pth' is 1,610,61[\d,]+ bytes, over the 1,073,741,824"):
        weights.load(DEMO, weights=path)


# ----------------------------------------------------------------------------------------------------------------
# 7. Code-running payloads: refused as such, never run, never called corrupt
# ----------------------------------------------------------------------------------------------------------------


class Call:
    """Unpickling calls ``function(*args)``; every payload below creates the marker file if it ever runs."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def _payloads(marker: Path, source: Path) -> dict[str, Call]:
    write = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Call(os.system, f"touch '{marker}'"),
        "os.popen": Call(os.popen, f"touch '{marker}'"),
        "subprocess.Popen": Call(subprocess.Popen, ["touch", str(marker)]),
        "subprocess.check_call": Call(subprocess.check_call, ["touch", str(marker)]),
        "eval": Call(builtins.eval, write),
        "exec": Call(builtins.exec, write),
        "open": Call(builtins.open, str(marker), "w"),
        "shutil.copyfile": Call(shutil.copyfile, str(source), str(marker)),
        "Path.touch": Call(Path.touch, marker),
    }


PAYLOADS = list(_payloads(Path("m"), Path("s")))


@pytest.mark.parametrize("container", ["torch_zip", "legacy_pickle", "train_args"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_running_payloads_are_refused_as_such(payload, container, demo_state, tmp_path):
    marker, source = tmp_path / "ran", tmp_path / "source.txt"
    source.write_text("x")
    evil = _payloads(marker, source)[payload]
    if container == "torch_zip":
        data = _saved({"state_dict": demo_state, "hook": evil})
    elif container == "legacy_pickle":
        data = pickle.dumps({"state_dict": evil}, protocol=2)
    else:
        data = _saved({"state_dict": demo_state, "args": argparse.Namespace(lr=0.1, hook=evil)})
    path = tmp_path / "evil.pth"
    path.write_bytes(data)
    for source_, name in ((path, "'evil.pth'"), (data, "the uploaded file")):
        with pytest.raises(CheckpointError) as caught:
            weights.load(DEMO, weights=source_)
        message = str(caught.value)
        assert message.startswith(f"{name} was refused: the file tries to run code (GLOBAL "), message
        named = "getattr" if payload == "Path.touch" else payload.split(".")[-1]  # a method pickles as getattr
        assert named in message and "corrupt" not in message
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# 4. Bad values: refused at load, naming the first bad tensor
# ----------------------------------------------------------------------------------------------------------------

WEIGHT = "layer2.0.conv_block.0.weight"
BAD_VALUES = {
    # one output channel of the 32 x 32 x 3 x 3 kernel: 288 of 9,216 values
    "nan": (lambda t: t.index_fill(0, torch.tensor([1]), float("nan")),
            r"holds 288 NaN or infinite value\(s\) \(of 9,216\)"),
    "inf": (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), r"holds 288 NaN or infinite value"),
    "-inf": (lambda t: t.index_fill(0, torch.tensor([2]), float("-inf")), r"holds 288 NaN or infinite value"),
    "int64": (lambda t: t.to(torch.int64), r"holds int64 values, but .* needs floating-point values"),
    "int8": (lambda t: t.to(torch.int8), r"holds int8 values"),
    "bool": (lambda t: t.to(torch.bool), r"holds bool values"),
    "complex": (lambda t: t.to(torch.complex64), r"holds complex64 values"),
}


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_bad_values_are_refused_naming_the_tensor(kind, demo_state):
    spoil, reason = BAD_VALUES[kind]
    state = dict(demo_state)
    state[WEIGHT] = spoil(state[WEIGHT])
    for source in (state, _saved(state)):
        with pytest.raises(CheckpointError, match=rf"^the checkpoint's {WEIGHT} {reason}.*refused"):
            weights.load(DEMO, weights=source)


def test_first_bad_tensor_in_model_order_is_named(demo_state):
    state = dict(demo_state)
    for key in ("layer4.0.conv_block.1.running_var", "layer1.0.conv_block.1.running_mean"):
        state[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(CheckpointError, match="layer1.0.conv_block.1.running_mean holds"):
        weights.load(DEMO, weights=state)


def test_integer_counters_and_half_precision_still_load(demo_state):
    counter = "layer1.0.conv_block.1.num_batches_tracked"
    assert demo_state[counter].dtype == torch.int64
    state = {key: value.half() if value.is_floating_point() else value for key, value in demo_state.items()}
    state[counter] = torch.tensor(5.0)  # a float counter where the model's is an integer: harmless, kept
    model = weights.load(DEMO, weights=state)
    assert model.state_dict()[counter].dtype == torch.int64 and int(model.state_dict()[counter]) == 5
    state[counter] = torch.tensor(True)
    with pytest.raises(CheckpointError, match=rf"{counter} holds bool values, but .* needs integer values"):
        weights.load(DEMO, weights=state)


def test_eight_bit_floats_are_checked_too(demo_state):
    state = {key: value.to(torch.float8_e4m3fn) if value.is_floating_point() else value
             for key, value in demo_state.items()}  # torch has no isfinite for this dtype
    assert next(weights.load(DEMO, weights=state).parameters()).dtype == torch.float32
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    with pytest.raises(CheckpointError, match=r"fc.bias holds 10 NaN or infinite value\(s\) \(of 10\)"):
        weights.load(DEMO, weights=state)


def test_cli_refuses_a_nan_checkpoint_and_writes_nothing(demo_state, tmp_path, capsys):
    from cams.__main__ import main

    state = dict(demo_state)
    state[WEIGHT] = BAD_VALUES["nan"][0](state[WEIGHT])
    checkpoint = tmp_path / "nan.pth"
    torch.save(state, checkpoint)
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (120, 40, 200)).save(image)
    out = tmp_path / "out"
    status = main(["export", str(image), "--out", str(out), "--models", DEMO, "--weights", f"{DEMO}={checkpoint}"])
    assert status == 1
    assert f"{WEIGHT} holds 288 NaN or infinite value" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


def _strict_json(path: Path):
    def refuse(constant: str):
        raise AssertionError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_export_never_writes_nan_into_json(demo_state, tmp_path):
    from cams.export import run_export

    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (40, 30), (120, 40, 200)).save(image)
    entry = zoo.get(DEMO)
    model = weights.load(DEMO)
    out = tmp_path / "out"
    first = run_export([image], out, {DEMO: (model, entry)}, layers=["layer4"])
    assert first.computed == 1
    records = list(out.rglob("results__gradcam.json"))
    assert len(records) == 1
    # An earlier record spoiled with NaN is redone, not carried into the manifest.
    record = _strict_json(records[0])
    for value in record["entries"].values():
        value["probability"] = float("nan")
    records[0].write_text(json.dumps(record))
    again = run_export([image], out, {DEMO: (model, entry)}, layers=["layer4"])
    assert again.computed == 1 and _strict_json(out / "manifest.json")["rows"][0]["probability"] > 0
    # A model whose output is NaN (weights spoiled after loading): the image's reason in the manifest, no result.
    with torch.no_grad():
        model.fc.weight.fill_(float("inf"))
    spoiled = run_export([image], out, {DEMO: (model, entry)}, layers=["layer4"], overwrite=True)
    assert spoiled.computed == 0
    assert any(item["stage"] == "explain" and "the model's output for this image is NaN or infinite" in item["reason"]
               and item["input"].endswith("a.png") for item in spoiled.skipped)
    assert all(row["status"] != "computed" for row in spoiled.rows)
    manifest = _strict_json(out / "manifest.json")  # the folder's index: the earlier, finite result is kept
    assert manifest["rows"] and all(0 < row["probability"] <= 1 for row in manifest["rows"])
    _strict_json(records[0])
