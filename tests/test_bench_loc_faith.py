"""bench-loc's batched scoring (all methods and the reference heatmaps of a batch in one deletion/insertion pass,
through a BatchNorm-folded copy of the model) gives what each method scored on its own gives."""
from __future__ import annotations

import numpy as np
import timm
import torch

from cams import metrics as M
from cams.bench_loc import GAUSSIAN, Options, evaluate_model, explain_methods_batch, inference_copy
import pfnet  # noqa: F401  (registers the architectures)
from pfdemo.bench import scene_split
from pfdemo.scenes import CLASS_NAMES
from pfnet.preprocess import Preprocess
from bench_loc_support import TINY

METHODS = ("gradcam", "layercam", "eigencam")
LAYERS = ("layer3", "layer4")


def tiny_model():
    torch.manual_seed(0)
    model = timm.create_model("resnet50_hybrid", num_classes=len(CLASS_NAMES), width_mult=0.25).eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e-3)
    return model


def test_batched_scores_equal_each_method_scored_alone():
    model = tiny_model()
    pre = Preprocess(64, 64)
    val, test = scene_split("val", 8, 4, pre, 1), scene_split("test", 7, 6, pre, 0)
    opts = Options(LAYERS, METHODS, batch_size=4, faith_n=5, faith_steps=4, seed=7)
    rows = evaluate_model(model, TINY, CLASS_NAMES, val, test, opts)
    by_key = {(row.layer, row.method): row for row in rows}
    explained = None
    for method in METHODS:  # the plain path: this method's CAMs, one deletion/insertion call, the model as it is
        deletion, insertion, explained = [], [], []
        for start in range(0, len(test), opts.batch_size):
            stop = min(len(test), start + opts.batch_size)
            inputs = test.tensors(start, stop)
            maps, targets, _ = explain_methods_batch(model, test, start, stop, opts, [method], CLASS_NAMES,
                                                     inputs)[method]
            k = max(0, min(opts.faith_n - start, inputs.shape[0]))
            explained.extend(targets.tolist())
            if k:
                result = M.deletion_insertion(model, inputs[:k], maps[:k], targets[:k], steps=4, batch_size=4)
                deletion.append(result.deletion_auc)
                insertion.append(result.insertion_auc)
        deletion, insertion = np.concatenate(deletion), np.concatenate(insertion)
        for position, layer in enumerate(LAYERS):
            row = by_key[(layer, method)]
            assert row.faith_n == 5 and row.n == 6
            assert abs(row.values["deletion_auc"] - deletion[:, position].mean()) < 1e-5
            assert abs(row.values["insertion_auc"] - insertion[:, position].mean()) < 1e-5
    gaussian = np.broadcast_to(M.centre_gaussian((64, 64)), (5, 64, 64))
    result = M.deletion_insertion(model, test.tensors(0, 5), gaussian, np.array(explained[:5]), steps=4, batch_size=4)
    row = by_key[("-", GAUSSIAN)]
    assert abs(row.values["deletion_auc"] - result.deletion_auc.mean()) < 1e-5
    assert abs(row.values["insertion_auc"] - result.insertion_auc.mean()) < 1e-5


def test_inference_copy_folds_batchnorm_and_keeps_the_logits():
    model = tiny_model()
    probe = torch.randn(2, 3, 64, 64)
    fused = inference_copy(model, probe)
    assert fused is not model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        assert torch.allclose(model(probe), fused(probe), atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_inference_copy_falls_back_to_the_model_when_it_cannot_be_traced():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    model = Branchy()
    assert inference_copy(model, torch.ones(1, 3, 4, 4)) is model
