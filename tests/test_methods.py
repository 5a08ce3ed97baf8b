"""The methods of issue 25 (cams.methods, cams.ablation, cams.smoothing and the new weightings of cams.cam_maths):
agreement with pytorch-grad-cam (torch-cam for SmoothGrad-CAM++) within 1e-4 on a demo model and a ViT / PiT layer,
the shared pass, the passes each method costs, and the model left untouched."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from pytorch_grad_cam import (AblationCAM, EigenGradCAM, FinerCAM, FullGrad, GradCAM, GradCAMElementWise, KPCA_CAM,
                              LayerCAM, ScoreCAM, ShapleyCAM)
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import pfnet
from cams import METHODS, explain
from cams import layers as L
from cams.engine import OWN_PASS_METHODS
from cams.multi import explain_methods

TOLERANCE = 1e-4
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFERENCE = {"gradcamelementwise": GradCAMElementWise, "eigengradcam": EigenGradCAM, "ablationcam": AblationCAM,
             "fullgrad": FullGrad, "finercam": FinerCAM, "shapleycam": ShapleyCAM, "kpcacam": KPCA_CAM}


def _images(count: int, height: int, width: int | None = None, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, height, width or height, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def demo():
    return pfnet.load("demo_r50", memory_format="contiguous")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_s_max", num_classes=10, img_size=64).eval()


@pytest.fixture(scope="module")
def pit():
    torch.manual_seed(0)
    return timm.create_model("pit_ti_max", num_classes=10).eval()


class _BlockAblationLayer(AblationLayerVit):
    """pytorch-grad-cam's ViT ablation layer for blocks called as ``block(x, grid)`` (pfnet's ViT)."""

    def __call__(self, x, *rest):
        return super().__call__(x)


def _reshape_for(model, name: str, input_hw):
    if not (name.startswith("blocks") or ".blocks." in name) or L.family_of(model) == "resnet":
        return None
    height, width = L.token_grid(model, name, input_hw)
    return lambda tokens: tokens.reshape(tokens.shape[0], height, width, tokens.shape[-1]).permute(0, 3, 1, 2)


def _reference(method, model, name, images, class_ids, **call) -> np.ndarray:
    """pytorch-grad-cam's heatmaps [N, H, W] of ``method`` at layer ``name``, one class per image."""
    reshape = None if method == "fullgrad" else _reshape_for(model, name, tuple(images.shape[-2:]))
    cls = REFERENCE.get(method, {"layercam": LayerCAM}.get(method, GradCAM))
    layers = [] if method == "fullgrad" else [L.resolve(model, name)]
    extra = {}
    if method == "ablationcam":
        extra["ablation_layer"] = _BlockAblationLayer() if reshape is not None else AblationLayer()
    cam = cls(model=model, target_layers=layers, reshape_transform=reshape, **extra)
    try:  # (ShapleyCAM differentiates twice: through the attention's math kernel, as cams.methods runs it)
        with sdpa_kernel([SDPBackend.MATH]):
            if method == "finercam":
                result = np.stack([cam(input_tensor=images[i:i + 1], target_idx=int(c), **call)[0]
                                   for i, c in enumerate(class_ids)])
            else:
                result = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in class_ids],
                             **call)
    finally:  # not its __exit__: ShapleyCAM's detach_() of a view raises on PiT's stages
        hooks = getattr(cam, "base_cam", cam).activations_and_grads
        hooks.activations.clear()
        hooks.gradients.clear()
        hooks.release()
    model.zero_grad(set_to_none=True)
    return result


def _assert_matches(model, images, names, method, targets=None, **options):
    explanation = explain(model, images, names, method, targets=targets, align="none", **options)
    call = {key: value for key, value in options.items() if key in ("aug_smooth", "eigen_smooth")}
    for target in range(explanation.targets.shape[1]):
        for position, name in enumerate(names):
            expected = _reference(method, model, name, images, explanation.targets[:, target], **call)
            error = float(np.abs(explanation.heatmaps[:, target, position].numpy() - expected).max())
            assert error < TOLERANCE, f"{method} {name} target #{target}: max |diff| {error:.2e}"
    return explanation


# --------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("method", ["gradcamelementwise", "eigengradcam", "ablationcam", "fullgrad", "finercam",
                                    "shapleycam", "kpcacam"])
def test_matches_pytorch_grad_cam_demo_r50(demo, method):
    _assert_matches(demo, _images(2, 64), ["layer3.5", "layer4"], method, targets=2)


@pytest.mark.parametrize("method", ["gradcamelementwise", "eigengradcam", "ablationcam", "fullgrad", "finercam",
                                    "kpcacam"])
def test_matches_pytorch_grad_cam_vit(vit, method):
    _assert_matches(vit, _images(1, 64, 96), ["blocks.5"], method, targets=[3])


@pytest.mark.parametrize("method", ["shapleycam", "ablationcam", "gradcamelementwise"])
def test_matches_pytorch_grad_cam_pit_stage(pit, method):
    # A PiT stage's output is a feature map (pytorch-grad-cam's ShapleyCAM refuses token layers: its raw 3-D
    # activations reach get_cam_image); its GELU / LayerNorm give a non-zero Hessian-vector product.
    _assert_matches(pit, _images(1, 80, 112), ["transformers.1"], method)


def test_ablation_whole_forward_fallback_equals_the_tail(demo, monkeypatch):
    from cams import ablation

    images = _images(1, 64)
    tail = explain(demo, images, ["layer3.5", "layer4"], "ablationcam", batch_size=13)
    monkeypatch.setattr(ablation, "tail_for", lambda model, module: None)
    whole = explain(demo, images, ["layer3.5", "layer4"], "ablationcam", batch_size=13)
    torch.testing.assert_close(tail.heatmaps, whole.heatmaps, atol=1e-5, rtol=0)


def test_ablation_runs_the_prefix_once_per_image(demo):
    # pytorch-grad-cam: one whole forward per batch of channels; here the stem runs for the forward and once per
    # image for the part before the layer.
    calls = []
    first_conv = next(module for module in demo.modules() if isinstance(module, torch.nn.Conv2d))
    handle = first_conv.register_forward_pre_hook(  # (fx's trace calls it with a Proxy)
        lambda module, args: calls.append(args[0].shape[0]) if isinstance(args[0], torch.Tensor) else None)
    try:
        explain(demo, _images(2, 64), ["layer4"], "ablationcam", batch_size=16)
    finally:
        handle.remove()
    assert calls == [2, 1, 1]


def test_guided_grad_cam_matches_and_leaves_the_model(demo):
    images = _images(2, 64)
    before = {name: (type(module), getattr(module, "inplace", None)) for name, module in demo.named_modules()}
    hooks = [(dict(m._forward_hooks), dict(m._backward_hooks)) for m in demo.modules()]
    result = explain(demo, images, ["layer3.5", "layer4"], "guidedgradcam", targets=2, align="none")
    assert {name: (type(module), getattr(module, "inplace", None)) for name, module in demo.named_modules()} == before
    assert [(dict(m._forward_hooks), dict(m._backward_hooks)) for m in demo.modules()] == hooks
    assert all(p.grad is None for p in demo.parameters())
    assert result.guided.shape == (2, 2, 3, 64, 64)
    reference_model = copy.deepcopy(demo)  # pytorch-grad-cam's GuidedBackpropReLUModel swaps the ReLU modules
    guided = GuidedBackpropReLUModel(reference_model, device="cpu")
    for image in range(2):
        for target in range(2):
            class_id = int(result.targets[image, target])
            expected = guided(images[image:image + 1].clone(), target_category=class_id)  # [H, W, 3]
            ours = result.guided[image, target].permute(1, 2, 0).numpy()
            scale = float(np.abs(expected).max())
            assert float(np.abs(ours - expected).max()) < TOLERANCE * scale
            for position, name in enumerate(["layer3.5", "layer4"]):
                cam = _reference("gradcam", demo, name, images[image:image + 1], [class_id])[0]
                product = np.abs(cam[:, :, None] * expected).max(axis=2)
                product = (product - product.min()) / (1e-7 + (product - product.min()).max())
                error = float(np.abs(result.heatmaps[image, target, position].numpy() - product).max())
                assert error < TOLERANCE, f"{name}: {error:.2e}"


def test_smoothgradcampp_matches_torch_cam(demo):
    torchcam = pytest.importorskip("torchcam.methods")
    images = _images(2, 64)
    torch.manual_seed(7)
    ours = explain(demo, images, ["layer4"], "smoothgradcampp", targets=[4], align="none")
    torch.manual_seed(7)
    with torchcam.SmoothGradCAMpp(demo, "layer4", input_shape=(3, 64, 64)) as extractor:
        scores = demo(images.clone().requires_grad_(True))
        cams = extractor([4, 4], scores)[0]
    from cams import normalise
    expected = normalise(cams.detach(), (64, 64))
    assert float((ours.heatmaps[:, 0, 0] - expected).abs().max()) < TOLERANCE
    demo.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------- smoothing options
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_aug_smooth_and_eigen_smooth_match(demo, method):
    images = _images(2, 64)
    _assert_matches(demo, images, ["layer3.5"], method, targets=[2], aug_smooth=True)
    _assert_matches(demo, images, ["layer3.5"], method, targets=[2], eigen_smooth=True)


def test_aug_smooth_is_one_pass_for_six_copies(demo):
    calls = []
    handle = demo.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        result = explain(demo, _images(2, 64), ["layer4"], "gradcam", aug_smooth=True)
    finally:
        handle.remove()
    assert calls == [2, 12]  # the targets' forward, then all twelve copies at once
    assert dict(result.options) == {"aug_smooth": True}


def test_eigen_smooth_for_scorecam_and_ablation():
    model = timm.create_model("resnet50_hybrid", width_mult=0.25, num_classes=10, depths=(1, 1, 1, 1)).eval()
    images = _images(1, 48)
    REFERENCE["scorecam"] = ScoreCAM
    try:
        for method in ("scorecam", "ablationcam"):
            _assert_matches(model, images, ["layer2"], method, eigen_smooth=True)
    finally:
        REFERENCE.pop("scorecam")

# --------------------------------------------------------------------------------------- shared pass, options
def test_new_gradient_methods_share_the_pass(demo):
    images = _images(3, 64)
    methods = ["gradcam", "gradcamelementwise", "eigengradcam", "kpcacam", "eigencam_fixed"]
    shared = explain_methods(demo, images, ["layer3", "layer4"], methods, targets=2, batch_size=2)
    for method in methods:
        alone = explain(demo, images, ["layer3", "layer4"], method, targets=2, batch_size=2)
        torch.testing.assert_close(shared[method].heatmaps, alone.heatmaps, atol=1e-4, rtol=0)


def test_scorecam_skips_constant_channels_and_bf16_is_recorded():
    model = timm.create_model("resnet50_hybrid", width_mult=0.25, num_classes=10, depths=(1, 1, 1, 1)).eval()
    images = _images(1, 48)
    with torch.no_grad():
        acts = []
        handle = model.layer4.register_forward_hook(lambda module, inputs, output: acts.append(output))
        model(images)
        handle.remove()
    constant = int((acts[0][0].flatten(1).amax(1) == acts[0][0].flatten(1).amin(1)).sum())
    assert constant > 1  # random weights: dead ReLU channels at layer4
    masked = []
    handle = model.register_forward_pre_hook(lambda module, args: masked.append(args[0].shape[0]))
    try:
        explain(model, images, ["layer4"], "scorecam", batch_size=1024)
    finally:
        handle.remove()
    assert masked[1:] == [acts[0].shape[1] - constant + 1]
    half = explain(model, images, ["layer4"], "scorecam", precision="bfloat16")
    assert dict(half.options) == {"precision": "bfloat16"}
    # an option the method does not use is not recorded: the record says how the maps were made
    plain = explain(model, images, ["layer4"], "gradcam")
    unused = explain(model, images, ["layer4"], "gradcam", precision="bfloat16")
    assert unused.options == () and torch.equal(unused.heatmaps, plain.heatmaps)
    assert explain(model, images, ["layer4"], "eigencam_fixed", eigen_smooth=True).options == ()
    assert dict(explain(model, images, ["layer4"], "gradcam", eigen_smooth=True).options) == {"eigen_smooth": True}


def test_every_method_keeps_the_model_and_runs_under_inference_mode(demo):
    state = {name: p.requires_grad for name, p in demo.named_parameters()}
    for method in sorted(OWN_PASS_METHODS | {"gradcamelementwise", "eigengradcam", "kpcacam"}):
        with torch.inference_mode():
            result = explain(demo, _images(1, 32), ["layer4"], method, targets=2, batch_size=64, keep_raw=True)
        assert result.heatmaps.shape == (1, 2, 1, 32, 32) and result.method_label == METHODS[method]
        assert result.raw is not None and result.raw.shape == result.heatmaps.shape  # export --raw-maps
        assert float(result.heatmaps.min()) >= 0 and float(result.heatmaps.max()) <= 1
    assert {name: p.requires_grad for name, p in demo.named_parameters()} == state
    assert all(p.grad is None for p in demo.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in demo.modules())


def test_ablation_progress_counts_channels(demo):
    seen = []
    explain(demo, _images(2, 32), ["layer4"], "ablationcam", progress=lambda done, total: seen.append((done, total)))
    channels = demo.layer4[-1].expansion_block[0].out_channels if hasattr(demo.layer4[-1], "expansion_block") \
        else seen[-1][1] // 2
    assert seen[-1] == (2 * channels, 2 * channels)


def test_export_records_the_precision(demo, tmp_path):
    from PIL import Image

    from cams.export import run_export

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "red.png")
    from pfnet import zoo

    report = run_export([str(tmp_path / "red.png")], tmp_path / "out", {"demo_r50": (demo, zoo.get("demo_r50"))},
                        layers=["layer4"], method="ablationcam", precision="bfloat16", overlays=False)
    assert report.ok
    import json
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["precision"] == "bfloat16" and manifest["settings"]["method"] == "ablationcam"


def test_bench_loc_and_sanity_take_the_new_methods(demo):
    from cams import sanity as S

    images = _images(2, 64)
    methods = ["gradcamelementwise", "fullgrad", "ablationcam", "guidedgradcam", "kpcacam"]
    # bench-loc explains through cams.multi.explain_methods (bench_loc.scoring.explain_methods_batch)
    results = explain_methods(demo, images, ["layer4"], methods, batch_size=2)
    assert list(results) == methods and all(r.heatmaps.shape == (2, 1, 1, 64, 64) for r in results.values())
    result = S.sanity_check(demo, images, ["layer4"], ["gradcamelementwise", "finercam"], modes=("independent",),
                            units=[S.Unit("fc", ("fc",))])
    assert {c.method for c in result.comparisons} >= {"gradcamelementwise", "finercam"}


def test_every_method_has_its_one_line_for_the_app():
    from cams import METHOD_NOTES

    assert set(METHOD_NOTES) == set(METHODS)
    for key, note in METHOD_NOTES.items():
        what, cost = note.split(" · ")  # what it is · what it costs
        assert what and cost and "\n" not in note, key
    assert METHODS["eigencam_fixed"] == "Eigen-CAM"  # the fixed sign is what Eigen-CAM means in pfcam


@pytest.mark.parametrize(("name", "options", "layer"), [
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, "layers.2"),  # channels-last outputs
    ("pit_ti_224", {"img_size": 64}, "transformers.1"),  # a (map, class tokens) tuple output
    ("deit_tiny_patch16_224", {"img_size": 64}, "blocks.9"),  # a class token
])
def test_every_method_runs_on_timm_models(name, options, layer):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **options).eval()
    images = _images(1, 64)
    for method in sorted(set(METHODS) - {"cam", "scorecam"}):
        result = explain(model, images, [layer], method, targets=[1], batch_size=256)
        assert bool(torch.isfinite(result.heatmaps).all()), method
    # Ablation-CAM from the layer onward equals the whole forwards pytorch-grad-cam runs
    from cams import ablation
    tail = explain(model, images, [layer], "ablationcam", targets=[1], batch_size=64, align="none")
    original = ablation.tail_for
    try:
        ablation.tail_for = lambda model, module: None
        whole = explain(model, images, [layer], "ablationcam", targets=[1], batch_size=64, align="none")
    finally:
        ablation.tail_for = original
    torch.testing.assert_close(tail.heatmaps, whole.heatmaps, atol=1e-4, rtol=0)
