"""The bundled demo weights: card integrity, strict loading, and held-out accuracy on fresh scenes."""
import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pfdemo.scenes import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, TEST_SEED, TRAIN_SEED
from pfdemo.scoring import accuracy, pointing_game
from pfdemo.train import build, load_demo

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "weights"
if not (WEIGHTS / "demo_card.json").is_file():
    pytest.skip("demo weights not trained yet: pfcam train-demo --model ...", allow_module_level=True)
CARD = json.loads((WEIGHTS / "demo_card.json").read_text())
MODELS = {"r50": "conv", "r50_max": "max", "r50_hybrid": "hybrid"}
SHIPPED = sorted(CARD.get("models", {}))
TARGET_ACCURACY = 0.95  # the bar for the demo models
HELD_OUT_SEED = 777  # neither the training stream nor the card's test stream
assert HELD_OUT_SEED not in (TRAIN_SEED, TEST_SEED)


def test_card_header():
    assert CARD["class_names"] == list(CLASS_NAMES)
    assert CARD["mean"] == pytest.approx(list(IMAGENET_MEAN)) and CARD["std"] == pytest.approx(list(IMAGENET_STD))
    assert SHIPPED and set(SHIPPED) <= set(MODELS)
    assert (WEIGHTS / "DEMO_CARD.md").is_file()


@functools.cache
def held_out_accuracy(model: str, n: int = 500) -> float:
    """Accuracy of the shipped fp16 weights on ``n`` scenes of a stream used neither for training nor the card."""
    entry = CARD["models"][model]
    return accuracy(load_demo(model, WEIGHTS / entry["file"]), entry["input_size"], n=n, seed=HELD_OUT_SEED)


@pytest.mark.parametrize("model", SHIPPED)
def test_weights_load_and_classify(model):
    entry = CARD["models"][model]
    path = WEIGHTS / entry["file"]
    assert path.name == f"demo_{model}.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert path.stat().st_size < 8 * 2 ** 20
    assert entry["width_mult"] == 0.25 and entry["variant"] == MODELS[model]
    assert 128 <= entry["input_size"] <= 224 and entry["input_size"] == entry["recipe"]["input_size"]
    for key in ("seed", "train_minutes", "test_accuracy", "pointing_game", "pointing_game_unaligned", "cam_offsets",
                "recipe", "date"):
        assert key in entry
    assert entry["train_minutes"] < 30

    state = load_file(str(path))
    expected = build(model).state_dict()
    assert list(state) == list(expected) or set(state) == set(expected)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    # load_demo loads strictly; the card's figure (1,000 test scenes) is reproduced on fresh held-out scenes
    # (binomial sd ~0.01 at n=500)
    held_out = held_out_accuracy(model)
    assert held_out > 1.0 / len(CLASS_NAMES) + 0.2, f"{model}: {held_out:.3f} is near chance"
    assert abs(held_out - entry["test_accuracy"]) <= 0.08, (model, held_out, entry["test_accuracy"])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_demo_model_reaches_the_target(model):
    """The issue's bar: >= 95 % on held-out scenes, here 500 of a stream neither training nor the card used."""
    assert model in SHIPPED, f"demo_{model} is not shipped"
    assert held_out_accuracy(model) >= TARGET_ACCURACY, model


@pytest.mark.parametrize("model", sorted(MODELS))
def test_demo_heatmaps_point_at_the_objects(model):
    """The issue's localization bar at the default layer: Grad-CAM pointing game (15 px rule) >= 0.8, drawn with
    the offset the card recorded (chosen on the validation stream), on 200 scenes of a stream the card never saw;
    far above the centred reference on the same scenes."""
    entry = CARD["models"][model]
    net = load_demo(model, WEIGHTS / entry["file"])
    offset = tuple(entry["cam_offsets"]["layer4"])
    result = pointing_game(net, entry["input_size"], n=200, seed=HELD_OUT_SEED, layer="layer4", offset=offset)
    assert result["hit_15px"] >= 0.8, (model, result)
    assert result["hit_15px"] >= 2 * result["centre_baseline_15px"], (model, result)
    assert result["hit_15px"] >= result["random_baseline_15px"] + 0.5, (model, result)
