"""What the bench-loc suites share: a tiny fake zoo entry (the `tiny_zoo` fixture in conftest.py installs it)."""
from __future__ import annotations

import pytest
import torch

from cams.bench_loc import bench as bench_run
from pfnet import zoo
from pfnet.preprocess import Preprocess

TINY = "tiny_hybrid"
GONE = "tiny_missing"


def _entry(model_id: str, size: int = 64) -> zoo.ZooEntry:
    source = zoo.WeightSource("bundled", f"{model_id}.safetensors", f"{model_id}.safetensors")
    return zoo.ZooEntry(model_id, model_id, "resnet50_hybrid", "resnet", source, Preprocess(size, size),
                        classes="scenes", arch_kwargs={"width_mult": 0.25})


def install_tiny_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake zoo entry TINY (random width-0.25 R50-hybrid at 64 px) and GONE (bundled file missing)."""
    monkeypatch.setitem(zoo.ZOO, TINY, _entry(TINY))
    monkeypatch.setitem(zoo.ZOO, GONE, _entry(GONE))
    real = bench_run.load_model

    def load(model_id, device=None):
        if model_id != TINY:
            return real(model_id, device)
        torch.manual_seed(0)
        model = zoo.ZOO[TINY].build().eval()
        with torch.no_grad():
            model.fc.weight.mul_(1e-3)  # random init saturates the softmax; keep probabilities informative
        return model

    monkeypatch.setattr(bench_run, "load_model", load)
