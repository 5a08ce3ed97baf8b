"""A cap on the number of tensors a checkpoint holds (issue #26): a 77 MB safetensors of a million one-byte tensors
pinned ~1.8 GB once parsed; it is refused from a count of its raw header, before any of it is parsed, and torch
files are refused while their pickle is walked, before torch.load."""
from __future__ import annotations

import io
import json
import struct
import time

import pytest
import torch

import pfnet.checkpoint
import pfnet.checkpoint_sizes
from pfnet.checkpoint import DEFAULT_MAX_TENSORS, read_checkpoint
from pfnet.errors import CheckpointError


def million_tensor_safetensors(count: int = 1_000_000) -> bytes:
    """A safetensors file of ``count`` one-byte tensors, written by hand (the library would build them all)."""
    header = json.dumps({f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(count)},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * count


@pytest.fixture
def nothing_parsed(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the file was parsed")

    monkeypatch.setattr(pfnet.checkpoint, "_load_safetensors", never)
    monkeypatch.setattr(pfnet.checkpoint, "_torch_load", never)
    monkeypatch.setattr(pfnet.checkpoint, "safetensors_tensor_bytes", never)  # the header's JSON is not parsed


def test_a_million_tensor_safetensors_is_refused_before_it_is_parsed(nothing_parsed, tmp_path):
    data = million_tensor_safetensors()
    assert 60 * 2**20 < len(data) < 90 * 2**20
    started = time.process_time()
    with pytest.raises(CheckpointError, match=f"more than {DEFAULT_MAX_TENSORS:,} tensors"):
        read_checkpoint(data)  # an upload's bytes
    path = tmp_path / "million.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="more than 100,000 tensors"):
        read_checkpoint(path)
    assert time.process_time() - started < 60  # a bound against parsing it whole, not a timing claim


@pytest.mark.parametrize("zipped", [True, False])
def test_a_torch_file_over_the_tensor_cap_is_refused_before_torch_load(nothing_parsed, monkeypatch, zipped):
    monkeypatch.setenv("PFCAM_MAX_TENSORS", "1000")
    buffer = io.BytesIO()
    torch.save({f"t{i}": torch.zeros(1) for i in range(1001)}, buffer, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match="more than 1,000 tensors"):
        read_checkpoint(buffer.getvalue())


def test_the_bytes_a_parsed_file_would_hold_count_each_tensor(monkeypatch):
    monkeypatch.setenv("PFCAM_MAX_BYTES", str(5000 * pfnet.checkpoint.TENSOR_OVERHEAD))
    buffer = io.BytesIO()
    torch.save({f"t{i}": torch.zeros(1) for i in range(6000)}, buffer)
    with pytest.raises(CheckpointError, match="6,000 tensors that, parsed, would hold"):
        read_checkpoint(buffer.getvalue())


def test_a_checkpoint_under_the_caps_still_loads():
    buffer = io.BytesIO()
    torch.save({f"t{i}.weight": torch.ones(2) for i in range(500)}, buffer)
    assert len(read_checkpoint(buffer.getvalue())) == 500
    assert pfnet.checkpoint_sizes.safetensors_tensor_count(million_tensor_safetensors(10)) == 10


def test_the_apps_upload_cache_is_bounded_in_bytes_not_entries(monkeypatch):
    from pfcam_app import core

    store = core.CamStore(core.UPLOAD_ENTRIES, 3 * 2**20)
    monkeypatch.setattr(core, "upload_store", lambda: store)
    for index in range(4):  # 1 MB each with their overhead; three fit
        data = io.BytesIO()
        torch.save({f"w{index}": torch.zeros(2**18 - 600)}, data)
        core.read_upload(f"digest{index}", data.getvalue())
    assert store.bytes <= 3 * 2**20 and len(store.values()) == 3  # the first went for the fourth
    assert store.get(("state", "digest3")) is not None and store.get(("state", "digest0")) is None
