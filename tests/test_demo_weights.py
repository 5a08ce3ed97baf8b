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
SHIPPED = sorted(CARD.get("models", {}))
TARGET_ACCURACY = 0.95  # the bar for the demo models
HELD_OUT_SEED = 777  # neither the training stream nor the card's test stream
assert HELD_OUT_SEED not in (TRAIN_SEED, TEST_SEED)


def test_card_header():
    assert CARD["class_names"] == list(CLASS_NAMES)
    assert CARD["mean"] == pytest.approx(list(IMAGENET_MEAN)) and CARD["std"] == pytest.approx(list(IMAGENET_STD))
    assert 128 <= CARD["input_size"] <= 224
    assert SHIPPED and set(SHIPPED) <= set(MODELS)
    assert (WEIGHTS / "DEMO_CARD.md").is_file()


def held_out_accuracy(model: str, n: int = 200) -> float:
    """Accuracy of the shipped fp16 weights on ``n`` scenes of a stream used neither for training nor the card."""
    state = load_file(str(WEIGHTS / CARD["models"][model]["file"]))
    net = PFResNet(MODELS[model], num_classes=len(CLASS_NAMES), width_mult=0.25)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    net.eval()
    correct = 0
    with torch.inference_mode():
        for lo in range(0, n, 50):
            x, y, _ = scene_batch(HELD_OUT_SEED, range(lo, lo + 50), CARD["input_size"])
            correct += int((net(x).argmax(1) == y).sum())
    return correct / n


@pytest.mark.parametrize("model", SHIPPED)
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
    # The card's figure (1,000 test scenes) is reproduced on fresh held-out scenes (binomial sd ~0.035 at n=200).
    accuracy = held_out_accuracy(model)
    assert accuracy > 1.0 / len(CLASS_NAMES) + 0.2, f"{model}: {accuracy:.3f} is near chance"
    assert abs(accuracy - entry["test_accuracy"]) <= 0.08, (model, accuracy, entry["test_accuracy"])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_demo_model_reaches_the_target(model):
    """The issue's bar: >= 95 % on held-out scenes, here 500 of a stream neither training nor the card used."""
    assert model in SHIPPED, f"demo_{model} is not shipped"
    assert held_out_accuracy(model, n=500) >= TARGET_ACCURACY, model
