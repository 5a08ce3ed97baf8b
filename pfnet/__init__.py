"""pfnet: the networks of "Learning Features with Parameter-Free Layers" (ICLR 2022), registered with timm."""
from pfnet.version import __version__  # noqa: F401
from pfnet import resnet  # noqa: F401  (registers the ResNets with timm)
from pfnet.resnet import PFResNet, resnet50_hybrid, resnet50_max, resnet50_pf

__all__ = ["PFResNet", "resnet50_pf", "resnet50_max", "resnet50_hybrid"]
from pfnet import pit, profile, vit  # noqa: E402,F401  (registers ViT-max / PiT-max with timm)
from pfnet.vit import ViTMax, vit_b_max, vit_s_max, vit_ti_max  # noqa: E402
from pfnet.pit import PiTMax, pit_b_max, pit_s_max, pit_ti_max  # noqa: E402
from pfnet.profile import count_macs, count_params, measure_latency_ms  # noqa: E402

__all__ += ["ViTMax", "vit_ti_max", "vit_s_max", "vit_b_max", "PiTMax", "pit_ti_max", "pit_s_max", "pit_b_max",
            "count_params", "count_macs", "measure_latency_ms"]
from pfnet import zoo  # noqa: E402,F401  (the model catalogue)
from pfnet.weights import load, select_device  # noqa: E402

__all__ += ["zoo", "load", "select_device"]
