"""Eigen-CAM's projection on the first principal component: pytorch-grad-cam's ``get_2d_projection``, sign included,
without its cost.

pytorch-grad-cam centres each image's activations ``M`` ([h*w, C]) and projects them on the first row of ``VT`` from
``numpy.linalg.svd(M, full_matrices=True)`` (LAPACK ``dgesdd``: numpy computes float32 input in float64), building a
full ``U`` (3136 x 3136 at R50 layer1) or ``VT`` (2048 x 2048 at layer4) it throws away. A ReLU follows, so the
singular vector's sign decides the map, and that sign is whatever ``gesdd``'s algorithm arrives at: a top-1 method
(power iteration, ``eigh`` of ``M^T M``, torch's or cuSOLVER's SVD) matches it on some layers and flips it on others.

What ``gesdd`` does, and what is done here instead (``MNTHR = int(min(m, n) * 11 / 6)``, as in LAPACK):

- ``m >= MNTHR`` (tall: R50 layer1): a Householder QR ``M = Q R`` first; ``VT`` then comes from the SVD of the
  ``n x n`` factor ``R`` alone. Here: the QR in torch on the model's device, then numpy's ``svd`` of ``R`` (its
  ``gesdd`` takes a square matrix straight to the same bidiagonalisation), so the same LAPACK code picks the sign.
- ``n >= MNTHR`` (wide: layer3, layer4, ViT tokens): an LQ ``M = L Q`` first, ``VT = VT_L Q``; the projection
  ``M VT[0]`` is ``L VT_L[0]``. Here: ``L`` from a torch QR of ``M^T``, numpy's ``svd`` of the ``m x m`` ``L``.
- otherwise ("direct": nearly square, R50 layer2 at 224 px, 784 x 512): ``gesdd`` bidiagonalises ``M`` itself. A QR
  first would change the sign (the bidiagonal's rows come out with other signs, and the divide-and-conquer SVD fixes
  each left singular vector's sign by one of its rows). numpy's economy ``svd`` of ``M`` then
  (``reference_projection``), on the CPU.

Householder QR (MKL, OpenBLAS, cuSOLVER) follows LAPACK's sign convention, so the factor numpy sees is the one
``gesdd`` would see, up to rounding. Rounding decides the sign only where LAPACK's bidiagonal holds rounding noise
next to its eps thresholds: rank-deficient activations (dead channels, repeated positions). Those images (a factor's
diagonal below ``RANK_TOLERANCE`` of its largest) get ``gesdd``'s own bits: on the QR branch the same two steps in
numpy, in float64 as numpy's SVD runs (``exact_qr_projection``), on the LQ branch ``reference_projection``.
``tests/test_speed_paths.py`` compares the maps with pytorch-grad-cam's on 112 cases (320 images) and counts the
wrong ways: torch's SVD flips 49 cases, a QR/LQ first 23 of the 35 direct-branch ones, the
QR/LQ branches without the exact fallback 8 of 77.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

try:  # a dependency of scikit-learn, which pytorch-grad-cam requires; optional here
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

_controller = None  # created on first use: scanning the loaded libraries costs milliseconds

# A triangular factor with a diagonal entry below this fraction of its largest is (numerically) rank-deficient:
# dead channels, repeated positions. LAPACK's bidiagonal then holds rounding noise next to its eps thresholds, and
# its sign depends on the exact bits; such images take gesdd's own arithmetic, in numpy, on pytorch-grad-cam's bits.
RANK_TOLERANCE = 1e-3
# Gram matrices up to this size take a full eigh (R50 layer1's 256 x 256: 4 ms on one thread); larger ones (layer2's
# 512 x 512: 24 ms) the subspace iteration of top_eigenvectors.
DIRECT_EIGH = 256
# A projection whose correlation with the activation mass is below this is taken as not leaning either way.
TIE_TOLERANCE = 1e-6


def _blas_threads():
    """numpy's BLAS limited to torch's thread count: its default (every core) spins against torch on a busy CPU."""
    global _controller
    if ThreadpoolController is None:  # pragma: no cover
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=torch.get_num_threads(), user_api="blas")


def gesdd_branch(rows: int, cols: int) -> str:
    """The branch LAPACK's ``gesdd`` takes for a ``rows x cols`` matrix: "qr", "lq" or "direct"."""
    threshold = min(rows, cols) * 11 // 6  # MNTHR
    if rows >= cols:
        return "qr" if rows >= threshold else "direct"
    return "lq" if cols >= threshold else "direct"


def _first_right_vectors(matrices: torch.Tensor) -> torch.Tensor:
    """First row of ``VT`` of numpy's (LAPACK ``dgesdd``) economy SVD of each ``[N, a, b]`` matrix -> ``[N, b]``."""
    with _blas_threads():
        vt = np.linalg.svd(matrices.cpu().numpy(), full_matrices=False)[2]
    return torch.from_numpy(np.ascontiguousarray(vt[:, 0, :])).to(matrices.device)


def _centred_as_reference(activations: torch.Tensor):
    """Each image's centred ``[h*w, C]`` float32 matrix, computed as ``get_2d_projection`` computes it (so LAPACK
    gets the same bits), under numpy's BLAS thread limit."""
    batch = activations.detach().float().cpu().contiguous().numpy().copy()
    batch[np.isnan(batch)] = 0
    with _blas_threads():
        for activation in batch:
            matrix = activation.reshape(activation.shape[0], -1).transpose()
            yield matrix - matrix.mean(axis=0)


def reference_projection(activations: torch.Tensor) -> torch.Tensor:
    """``get_2d_projection``'s arithmetic step for step (economy SVD: the same first row of ``VT``), on the CPU:
    ``[N, C, h, w]`` -> ``[N, h*w]`` float32."""
    projections = [matrix @ np.linalg.svd(matrix, full_matrices=False)[2][0, :]
                   for matrix in _centred_as_reference(activations)]
    return torch.from_numpy(np.float32(projections)).reshape(len(projections), -1)


def exact_qr_projection(activations: torch.Tensor) -> torch.Tensor:
    """The "qr" branch with ``gesdd``'s own bits, on the CPU: numpy's QR (in float64, as numpy's SVD runs) of the
    matrix centred as pytorch-grad-cam centres it, then numpy's SVD of ``R``: ``reference_projection``'s result bit for
    bit at half its cost (no ``U``), for rank-deficient images whose sign hangs on the exact bits. (The same through a
    QR of ``M^T`` is not ``gesdd``'s LQ, bit for bit: wide rank-deficient images take ``reference_projection``.)"""
    projections = []
    for matrix in _centred_as_reference(activations):
        factor = np.linalg.qr(matrix.astype(np.float64), mode="r")
        projections.append(matrix @ np.float32(np.linalg.svd(factor, full_matrices=False)[2][0, :]))
    return torch.from_numpy(np.float32(projections)).reshape(len(projections), -1)


def _position_matrix(activations: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` float32 -> ``[N, h*w, C]``, NaN counted as 0 (as ``get_2d_projection`` does)."""
    count, channels, height, width = activations.shape
    matrix = activations.reshape(count, channels, height * width).transpose(1, 2)
    return torch.where(torch.isnan(matrix), torch.zeros((), device=matrix.device), matrix)


def first_component_projection(activations: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, h, w]`` float32 (on the activations' device): each image's centred activations
    projected on their first principal direction, with ``get_2d_projection``'s sign."""
    count, channels, height, width = activations.shape
    acts = activations.detach().float()
    rows, cols = height * width, channels
    branch = gesdd_branch(rows, cols) if min(rows, cols) > 1 else "direct"
    projection = torch.empty((count, rows), dtype=torch.float32, device=acts.device)
    exact = torch.ones(count, dtype=torch.bool)
    if branch != "direct":
        matrix = _position_matrix(acts)
        matrix = matrix - matrix.mean(dim=1, keepdim=True)  # [N, m = h*w, n = C]
        if branch == "qr":
            factor = torch.linalg.qr(matrix, mode="r").R
            diagonal = factor.diagonal(dim1=-2, dim2=-1).abs()
        else:
            factor = torch.linalg.qr(matrix.transpose(1, 2), mode="r").R.transpose(1, 2)
            diagonal = factor.diagonal(dim1=-2, dim2=-1).abs()[:, :-1]  # centred rows sum to 0: the last is ~0
        regular = (diagonal.amin(dim=-1) > RANK_TOLERANCE * diagonal.amax(dim=-1)).cpu()
        if regular.any():
            chosen = regular.nonzero().squeeze(1).to(acts.device)
            factor = factor.index_select(0, chosen)
            vectors = _first_right_vectors(factor).unsqueeze(-1)
            source = matrix.index_select(0, chosen) if branch == "qr" else factor
            projection[chosen] = (source @ vectors).squeeze(-1)
        exact = ~regular
    if exact.any():
        chosen = exact.nonzero().squeeze(1).to(acts.device)
        subset = acts.index_select(0, chosen)
        exact_maps = exact_qr_projection(subset) if branch == "qr" else reference_projection(subset)
        projection[chosen] = exact_maps.to(acts.device)
    return projection.reshape(count, height, width)


def fixed_sign_projection(activations: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, h, w]`` float32 (on the activations' device): the same projection as
    :func:`first_component_projection` (centred activations on their first principal direction), with a sign fixed
    by the activations rather than by LAPACK: the projection rises with the activation mass (the channel sum at each
    position), so the map shows where the layer responds, on every machine and LAPACK build.

    The direction is the top eigenvector of the smaller Gram matrix (``M^T M``, C x C, or ``M M^T``, hw x hw), made in
    float32 and solved in float64; no SVD of ``M`` itself. Within rounding its map equals pytorch-grad-cam's where
    LAPACK's sign agrees and is its mirror image (before the ReLU) where it does not."""
    count, channels, height, width = activations.shape
    rows = height * width
    matrix = _position_matrix(activations.detach().float())  # [N, hw, C]
    centred = matrix - matrix.mean(dim=1, keepdim=True)
    if rows <= channels:  # wide: the hw x hw Gram; its top eigenvector u gives the direction M^T u
        left = top_eigenvectors(centred @ centred.transpose(1, 2))
        direction = (centred.transpose(1, 2) @ left.unsqueeze(-1)).squeeze(-1)
    else:
        direction = top_eigenvectors(centred.transpose(1, 2) @ centred)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    projection = (centred @ direction.unsqueeze(-1)).squeeze(-1)  # [N, hw]
    return (projection * _activation_sign(projection, matrix)[:, None]).reshape(count, height, width)


def _activation_sign(projection: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``[N]`` of +-1: the sign that makes each projection ``[N, hw]`` lean with the activation mass (the channel sum of
    ``matrix`` ``[N, hw, C]`` at each position). Where the two are uncorrelated (an even mass: no lean to follow), the
    sign that makes the projection's largest entry positive."""
    values = projection.double()
    mass = matrix.double().sum(dim=2)
    mass = mass - mass.mean(dim=1, keepdim=True)
    leaning = (values * mass).sum(dim=1)
    even = leaning.abs() <= TIE_TOLERANCE * values.norm(dim=1) * mass.norm(dim=1)
    peak = values.gather(1, values.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    leaning = torch.where(even, peak, leaning)
    return torch.where(leaning < 0, -1.0, 1.0).to(device=projection.device, dtype=projection.dtype)


def top_eigenvectors(grams: torch.Tensor, block: int = 8, steps: int = 100, tolerance: float = 1e-12) -> torch.Tensor:
    """``[N, k, k]`` symmetric positive semi-definite -> ``[N, k]``: each matrix's eigenvector of its largest
    eigenvalue (unit length, float32), in float64 on the CPU.

    Subspace iteration with Rayleigh-Ritz on ``block`` vectors (started from the columns of largest diagonal), until
    the top Ritz pair's residual is below ``tolerance`` of its value: a few products with the matrix instead of a
    full ``eigh``, whose tridiagonal reduction costs as much as the Gram matrix itself at 512 x 512 (R50 layer2).
    Matrices up to ``DIRECT_EIGH`` wide (where ``eigh`` costs no more), and any the iteration does not settle within
    ``steps``, take LAPACK's ``eigh``."""
    matrices = grams.detach().double().cpu()
    vectors = None
    if matrices.shape[-1] > max(DIRECT_EIGH, 4 * block):
        vectors = _subspace_iteration(matrices, block, steps, tolerance)
    if vectors is None:
        vectors = torch.linalg.eigh(matrices)[1][..., -1]
    return vectors.to(device=grams.device, dtype=torch.float32)


def _subspace_iteration(matrices: torch.Tensor, block: int, steps: int, tolerance: float) -> torch.Tensor | None:
    """``top_eigenvectors``' iteration on float64 ``[N, k, k]``: the top Ritz vectors ``[N, k]``, or None when some
    matrix has not settled within ``steps``."""
    count, size = matrices.shape[0], matrices.shape[-1]
    starts = matrices.diagonal(dim1=1, dim2=2).topk(block, dim=1).indices
    basis = torch.gather(matrices, 2, starts[:, None, :].expand(count, size, block))
    for _ in range(steps):
        basis = torch.linalg.qr(basis).Q  # [N, k, b] orthonormal
        product = matrices @ basis
        values, vectors = torch.linalg.eigh(basis.transpose(1, 2) @ product)  # Rayleigh-Ritz on the block
        top, ritz = values[:, -1], basis @ vectors[:, :, -1:]
        residual = (product @ vectors[:, :, -1:] - top[:, None, None] * ritz).norm(dim=(1, 2))
        if bool((residual <= tolerance * top.abs()).all()):
            return ritz[..., 0]
        basis = product @ vectors  # the block moved on by one product, Ritz-ordered
    return None


def kernel_projection(activations: torch.Tensor, gamma: float | None = None, coef0: float = 1.0) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, h, w]`` float32: KPCA-CAM, pytorch-grad-cam's ``get_2d_projection_kernel``
    (scikit-learn's ``KernelPCA(n_components=1, kernel="sigmoid")`` of each image's centred ``[h*w, C]``
    activations) without scikit-learn: the kernel ``tanh(gamma <x, y> + coef0)`` (``gamma`` 1 / C by default),
    centred as ``KernelCenterer``
    does, its top eigenvector (:func:`top_eigenvectors`, float64) scaled by the root of its eigenvalue, the sign
    ``svd_flip`` gives (the entry of largest magnitude positive)."""
    count, channels, height, width = activations.shape
    matrix = _position_matrix(activations.detach().float())
    centred = matrix - matrix.mean(dim=1, keepdim=True)
    gamma = 1.0 / channels if gamma is None else gamma
    kernel = torch.tanh(gamma * (centred @ centred.transpose(1, 2)) + coef0).double()
    kernel = (kernel - kernel.mean(dim=1, keepdim=True) - kernel.mean(dim=2, keepdim=True)
              + kernel.mean(dim=(1, 2), keepdim=True))
    vectors = top_eigenvectors(kernel).double().to(kernel.device)  # [N, hw]
    values = ((kernel @ vectors.unsqueeze(-1)).squeeze(-1) * vectors).sum(dim=1).clamp_min(0)
    peak = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    vectors = vectors * torch.where(peak < 0, -1.0, 1.0).to(vectors.dtype)
    projection = vectors * values.sqrt()[:, None]
    return projection.float().to(activations.device).reshape(count, height, width)
