"""explain(progress=...): what it reports, how a callback stops it, and that progress changes nothing else."""
import pytest
import torch

import pfnet
from cams import Cancelled, explain
from cams.layers import CamError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return pfnet.resnet.PFResNet("hybrid", num_classes=5, width_mult=0.125).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


def test_gradient_methods_report_images_per_batch_and_give_the_same_maps(small, images):
    calls = []
    with_progress = explain(small, images, ["layer3", "layer4.1"], batch_size=2,
                            progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)]
    assert torch.equal(with_progress.heatmaps, explain(small, images, ["layer3", "layer4.1"], batch_size=2).heatmaps)


def test_score_cam_counts_channels_of_every_layer(small, images):
    calls = []
    result = explain(small, images[:2], ["layer3", "layer4"], method="scorecam", batch_size=16,
                     progress=lambda done, total: calls.append((done, total)))
    channels = _channels(small, ["layer3", "layer4"])
    assert calls[-1] == (2 * sum(channels), 2 * sum(channels))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)  # never goes back
    assert len(calls) == 2 * sum(-(-c // 16) for c in channels)  # one call per chunk of masked inputs
    assert torch.equal(result.heatmaps, explain(small, images[:2], ["layer3", "layer4"], method="scorecam",
                                                batch_size=16).heatmaps)


def _channels(model, layers):
    """Channels of each layer's output, seen by hooks of the test's own."""
    out = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, name=name: out.__setitem__(name, int(output.shape[1]))) for name in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        for handle in handles:
            handle.remove()
    return [out[name] for name in layers]


def test_a_true_answer_stops_the_call_cleanly(small, images):
    seen = []

    def stop_after_two_chunks(done, total):
        seen.append(done)
        return len(seen) >= 2

    with pytest.raises(Cancelled, match=r"stopped after 16 of \d+"):
        explain(small, images[:1], ["layer4"], method="scorecam", batch_size=8, progress=stop_after_two_chunks)
    assert seen == [8, 16]
    assert all(not module._forward_hooks for module in small.modules())
    assert torch.is_grad_enabled()
    with pytest.raises(Cancelled):
        explain(small, images, ["layer4"], batch_size=1, progress=lambda done, total: True)
    assert all(not module._forward_hooks for module in small.modules())


def test_an_exception_from_the_callback_propagates_and_leaves_no_hooks(small, images):
    class Interrupted(BaseException):  # what a UI raises to abandon a run (e.g. Streamlit's rerun)
        pass

    def interrupt(done, total):
        raise Interrupted

    with pytest.raises(Interrupted):
        explain(small, images[:1], ["layer3", "layer4"], method="gradcam", progress=interrupt)
    assert all(not module._forward_hooks for module in small.modules())
    assert torch.is_grad_enabled()


def test_progress_must_be_callable(small, images):
    with pytest.raises(CamError, match="progress must be callable"):
        explain(small, images[:1], ["layer4"], progress=3)
