"""``python -m pfdemo.rescore [--out assets/weights]``: score the bundled demo models' pointing game again, as
their card records it (:func:`pfdemo.scoring.pointing_game`, with the card's recorded offsets), without
retraining: for when a metric's definition changes (issue #23: the pointing game's tie rule). The card's
accuracy, offsets and recipe are kept; ``demo_card.json`` and ``DEMO_CARD.md`` are rewritten."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pfdemo.scoring import pointing_figures
from pfdemo.train import write_card


def rescore(out: Path) -> dict:
    from pfnet import weights

    card = json.loads((out / "demo_card.json").read_text())
    for name, entry in card["models"].items():
        net = weights.load(f"demo_{name}", device="cpu").eval()
        entry.update(pointing_figures(net, int(entry["input_size"]), entry.get("cam_offsets") or {}))
        entry["scored"] = time.strftime("%Y-%m-%d", time.gmtime())
    write_card(out, card)
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    card = rescore(args.out)
    for name, entry in card["models"].items():
        print(name, {key: (value["hit_15px"], value["hit_strict"]) for key, value in entry.items()
                     if key.startswith("pointing_game")})


if __name__ == "__main__":
    main()
