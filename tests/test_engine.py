"""cams.engine: agreement with pytorch-grad-cam, one forward + one autograd.grad, no side effects, threads, leaks."""
from __future__ import annotations

import gc
import threading

import numpy as np
import psutil
import pytest
import timm
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import pfnet  # noqa: F401  (registers the architectures)
from cams import (
    METHODS, CamError, Explanation, LayerError, MethodError, TargetError, explain, layers as L,
)

REFERENCE = {
    "gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM, "hirescam": HiResCAM,
    "layercam": LayerCAM, "eigencam": EigenCAM,
}
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, **kwargs).eval()


def _tiny(seed: int = 0) -> torch.nn.Module:
    return _build("resnet50_hybrid", seed, width_mult=0.25, num_classes=10, depths=(1, 1, 1, 1))


def _images(count: int, height: int, width: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, height, width or height, generator=generator)


def _reshape_for(model, name: str, input_hw):
    if L.family_of(model) == "resnet":
        return None
    probe_is_tokens = name.startswith("blocks") or ".blocks." in name
    if not probe_is_tokens:
        return None
    height, width = L.token_grid(model, name, input_hw)
    return lambda tokens: tokens.reshape(tokens.shape[0], height, width, tokens.shape[-1]).permute(0, 3, 1, 2)


def _reference(cls, model, name: str, images: torch.Tensor, class_ids: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's heatmaps [N, H, W] for layer ``name`` and one class per image."""
    module = L.resolve(model, name)
    reshape = _reshape_for(model, name, tuple(images.shape[-2:]))
    with cls(model=model, target_layers=[module], reshape_transform=reshape) as cam:
        if cls is ScoreCAM:
            cam.batch_size = 16
        result = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in class_ids])
    model.zero_grad(set_to_none=True)
    return result


def _assert_matches_reference(model, images, layer_names, method, targets=2):
    explanation = explain(model, images, layer_names, method, targets=targets)
    assert explanation.heatmaps.shape == (images.shape[0], explanation.targets.shape[1], len(layer_names),
                                          *images.shape[-2:])
    for target_pos in range(explanation.targets.shape[1]):
        for layer_pos, name in enumerate(layer_names):
            expected = _reference(REFERENCE.get(method, ScoreCAM), model, name, images,
                                  explanation.targets[:, target_pos])
            ours = explanation.heatmaps[:, target_pos, layer_pos].numpy()
            error = float(np.abs(ours - expected).max())
            assert error < TOLERANCE, f"{method} {name} target#{target_pos}: max |diff| {error:.2e}"


# ---------------------------------------------------------------------------------- agreement with pytorch-grad-cam
@pytest.fixture(scope="module")
def r50_small():
    return _build("resnet50_pf", width_mult=0.25, num_classes=10)


@pytest.fixture(scope="module")
def hybrid_small():
    return _build("resnet50_hybrid", width_mult=0.25, num_classes=10)


@pytest.fixture(scope="module")
def vit_s():
    return _build("vit_s_max", num_classes=10, img_size=64)


RESNET_LAYERS = ["stem", "layer2.0.conv_block", "layer3", "layer3.2", "layer4.2"]


@pytest.mark.parametrize("method", list(REFERENCE))
def test_matches_pytorch_grad_cam_r50(r50_small, method):
    _assert_matches_reference(r50_small, _images(2, 64), RESNET_LAYERS, method)


@pytest.mark.parametrize("method", list(REFERENCE))
def test_matches_pytorch_grad_cam_r50_hybrid(hybrid_small, method):
    _assert_matches_reference(hybrid_small, _images(2, 64, 96), RESNET_LAYERS, method)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam"])
def test_matches_pytorch_grad_cam_full_size_r50(method):
    model = _build("resnet50_pf")  # full width, 1000 classes
    _assert_matches_reference(model, _images(1, 96), ["layer1", "layer3.5", "layer4"], method, targets=[1, 281])


@pytest.mark.parametrize("method", list(REFERENCE))
def test_matches_pytorch_grad_cam_vit_s_max(vit_s, method):
    # Non-square: the token grid comes from the input size (4 x 6 patches). Not blocks.11 for HiResCAM: the
    # final LayerNorm is scale-invariant, so sum_c grad * act of its input is ~0 (rounding noise) per token.
    last = "blocks.10" if method == "hirescam" else "blocks.11"
    _assert_matches_reference(vit_s, _images(2, 64, 96), ["blocks.0", "blocks.5", last], method)


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_matches_pytorch_grad_cam_pit(method):
    model = _build("pit_ti_max", num_classes=10)
    _assert_matches_reference(model, _images(1, 80, 112), ["transformers.0.blocks.1", "transformers.1",
                                                           "transformers.2.blocks.2"], method)


def test_matches_pytorch_grad_cam_scorecam():
    model = _tiny()
    _assert_matches_reference(model, _images(2, 48), ["layer1", "layer2.0.conv_block"], "scorecam")


def test_scorecam_batch_size_does_not_change_result():
    model = _tiny()
    images = _images(1, 48)
    big = explain(model, images, ["layer2"], "scorecam", batch_size=64)
    small = explain(model, images, ["layer2"], "scorecam", batch_size=7)
    torch.testing.assert_close(small.heatmaps, big.heatmaps, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- CAM
def test_cam_equals_gradcam_at_final_feature_map(r50_small):
    # GAP + fc: Grad-CAM's weights are the fc weights / (h*w), so both normalise to the same map.
    images = _images(2, 64)
    cam = explain(r50_small, images, ["layer4", "layer4.2"], "cam", targets=3)
    grad = explain(r50_small, images, ["layer4", "layer4.2"], "gradcam", targets=3)
    torch.testing.assert_close(cam.heatmaps, grad.heatmaps, atol=1e-5, rtol=0)
    assert torch.equal(cam.heatmaps[:, :, 0], cam.heatmaps[:, :, 1])


def test_cam_refuses_other_layers_and_models(r50_small, vit_s):
    with pytest.raises(MethodError, match="final feature map"):
        explain(r50_small, _images(1, 64), ["layer3"], "cam")
    with pytest.raises(MethodError, match="final feature map"):
        explain(r50_small, _images(1, 64), ["layer4", "layer4.1"], "cam")
    with pytest.raises(MethodError, match="global average pooling"):
        explain(vit_s, _images(1, 64), ["blocks.11"], "cam")


# --------------------------------------------------------------------------------------- output contract
def test_output_contract_and_targets(r50_small):
    images = _images(3, 64, 80)
    with torch.no_grad():
        logits = r50_small(images)
    top1 = explain(r50_small, images, ["layer3", "layer4"])
    assert isinstance(top1, Explanation)
    assert top1.heatmaps.dtype == torch.float32 and top1.heatmaps.shape == (3, 1, 2, 64, 80)
    assert float(top1.heatmaps.min()) >= 0.0 and float(top1.heatmaps.max()) <= 1.0
    assert top1.targets.dtype == torch.int64 and torch.equal(top1.targets[:, 0], logits.argmax(1))
    assert top1.probs.dtype == torch.float32 and top1.probs.shape == (3, 10)
    torch.testing.assert_close(top1.probs, logits.softmax(1), atol=1e-5, rtol=1e-4)
    assert top1.layers == ("layer3", "layer4") and top1.method == "gradcam"
    assert top1.method_label == METHODS["gradcam"]
    assert top1.heatmap(2, 0, "layer4").shape == (64, 80)
    torch.testing.assert_close(top1.target_probs()[:, 0], logits.softmax(1).max(1).values, atol=1e-5, rtol=1e-4)

    top3 = explain(r50_small, images, ["layer4"], targets=3)
    assert torch.equal(top3.targets, logits.topk(3, dim=1).indices)
    # the top-1 column of a top-3 call is the top-1 call
    torch.testing.assert_close(top3.heatmaps[:, 0, 0], top1.heatmaps[:, 0, 1], atol=1e-5, rtol=0)

    names = [f"class {index}" for index in range(10)]
    named = explain(r50_small, images, ["layer4"], targets=["class 7", 2], class_names=names)
    assert named.targets.tolist() == [[7, 2]] * 3
    assert named.target_name(0, 0) == "class 7"


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "scorecam", "cam"])
def test_targets_per_image(method):
    model = _tiny()
    images = _images(3, 48)
    layers = ["layer4"] if method in ("scorecam", "cam") else ["layer2", "layer4"]
    both = explain(model, images, layers, method, targets=[7, 2], batch_size=2)
    top1 = explain(model, images, layers, method, batch_size=2)
    # image 0: class 2, image 1: its top class (-1), image 2: class 7 then class 2; batches of 2 slice the rows
    mixed = explain(model, images, layers, method, targets=torch.tensor([[2, 7], [-1, 2], [7, 2]]), batch_size=2)
    assert mixed.targets.tolist() == [[2, 7], [int(top1.targets[1, 0]), 2], [7, 2]]
    torch.testing.assert_close(mixed.heatmaps[0], both.heatmaps[0].flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.heatmaps[1, 0], top1.heatmaps[1, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.heatmaps[1, 1], both.heatmaps[1, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.heatmaps[2], both.heatmaps[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.probs, both.probs)
    # one class each, as lists or an array: each image's own label
    labels = explain(model, images, layers, method, targets=np.array([[3], [3], [9]]), batch_size=2)
    again = explain(model, images, layers, method, targets=[[3], [3], [9]], batch_size=3)
    assert labels.targets.tolist() == again.targets.tolist() == [[3], [3], [9]]
    torch.testing.assert_close(labels.heatmaps, again.heatmaps, atol=1e-5, rtol=0)
    threes = explain(model, images, layers, method, targets=[3], batch_size=2)
    torch.testing.assert_close(labels.heatmaps[:2], threes.heatmaps[:2], atol=1e-5, rtol=0)


def test_bad_targets_per_image():
    model = _tiny()
    images = _images(2, 48)
    for targets, message in (([[1], [2], [3]], "3 rows for 2 images"), ([[1], [10]], "out of range"),
                             ([[1], [-2]], "out of range"), ([[1, 2], [3]], "one length"),
                             ([[1], ["cat"]], "one length"), (torch.zeros(2, 1), "integer"),
                             (torch.zeros(2, 0, dtype=torch.int64), "at least one")):
        with pytest.raises(TargetError, match=message):
            explain(model, images, ["layer4"], targets=targets)


def test_bad_arguments(r50_small):
    images = _images(1, 64)
    with pytest.raises(MethodError, match="gradcampp") as info:
        explain(r50_small, images, ["layer4"], "gradcam++")
    assert isinstance(info.value, ValueError)
    with pytest.raises(LayerError, match="valid layers"):
        explain(r50_small, images, ["layer9"])
    with pytest.raises(LayerError):
        explain(r50_small, images, [])
    for targets in (0, 11, True, [10], [-1], ["cat"], []):
        with pytest.raises(TargetError):
            explain(r50_small, images, ["layer4"], targets=targets)
    with pytest.raises(TargetError, match="class_names"):
        explain(r50_small, images, ["layer4"], targets=["cat"])
    with pytest.raises(TargetError, match="unknown class"):
        explain(r50_small, images, ["layer4"], targets=["dog"], class_names=["cat"] * 10)
    with pytest.raises(CamError):
        explain(r50_small, images[0], ["layer4"])
    with pytest.raises(CamError):
        explain(r50_small, images, ["layer4"], batch_size=0)


def test_batches_give_the_same_heatmaps():
    model = _tiny()
    images = _images(5, 48)
    whole = explain(model, images, ["layer2", "layer4"], "gradcampp", targets=2, batch_size=32)
    pieces = explain(model, images, ["layer2", "layer4"], "gradcampp", targets=2, batch_size=2)
    assert torch.equal(whole.targets, pieces.targets)
    torch.testing.assert_close(pieces.heatmaps, whole.heatmaps, atol=1e-5, rtol=0)
    torch.testing.assert_close(pieces.probs, whole.probs, atol=1e-6, rtol=1e-5)


def test_works_under_no_grad_and_inference_mode():
    model = _tiny()
    images = _images(2, 48)
    expected = explain(model, images, ["layer3", "layer4"], targets=2)
    with torch.no_grad():
        inside = explain(model, images, ["layer3", "layer4"], targets=2)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference_images = images.clone()
        inside_inference = explain(model, inference_images, ["layer3", "layer4"], targets=2)
        assert torch.is_inference_mode_enabled()
    assert torch.equal(inside.heatmaps, expected.heatmaps)
    assert torch.equal(inside_inference.heatmaps, expected.heatmaps)


# --------------------------------------------------------------------------------------- one pass, no side effects
def test_one_forward_and_one_grad_call(monkeypatch):
    model = _tiny()
    images = _images(3, 48)
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        explain(model, images, ["stem", "layer1.0.conv_block", "layer2", "layer4"], "gradcam", targets=3)
    finally:
        handle.remove()
    assert forwards == [3]
    assert calls == [True]  # three targets, one batched call
    forwards.clear()
    calls.clear()
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    try:
        explain(model, images, ["layer3", "layer4"], "hirescam")
    finally:
        handle.remove()
    assert forwards == [3] and calls == [False]


def _state(model):
    return {
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for name, m in model.named_modules()},
        "grad_mode": torch.is_grad_enabled(),
    }


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "cam", "scorecam"])
def test_model_state_is_untouched(method):
    model = _tiny()
    model.conv1.requires_grad_(False)  # a partly frozen model stays partly frozen
    model.layer2.train()  # a mixed mode stays mixed
    before = _state(model)
    explain(model, _images(1, 32), ["layer4"], method, targets=2)
    after = _state(model)
    assert after == before
    assert all(p.grad is None for p in model.parameters())


def test_model_state_is_untouched_when_the_call_raises():
    model = _tiny()
    model.conv1.requires_grad_(False)

    def broken(module, inputs, output):
        raise RuntimeError("boom in layer3")

    user_handle = model.layer3.register_forward_hook(broken)
    try:
        before = _state(model)
        # layer2's hook has already turned recording on when layer3 raises
        for method in ("gradcam", "eigencam"):
            with pytest.raises(RuntimeError, match="boom"):
                explain(model, _images(1, 32), ["layer2", "layer4"], method, targets=2)
            assert _state(model) == before
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="boom"):
                explain(model, _images(1, 32), ["layer2", "layer4"], "gradcam")
            assert not torch.is_grad_enabled()
    finally:
        user_handle.remove()
    assert all(p.grad is None for p in model.parameters())
    assert not model.layer3._forward_hooks
    # and the model still works for the next call
    assert explain(model, _images(1, 32), ["layer2", "layer4"]).heatmaps.shape == (1, 1, 2, 32, 32)


def test_existing_parameter_grads_are_kept():
    model = _tiny()
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    explain(model, _images(1, 32), ["layer1", "layer4"], "gradcampp", targets=2)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


# --------------------------------------------------------------------------------------- threads and leaks
def test_threads_share_one_model():
    model = _tiny()
    images = _images(2, 64, seed=3)
    jobs = [
        (["layer4"], "gradcam", None),
        (["layer1", "layer3"], "gradcampp", 2),
        (["stem", "layer2.0.conv_block"], "layercam", [1, 4]),
        (["layer4"], "cam", 3),
        (["layer2", "layer4"], "hirescam", [7]),
        (["layer3"], "eigencam", None),
        (["layer1.0", "layer4"], "xgradcam", 2),
        (["layer2", "layer3", "layer4"], "gradcam", [0, 9, 5]),
    ]
    serial = [explain(model, images, layers, method, targets) for layers, method, targets in jobs]
    results: dict[int, list[Explanation]] = {index: [] for index in range(len(jobs))}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        layers, method, targets = jobs[index]
        try:
            barrier.wait()
            for _ in range(3):
                results[index].append(explain(model, images, layers, method, targets))
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for index, expected in enumerate(serial):
        assert len(results[index]) == 3
        for got in results[index]:
            assert got.layers == expected.layers and got.method == expected.method
            assert torch.equal(got.targets, expected.targets)
            assert torch.equal(got.heatmaps, expected.heatmaps), f"job {index} differs from the serial call"
            assert torch.equal(got.probs, expected.probs)
    assert all(not module._forward_hooks for module in model.modules())


def test_no_memory_growth_over_200_calls():
    model = _tiny()
    images = _images(2, 32)
    process = psutil.Process()

    def call(index: int) -> None:
        method = ("gradcam", "layercam", "eigencam", "cam")[index % 4]
        explain(model, images, ["layer2", "layer4"] if method != "cam" else ["layer4"], method, targets=2)

    for index in range(10):
        call(index)
    gc.collect()
    baseline = process.memory_info().rss
    for index in range(10, 200):
        call(index)
    gc.collect()
    grown = (process.memory_info().rss - baseline) / 2**20
    assert grown < 50, f"RSS grew by {grown:.1f} MB over 190 calls"
    assert all(not module._forward_hooks for module in model.modules())


# --------------------------------------------------------------------------------------- benchmark script
def test_bench_script_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cam.py"
    spec = importlib.util.spec_from_file_location("bench_cam", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    text = bench.main(["--size", "32", "--repeats", "1", "--warmup", "0", "--width-mult", "0.25", "--batch", "2",
                       "--models", "R50-hybrid", "--markdown", str(out)])
    assert out.read_text() == text
    assert "| R50-hybrid | ours: Grad-CAM layer4 |" in text
    assert "pytorch-grad-cam: 4 GradCAM objects" in text
    assert "engine throughput img/s" in text
