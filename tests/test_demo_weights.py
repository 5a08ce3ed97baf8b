"""The bundled demo weights: card integrity, strict loading, and held-out accuracy on fresh scenes."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pfnet.resnet import PFResNet
from pfnet.scenes import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, TEST_SEED, TRAIN_SEED, scene_batch

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "weights"
if not (WEIGHTS / "demo_card.json").is_file():
    pytest.skip("demo weights not trained yet: python -m pfnet.train_demo --model ...", allow_module_level=True)
CARD = json.loads((WEIGHTS / "demo_card.json").read_text())
MODELS = {"r50": "conv", "r50_max": "max", "r50_hybrid": "hybrid"}
HELD_OUT_SEED = 777  # neither the training stream nor the card's test stream
assert HELD_OUT_SEED not in (TRAIN_SEED, TEST_SEED)


def test_card_header():
    assert CARD["class_names"] == list(CLASS_NAMES)
    assert CARD["mean"] == pytest.approx(list(IMAGENET_MEAN)) and CARD["std"] == pytest.approx(list(IMAGENET_STD))
    assert 128 <= CARD["input_size"] <= 224
    assert set(CARD["models"]) == set(MODELS)
    assert (WEIGHTS / "DEMO_CARD.md").is_file()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_weights_load_and_classify(model):
    entry = CARD["models"][model]
    path = WEIGHTS / entry["file"]
    assert path.name == f"demo_{model}.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert path.stat().st_size < 8 * 2 ** 20
    assert entry["width_mult"] == 0.25 and entry["variant"] == MODELS[model]
    for key in ("seed", "train_minutes", "test_accuracy", "pointing_game", "recipe", "date"):
        assert key in entry
    assert entry["train_minutes"] < 30

    state = load_file(str(path))
    net = PFResNet(MODELS[model], num_classes=len(CLASS_NAMES), width_mult=0.25)
    assert list(state) == list(net.state_dict()) or set(state) == set(net.state_dict())
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    net.eval()

    size = CARD["input_size"]
    correct = total = 0
    with torch.inference_mode():
        for lo in range(0, 200, 50):
            x, y, _ = scene_batch(HELD_OUT_SEED, range(lo, lo + 50), size)
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    assert correct / total >= 0.95, f"{model}: {correct}/{total}"
