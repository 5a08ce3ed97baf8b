"""The CAM methods pfcam knows: their keys, labels, one-line notes and families (re-exported by :mod:`cams.engine`)."""
from __future__ import annotations

METHODS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcamelementwise": "Grad-CAM element-wise",
    "eigengradcam": "Eigen-Grad-CAM",
    "eigencam_fixed": "Eigen-CAM",
    "eigencam": "Eigen-CAM (pytorch-grad-cam's sign)",
    "kpcacam": "KPCA-CAM",
    "finercam": "Finer-CAM",
    "shapleycam": "Shapley-CAM",
    "smoothgradcampp": "SmoothGrad-CAM++",
    "guidedgradcam": "Guided Grad-CAM",
    "fullgrad": "FullGrad",
    "scorecam": "Score-CAM",
    "ablationcam": "Ablation-CAM",
    "cam": "CAM (fc weights)",
}
# What each method is and what it costs, in one line (the app's method list, docs/methods.md).
METHOD_NOTES: dict[str, str] = {
    "gradcam": "channels weighted by their mean gradient · 1 forward + 1 backward",
    "gradcampp": "channels weighted by positive gradients with 2nd/3rd-order terms · 1 forward + 1 backward",
    "xgradcam": "gradients weighted by the normalised activations · 1 forward + 1 backward",
    "hirescam": "gradient x activation at each position · 1 forward + 1 backward",
    "layercam": "positive gradient x activation at each position · 1 forward + 1 backward",
    "gradcamelementwise": "ReLU(gradient x activation) summed over channels · 1 forward + 1 backward",
    "eigengradcam": "first principal component of gradient x activation · 1 forward + 1 backward + a small SVD",
    "eigencam_fixed": "first principal component of the activations, turned to rise with them; the same map for every "
                      "class · 1 forward (about 1.3x)",
    "eigencam": "Eigen-CAM with pytorch-grad-cam's LAPACK sign, which can invert the map between machines · "
                "1 forward + an SVD",
    "kpcacam": "first kernel (sigmoid) principal component of the activations; the same map for every class · "
               "1 forward + an eigen-solve over positions",
    "finercam": "Grad-CAM of the class against its 3 nearest classes · 1 forward + 1 backward",
    "shapleycam": "gradient minus half the Hessian-vector product · 1 forward + 1 backward + 1 more per layer",
    "smoothgradcampp": "Grad-CAM++ over 4 noisy copies (torch-cam's) · 1 forward + 4 noisy forwards and 1 backward, "
                       "batched",
    "guidedgradcam": "Grad-CAM x the guided-backprop gradient, pixel-sharp · 1 forward + 2 backwards",
    "fullgrad": "input gradient plus every bias's gradient (the layer choice does not matter) · 1 forward + 1 backward",
    "scorecam": "each channel masks the input; softmax of the masked scores weights it · 1 forward per channel "
                "(batched): slow",
    "ablationcam": "score drop when each channel is removed · the network after the layer once per channel "
                   "(batched): fast at deep layers, slow at early ones",
    "cam": "the fc weights on the final feature map (ResNets' last layer only) · 1 forward",
}
GRADIENT_METHODS = frozenset({"gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "gradcamelementwise",
                              "eigengradcam"})
# Eigen-CAM with the sign fixed by the activations (what "Eigen-CAM" means in pfcam: the map rises with the activation
# mass; cams.eigen.fixed_sign_projection), with pytorch-grad-cam's sign (LAPACK's, which differs between builds, kept
# for parity), and KPCA-CAM (a kernel principal component): maps of the activations alone, the same for every target.
EIGEN_METHODS = frozenset({"eigencam", "eigencam_fixed", "kpcacam"})
# Methods with passes of their own (cams.methods): more than the one forward + one gradient call of the others.
OWN_PASS_METHODS = frozenset({"ablationcam", "fullgrad", "guidedgradcam", "finercam", "shapleycam", "smoothgradcampp"})
# Where a method's heatmap depends on nothing of the requested layer but its name (FullGrad: every bias layer).
LAYERLESS_METHODS = frozenset({"fullgrad"})
# Methods that run a forward per channel (``batch_size`` counts masked / ablated inputs; progress counts channels).
SCORED_METHODS = frozenset({"scorecam", "ablationcam"})
PRECISIONS = ("float32", "bfloat16")
# Methods whose maps ``eigen_smooth`` changes (a weighted sum of activation channels it can replace); the others
# ignore it: Eigen-CAM, Eigen-Grad-CAM and KPCA-CAM are projections already, CAM, FullGrad and SmoothGrad-CAM++ have
# no weighted activations to project.
EIGEN_SMOOTH_METHODS = frozenset({"gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "gradcamelementwise",
                                  "finercam", "shapleycam", "guidedgradcam", "scorecam", "ablationcam"})
