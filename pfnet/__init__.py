"""pfnet: the networks of "Learning Features with Parameter-Free Layers" (ICLR 2022), registered with timm."""
from pfnet import resnet  # noqa: F401  (registers the ResNets with timm)
from pfnet.resnet import PFResNet, resnet50_hybrid, resnet50_max, resnet50_pf

__all__ = ["PFResNet", "resnet50_pf", "resnet50_max", "resnet50_hybrid"]
