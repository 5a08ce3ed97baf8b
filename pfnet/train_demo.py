"""Train the bundled demo models (width 0.25 R50 / R50-max / R50-hybrid) on procedural scenes.

    python -m pfnet.train_demo --model r50|r50_max|r50_hybrid [--minutes M] [--size S] [--out assets/weights]

Training reads an infinite stream of fresh scenes (``scenes.TRAIN_SEED``, batch k = indices 32k..32k+31);
evaluation uses the disjoint stream ``scenes.TEST_SEED``: accuracy on 1,000 scenes and the Grad-CAM pointing
game at ``layer4`` on the first 500 of them, measured on the fp16 weights that are shipped. The run writes
``demo_<model>.safetensors`` (fp16, keys exactly ``PFResNet.state_dict()``) and updates ``demo_card.json`` and
``DEMO_CARD.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file

from pfnet.resnet import PFResNet
from pfnet.scenes import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, TEST_SEED, TRAIN_SEED, render_scene, \
    scene_batch

MODELS = {"r50": "conv", "r50_max": "max", "r50_hybrid": "hybrid"}
TIMM_NAMES = {"r50": "resnet50_pf", "r50_max": "resnet50_max", "r50_hybrid": "resnet50_hybrid"}
WIDTH_MULT = 0.25
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "weights"


def build(model: str) -> PFResNet:
    return PFResNet(MODELS[model], num_classes=len(CLASS_NAMES), width_mult=WIDTH_MULT)


def lr_at(fraction: float, peak: float, warmup: float = 0.1, final_div: float = 100.0) -> float:
    """One-cycle on the wall-clock fraction: linear warm-up then cosine decay to peak/final_div."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < warmup:
        return peak * (0.04 + 0.96 * fraction / warmup)
    t = (fraction - warmup) / (1 - warmup)
    low = peak / final_div
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * t))


#: Progressive resizing on the wall clock: (fraction of the budget where the phase ends, input side as a
#: fraction of the final size). Small early images give several times more steps while the net learns what the
#: shapes are; the last phase runs at the evaluation size so that BN statistics and the layer-4 grid match.
SIZE_SCHEDULE = ((0.3, 0.75), (1.0, 1.0))


def size_at(fraction: float, size: int) -> int:
    for end, scale in SIZE_SCHEDULE:
        if fraction < end:
            return max(32, int(round(size * scale / 32)) * 32)
    return size


#: Scene curriculum: colours (``palette``: plain greys, in each scene's own polarity -> random colours) and
#: background clutter (gradient, noise, texture, distractors) ramp together from 0 to full over this fraction of
#: the budget. Random colours are what stalls the nets: from the first step on full scenes, and even on clean
#: ones with random colours, width-0.25 R50s stay at loss ln 10 for 700+ steps; on plain grey shapes they
#: reach 60 % train accuracy within 300 steps.
DIFFICULTY_RAMP = 0.4


def difficulty_at(fraction: float, train_acc: float = 1.0) -> float:
    """Scene difficulty (palette and clutter): min(time ramp, competence gate); it stays low until the running
    train accuracy leaves chance, and steps back when accuracy drops."""
    ramp = min(1.0, fraction / DIFFICULTY_RAMP) if DIFFICULTY_RAMP > 0 else 1.0
    gate = min(max((train_acc - 0.2) / 0.6, 0.0), 1.0)
    return min(ramp, gate)


def cell_targets(masks: np.ndarray, grid: tuple[int, int], threshold: float = 0.25) -> torch.Tensor:
    """[N, h, w] float: 1 where a layer-4 cell is covered by the object for >= threshold of its area."""
    h, w = grid
    cover = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) for m in masks])
    target = cover >= threshold
    # always at least the best-covered cell
    flat = cover.reshape(len(cover), -1)
    target.reshape(len(cover), -1)[np.arange(len(cover)), flat.argmax(1)] = True
    return torch.from_numpy(target.astype(np.float32))


def localization_loss(net: PFResNet, features: torch.Tensor, labels: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """Auxiliary mask supervision of the class-activation map (the head applied per layer-4 cell).

    With a GAP + linear head, Grad-CAM at layer4 is relu(cell logit - bias) of the target class, so asking the
    ground-truth class's cell logits to be high on object cells and low elsewhere (binary cross-entropy) trains
    the heatmap directly and gives a dense gradient signal that makes the nets leave chance much sooner.
    """
    weight = net.fc.weight[labels]                                   # [N, C]
    cell = torch.einsum("nchw,nc->nhw", features, weight) + net.fc.bias[labels][:, None, None]
    target = cell_targets(masks, tuple(features.shape[-2:]))
    return F.binary_cross_entropy_with_logits(cell, target)


def zero_init_residuals(net: PFResNet) -> None:
    """Zero the last BN gamma of every bottleneck: each block starts as the identity (faster start from scratch)."""
    for module in net.modules():
        if hasattr(module, "expansion_block"):
            nn.init.zeros_(module.expansion_block[1].weight)


def train(net: PFResNet, minutes: float, size: int, batch: int = 32, lr: float = 1e-3, weight_decay: float = 0.05,
          label_smoothing: float = 0.1, log_every: int = 25, aux_weight: float = 0.0) -> dict:
    """Train in place for ``minutes`` of wall clock. ``aux_weight`` > 0 adds :func:`localization_loss` (off by
    default: the shipped models' heatmaps are then an emergent property, which is what bench-loc measures)."""
    zero_init_residuals(net)
    net.to(memory_format=torch.channels_last)  # about 25 % faster convolutions on this CPU
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    budget = minutes * 60.0
    net.train()
    start = time.perf_counter()
    step, seen, loss_avg, acc_avg = 0, 0, None, None
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(elapsed / budget, lr)
        cur = size_at(elapsed / budget, size)
        difficulty = difficulty_at(elapsed / budget, acc_avg if acc_avg is not None else 0.0)
        x, y, scenes = scene_batch(TRAIN_SEED, range(step * batch, (step + 1) * batch), cur, clutter=difficulty,
                                   palette=difficulty)
        features = net.forward_features(x.contiguous(memory_format=torch.channels_last))
        logits = net.forward_head(features)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if aux_weight:
            loss = loss + aux_weight * localization_loss(net, features, y, np.stack([sc.mask for sc in scenes]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == y).float().mean().item()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        acc_avg = acc if acc_avg is None else 0.95 * acc_avg + 0.05 * acc
        step += 1
        seen += batch
        if step % log_every == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  {cur}px  difficulty {difficulty:.2f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  "
                  f"loss {loss_avg:.3f}  train acc {acc_avg:.3f}  {seen / max(elapsed, 1e-6):.1f} img/s", flush=True)
    minutes_used = (time.perf_counter() - start) / 60.0
    net.to(memory_format=torch.contiguous_format).eval()
    return {"steps": step, "images": seen, "minutes": round(minutes_used, 2)}


@torch.no_grad()
def accuracy(net: torch.nn.Module, size: int, n: int = 1000, seed: int = TEST_SEED, batch: int = 100) -> float:
    net.eval()
    correct = 0
    for lo in range(0, n, batch):
        x, y, _ = scene_batch(seed, range(lo, min(lo + batch, n)), size)
        correct += int((net(x).argmax(1) == y).sum())
    return correct / n


def gradcam(net: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: str = "layer4") -> torch.Tensor:
    """Plain Grad-CAM maps [N, H, W] at input resolution (bilinear upsampling), for class ``targets``."""
    store: dict[str, torch.Tensor] = {}
    handle = getattr(net, layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            logits = net(x)
            score = logits.gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    act = store["a"].detach()
    cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _dist_to_mask(mask: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def pointing_game(net: torch.nn.Module, size: int, n: int = 500, seed: int = TEST_SEED, layer: str = "layer4",
                  batch: int = 50) -> dict:
    """Pointing game with the ground-truth class: hit if the argmax is within 15*S/224 px of the mask (and
    strict: inside it). Also the centred (argmax = image centre) and uniform-random (expected) baselines."""
    tol = 15.0 * size / 224.0
    hits = strict = centre = centre_strict = 0
    rand = rand_strict = 0.0
    net.eval()
    for lo in range(0, n, batch):
        x, y, scenes = scene_batch(seed, range(lo, min(lo + batch, n)), size)
        cams = gradcam(net, x, y, layer)
        flat = cams.flatten(1).argmax(1)
        for k, sc in enumerate(scenes):
            dist = _dist_to_mask(sc.mask)
            r, c = divmod(int(flat[k]), size)
            hits += int(dist[r, c] <= tol)
            strict += bool(sc.mask[r, c])
            cr = cc = size // 2
            centre += int(dist[cr, cc] <= tol)
            centre_strict += bool(sc.mask[cr, cc])
            rand += float((dist <= tol).mean())
            rand_strict += float(sc.mask.mean())
    return {"layer": layer, "n": n, "tolerance_px": round(tol, 2),
            "hit_15px": round(hits / n, 4), "hit_strict": round(strict / n, 4),
            "centre_baseline_15px": round(centre / n, 4), "centre_baseline_strict": round(centre_strict / n, 4),
            "random_baseline_15px": round(rand / n, 4), "random_baseline_strict": round(rand_strict / n, 4)}


def fp16_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}


def load_demo(model: str, path: str | Path) -> PFResNet:
    net = build(model)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


NOTES = """\
Scenes (`pfnet/scenes.py`): one solid shape per image (10 classes), random colour / size (28-46 % of the side) /
rotation / position (uniform, always fully inside), on a gradient + colour-noise + texture background with thin
distractor strokes, arcs and dots. Only solid, compact shapes are used.

Why (measured, see the project report): the layer-4 grid has a 32-px stride, and the maximum of a bilinearly
upsampled map is always at a cell centre, so the pointing game has a geometric ceiling. If the peak is the cell
nearest the object's centre, at 128 px a disc scores 0.90 strict, a thick cross 0.80, a thin cross 0.32 and a
hollow ring 0.31 (15-px rule: ring 0.83 at 128, 0.34 at 224, because the hole grows past the tolerance). For
these scenes the best any layer-4 map can do (strict) is 0.78 at 128 px and 0.91 at 160 px (0.67 / 0.82 with
22-40 % objects); with the 15-px rule it is 0.99-1.0.

Recipe: AdamW, one-cycle on the wall clock, batch 32, progressive resizing (96 px then the final size), zero-init
residual BN, channels-last, and a scene curriculum: colours go from plain greys (light on dark or dark on light, as
each scene's own colours are) to the random colours while the clutter (gradient, noise, texture, distractors)
ramps in, held back while the running train accuracy is below 0.8. No localization signal is used in training:
the heatmaps are an emergent property of the classifiers, which is what bench-loc measures.

What mattered (measured on this machine; every figure in this paragraph is from ad-hoc probes whose scripts are
not in the repo, except the 0.83, which is this script at commit 4517e0c): random colours, not clutter, are what
stalls learning from scratch (700 steps at chance on clean random-colour scenes; 60 % train accuracy within 300
steps on plain ones). A light-on-dark-only curriculum gave an R50 at 0.83 that scored 0.98 on light objects and
0.73-0.76 on dark ones; with both polarities and a luma contrast of at least 40 between object and background the
same recipe gives the figures above. Without a curriculum the nets stayed at chance in every probe (up to 800
steps). One torch thread per training: on a shared 2-core machine, 2 threads ran 5-10x slower than 1.
"""


def write_card(out: Path, card: dict) -> None:
    (out / "demo_card.json").write_text(json.dumps(card, indent=2) + "\n")
    lines = ["# Demo models: PF ResNets on procedural scenes", "",
             "Offline default for pfcam: width-0.25 R50, R50-max and R50-hybrid (stem 64 channels as in the "
             "official code) trained from scratch on CPU on `pfnet.scenes` shapes, so that Grad-CAM heatmaps can "
             "be checked against ground-truth boxes and masks.", "",
             f"- input size: {card['input_size']} x {card['input_size']} (whole image squashed, no crop)",
             f"- normalization: ImageNet mean {card['mean']} / std {card['std']}",
             f"- classes ({len(card['class_names'])}): {', '.join(card['class_names'])}",
             "- training: fresh scenes of stream seed %d; evaluation: stream seed %d (1,000 scenes for accuracy, "
             "first 500 for the pointing game)" % (TRAIN_SEED, TEST_SEED), "",
             "| model | timm arch | file | test acc | pointing 15px | pointing strict | centre baseline (15px/strict)"
             " | random baseline (15px/strict) | train min | steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in card["models"].items():
        pg = m["pointing_game"]
        lines.append(f"| {name} | {m['arch']} | {m['file']} | {m['test_accuracy']:.3f} | {pg['hit_15px']:.3f} | "
                     f"{pg['hit_strict']:.3f} | {pg['centre_baseline_15px']:.3f} / {pg['centre_baseline_strict']:.3f}"
                     f" | {pg['random_baseline_15px']:.3f} / {pg['random_baseline_strict']:.3f} | "
                     f"{m['train_minutes']} | {m['recipe'].get('steps', '')} |")
    lines += ["", "Pointing game: Grad-CAM (ground-truth class) at `layer4`, bilinear upsampling to the input; a hit "
              "when the argmax is within 15*S/224 px of the object mask; strict: inside the mask.", ""]
    for name, m in card["models"].items():
        lines.append(f"- {name}: sha256 `{m['sha256']}`, recipe {json.dumps(m['recipe'])}, seed {m['seed']}, "
                     f"date {m['date']}")
    lines += ["", "## Notes", "", card.get("notes", NOTES).rstrip(), ""]
    (out / "DEMO_CARD.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the mask-supervised CAM loss (0: off; > 0 trains the heatmaps directly)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = p.parse_args(argv)
    if not 128 <= args.size <= 224:
        p.error("--size must be between 128 and 224")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    net = build(args.model)
    print(f"training {args.model} ({MODELS[args.model]}, width {WIDTH_MULT}) at {args.size}px for "
          f"{args.minutes} min", flush=True)
    stats = train(net, args.minutes, args.size, batch=args.batch, lr=args.lr, aux_weight=args.aux_weight)
    path = args.out / f"demo_{args.model}.safetensors"
    save_file(fp16_state(net), str(path), metadata={"arch": TIMM_NAMES[args.model], "width_mult": str(WIDTH_MULT),
                                                    "num_classes": str(len(CLASS_NAMES))})
    path.chmod(0o644)
    shipped = load_demo(args.model, path)  # evaluate exactly what is shipped (fp16 -> fp32)
    acc = accuracy(shipped, args.size)
    pg = pointing_game(shipped, args.size)
    pg3 = pointing_game(shipped, args.size, layer="layer3")
    print(f"test accuracy {acc:.4f}; pointing game layer4 {pg}; layer3 {pg3}", flush=True)

    card_path = args.out / "demo_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    if card.get("input_size") not in (None, args.size):
        print(f"warning: card input_size {card.get('input_size')} != {args.size}; card now says {args.size}")
    card.update({"input_size": args.size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                 "class_names": list(CLASS_NAMES), "classes": "scenes", "notes": NOTES})
    card.setdefault("models", {})[args.model] = {
        "file": path.name, "sha256": sha256(path), "arch": TIMM_NAMES[args.model], "variant": MODELS[args.model],
        "width_mult": WIDTH_MULT, "num_classes": len(CLASS_NAMES), "dtype": "float16",
        "recipe": {"optimizer": "AdamW", "lr": args.lr, "weight_decay": 0.05, "schedule":
                   "one-cycle on wall clock (10% warm-up, cosine)", "batch": args.batch, "label_smoothing": 0.1,
                   "input_size": args.size,
                   "size_schedule": [[e, size_at(e - 1e-9, args.size)] for e, _ in SIZE_SCHEDULE],
                   "scene_curriculum": f"palette and clutter 0 -> 1: linear over the first {DIFFICULTY_RAMP:.0%} of "
                                       "the budget, held back while running train accuracy < 0.8",
                   "aux_localization_loss": args.aux_weight,
                   "init": "kaiming + zero-init last BN of each bottleneck",
                   "data": f"fresh scenes, seed {TRAIN_SEED}", "steps": stats["steps"],
                   "images": stats["images"], "threads": torch.get_num_threads()},
        "seed": args.seed, "train_minutes": stats["minutes"], "test_accuracy": round(acc, 4),
        "test_set": {"seed": TEST_SEED, "n": 1000}, "pointing_game": pg, "pointing_game_layer3": pg3,
        "date": _dt.date.today().isoformat()}
    card["models"] = dict(sorted(card["models"].items()))
    write_card(args.out, card)
    print(f"wrote {path} and {card_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
