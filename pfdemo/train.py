"""Train the bundled demo models (width 0.25 R50 / R50-max / R50-hybrid) on procedural scenes.

    pfcam train-demo --model r50|r50_max|r50_hybrid [--minutes M] [--size S] [--out assets/weights]
    python -m pfdemo.train ...  (the same)

Training reads an infinite stream of fresh scenes (``scenes.TRAIN_SEED``, batch k = indices 32k..32k+31);
evaluation uses the disjoint stream ``scenes.TEST_SEED``: accuracy on 1,000 scenes and the Grad-CAM pointing
game at ``layer4`` on the first 500 of them, measured on the fp16 weights that are shipped. The run writes
``demo_<model>.safetensors`` (fp16, keys exactly ``PFResNet.state_dict()``) and updates ``demo_card.json`` and
``DEMO_CARD.md`` in ``--out``. The scoring is :mod:`pfdemo.scoring`'s.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file

from pfdemo.scenes import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, TEST_SEED, TRAIN_SEED, scene_batch
from pfdemo.scoring import CALIBRATION_N, CALIBRATION_SEED, accuracy, localization
from pfnet.assets import assets_dir
from pfnet.resnet import PFResNet

MODELS = {"r50": "conv", "r50_max": "max", "r50_hybrid": "hybrid"}
TIMM_NAMES = {"r50": "resnet50_pf", "r50_max": "resnet50_max", "r50_hybrid": "resnet50_hybrid"}
WIDTH_MULT = 0.25
DEFAULT_OUT = assets_dir() / "weights"


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


#: Progressive resizing on the wall clock: (fraction of the budget where the phase ends, input side in px, capped
#: at the final size; None: the final size). Small early images give several times more steps while the net learns
#: what the shapes are; the last phase runs at the evaluation size so that BN statistics and the layer-4 grid
#: match. At 128 px this is 96 px then 128; at 160, 96 -> 128 -> 160 (a 160-px net trained 30 % at 128 and 70 %
#: at 160 got a third fewer steps and stayed at 0.94 accuracy).
SIZE_SCHEDULE = ((0.3, 96), (0.75, 128), (1.0, None))


def size_at(fraction: float, size: int) -> int:
    for end, side in SIZE_SCHEDULE:
        if fraction < end:
            return size if side is None else min(side, size)
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
Scenes (`pfdemo/scenes.py`): one solid shape per image (10 classes), random colour / size (28-46 % of the side) /
rotation / position (uniform, always fully inside), on a gradient + colour-noise + texture background with thin
distractor strokes, arcs and dots. Only solid, compact shapes are used.

Why (measured, see the project report): the layer-4 grid has a 32-px stride, and the maximum of a bilinearly
upsampled map is always at a cell centre, so the pointing game has a geometric ceiling. If the peak is the cell
nearest the object's centre, at 128 px a disc scores 0.90 strict, a thick cross 0.80, a thin cross 0.32 and a
hollow ring 0.31 (15-px rule: ring 0.83 at 128, 0.34 at 224, because the hole grows past the tolerance). For
these scenes the best any layer-4 map can do (strict) is 0.78 at 128 px and 0.91 at 160 px (0.67 / 0.82 with
22-40 % objects); with the 15-px rule it is 0.99-1.0.

Alignment (`cams.align`; the card's `cam_offsets`): a plain resize draws a layer-4 cell at 32*i + 15.5 px, but every
stride-2 step of these ResNets (7x7 stem conv, 3x3 max-pool, strided 3x3 conv or max-pool, padded by half the
kernel) centres output i on input 2*i, so a cell looks around 32*i and its heatmap is drawn up to 15.5 px down and
right of it. Learned 3x3 convolutions can absorb part of that shift; parameter-free max-pools cannot. For each
model and layer the offset is fitted on the validation stream (unaligned peaks of the ground-truth class to the
object centres) from Grad-CAM, Grad-CAM++ and LayerCAM separately (`cam_offset_fits`), and recorded only where the
three agree within 2 px per axis; the card reports the pointing game on the test stream with and without it. At
layer4 they agree for every model: about the geometric 15.5 px for R50-max, 13 px for R50-hybrid (its
downsampling blocks average-pool 2x2, which is centred, before their conv) and 6-7 px for R50. At layer3 they do
not (spreads of 4-9 px, many flat Grad-CAM maps), so layer3 is drawn unshifted.

Input size: R50 and R50-hybrid at 128 px. R50-max at 160 px: at 128 its aligned pointing game was 0.79 (0.56
unaligned; `--score-only` of the earlier 128-px weights), below the issue's 0.8, and a 5x5 layer-4 grid has a
higher ceiling than 4x4. Two 160-px runs (seeds 0 and 1, 96 -> 128 -> 160 px) were trained; seed 0 is shipped,
chosen on the validation stream (accuracy 0.974 vs 0.960, aligned pointing 0.853 vs 0.843 on stream 2023; an
ad-hoc script calling this module's accuracy and pointing_game, not in the repo).

Recipe: AdamW, one-cycle on the wall clock, batch 32, progressive resizing (96 px, 128 px, the final size), zero-init
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
    models = card["models"]
    sizes = ", ".join(f"{name} {m['input_size']} px" for name, m in models.items())
    lines = ["# Demo models: PF ResNets on procedural scenes", "",
             "Offline default for pfcam: width-0.25 R50, R50-max and R50-hybrid (stem 64 channels as in the "
             "official code) trained from scratch on CPU on `pfdemo.scenes` shapes, so that Grad-CAM heatmaps can "
             "be checked against ground-truth boxes and masks.", "",
             f"- input size: {sizes} (whole image squashed, no crop)",
             f"- normalization: ImageNet mean {card['mean']} / std {card['std']}",
             f"- classes ({len(card['class_names'])}): {', '.join(card['class_names'])}",
             f"- training: fresh scenes of stream seed {TRAIN_SEED}; evaluation: stream seed {TEST_SEED} (1,000 "
             "scenes for accuracy, first 500 for the pointing game); heatmap alignment chosen on stream seed "
             f"{CALIBRATION_SEED} ({CALIBRATION_N} scenes)", "",
             "| model | input | test acc | layer4 offset (dy, dx) px | pointing 15px | pointing strict | "
             "unaligned 15px / strict | centre baseline (15px/strict) | random baseline (15px/strict) | "
             "train min | steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        pg, raw = m["pointing_game"], m.get("pointing_game_unaligned", m["pointing_game"])
        dy, dx = m.get("cam_offsets", {}).get("layer4", (0, 0))
        lines.append(f"| {name} | {m['input_size']} | {m['test_accuracy']:.3f} | ({dy:g}, {dx:g}) | "
                     f"{pg['hit_15px']:.3f} | {pg['hit_strict']:.3f} | {raw['hit_15px']:.3f} / {raw['hit_strict']:.3f}"
                     f" | {pg['centre_baseline_15px']:.3f} / {pg['centre_baseline_strict']:.3f}"
                     f" | {pg['random_baseline_15px']:.3f} / {pg['random_baseline_strict']:.3f} | "
                     f"{m['train_minutes']} | {m['recipe'].get('steps', '')} |")
    lines += ["", "Pointing game: Grad-CAM (ground-truth class) at `layer4`, drawn with the model's alignment "
              "offset (`cams.align`); a hit when a maximal pixel (any of a plateau) is within 15*S/224 px of the "
              "object mask; strict: inside the mask; a flat map is a miss. Unaligned: the plain bilinear resize "
              "(pytorch-grad-cam's drawing).",
              ""]
    for name, m in models.items():
        lines.append(f"- {name}: `{m['file']}` ({m['arch']}), sha256 `{m['sha256']}`, recipe "
                     f"{json.dumps(m['recipe'])}, seed {m['seed']}, trained {m['date']}, "
                     f"scored {m.get('scored', m['date'])}")
    lines += ["", "## Notes", "", card.get("notes", NOTES).rstrip(), ""]
    (out / "DEMO_CARD.md").write_text("\n".join(lines))


def size_phases(size: int) -> list[list]:
    """The schedule as the card records it: [end fraction, px] per phase, merging phases of equal size."""
    phases: list[list] = []
    for end, _ in SIZE_SCHEDULE:
        side = size_at(end - 1e-9, size)
        if phases and phases[-1][1] == side:
            phases[-1][0] = end
        else:
            phases.append([end, side])
    return phases


def score(model: str, path: Path, size: int) -> dict:
    """The card's figures for the weights at ``path``, exactly as shipped (fp16 -> fp32)."""
    shipped = load_demo(model, path)
    figures = {"test_accuracy": round(accuracy(shipped, size), 4), "test_set": {"seed": TEST_SEED, "n": 1000}}
    figures.update(localization(shipped, size))
    figures["scored"] = _dt.date.today().isoformat()
    print(f"{model}: test accuracy {figures['test_accuracy']:.4f}; offsets {figures['cam_offsets']}; "
          f"pointing game layer4 {figures['pointing_game']['hit_15px']} "
          f"(unaligned {figures['pointing_game_unaligned']['hit_15px']})", flush=True)
    return figures


def _read_card(out: Path) -> dict:
    card_path = out / "demo_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card.pop("input_size", None)  # per model since the models may differ
    card.update({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "class_names": list(CLASS_NAMES),
                 "classes": "scenes", "notes": NOTES})
    for entry in card.setdefault("models", {}).values():
        entry.setdefault("input_size", entry.get("recipe", {}).get("input_size"))
    return card


def _input_size(text: str) -> int:
    size = int(text)
    if not 128 <= size <= 224:
        raise argparse.ArgumentTypeError(f"must be between 128 and 224, got {text}")
    return size


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trainer's options, on ``p`` (``pfcam train-demo`` and ``python -m pfdemo.train`` share them)."""
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--size", type=_input_size, default=128, help="evaluation input size, 128-224 px")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the mask-supervised CAM loss (0: off; > 0 trains the heatmaps directly)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--score-only", action="store_true",
                   help="do not train: re-score the weights already in --out and update their card entry")
    p.set_defaults(handler=train_demo_command)
    return p


def add_train_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train-demo`` on an ``argparse`` subparsers object (``pfcam train-demo``)."""
    return configure_parser(subparsers.add_parser(
        "train-demo", help="train (or re-score) a bundled demo model on procedural scenes",
        description=__doc__.splitlines()[0]))


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="python -m pfdemo.train",
                                                      description=__doc__.splitlines()[0]))
    return train_demo_command(parser.parse_args(argv))


def train_demo_command(args: argparse.Namespace) -> int:
    """Train (or with ``--score-only`` re-score) one demo model and update the card; returns the exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"demo_{args.model}.safetensors"
    card = _read_card(args.out)

    if args.score_only:
        entry = card["models"].get(args.model)
        problem = ("" if entry is not None and path.is_file() else f"no card entry and weights for {args.model} "
                   f"in {args.out}")
        if not problem and entry.get("sha256") != sha256(path):
            problem = f"{path} is not the file its card entry describes (sha256 differs)"
        if problem:
            print(f"train-demo: error: {problem}", file=sys.stderr)
            return 2
        entry.update(score(args.model, path, entry["input_size"]))
    else:
        net = build(args.model)
        print(f"training {args.model} ({MODELS[args.model]}, width {WIDTH_MULT}) at {args.size}px for "
              f"{args.minutes} min", flush=True)
        stats = train(net, args.minutes, args.size, batch=args.batch, lr=args.lr, aux_weight=args.aux_weight)
        save_file(fp16_state(net), str(path), metadata={"arch": TIMM_NAMES[args.model],
                                                        "width_mult": str(WIDTH_MULT),
                                                        "num_classes": str(len(CLASS_NAMES))})
        path.chmod(0o644)
        card["models"][args.model] = {
            "file": path.name, "sha256": sha256(path), "arch": TIMM_NAMES[args.model],
            "variant": MODELS[args.model], "width_mult": WIDTH_MULT, "num_classes": len(CLASS_NAMES),
            "dtype": "float16", "input_size": args.size,
            "recipe": {"optimizer": "AdamW", "lr": args.lr, "weight_decay": 0.05, "schedule":
                       "one-cycle on wall clock (10% warm-up, cosine)", "batch": args.batch, "label_smoothing": 0.1,
                       "input_size": args.size,
                       "size_schedule": size_phases(args.size),
                       "scene_curriculum": f"palette and clutter 0 -> 1: linear over the first {DIFFICULTY_RAMP:.0%}"
                                           " of the budget, held back while running train accuracy < 0.8",
                       "aux_localization_loss": args.aux_weight,
                       "init": "kaiming + zero-init last BN of each bottleneck",
                       "data": f"fresh scenes, seed {TRAIN_SEED}", "steps": stats["steps"],
                       "images": stats["images"], "threads": torch.get_num_threads()},
            "seed": args.seed, "train_minutes": stats["minutes"], "date": _dt.date.today().isoformat(),
            **score(args.model, path, args.size)}
    card["models"] = dict(sorted(card["models"].items()))
    write_card(args.out, card)
    print(f"wrote {path} and {args.out / 'demo_card.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
