"""What hostile checkpoints and images cost to refuse (or load): outcome, seconds, peak RSS growth.

    python benchmarks/bench_hostile.py                    # this checkout's pfnet/cams
    python benchmarks/bench_hostile.py --root /tmp/old    # another checkout's code (for before/after figures)

Each case runs in a fresh Python process: the hostile file is made by this process first, then the child
imports pfnet and cams, notes its RSS, does the one load, and reports ``ru_maxrss`` growth over that RSS and
the wall time of the load alone (tests/hostile_files.py: the builders and the measurement the tests use).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hostile_files as hostile  # noqa: E402

CASES = ["zip_bomb_2GiB", "declared_storage_1TiB", "oversize_path_1.5GiB", "oversize_safetensors_1.5GiB",
         "os_system_payload", "nan_weight", "int_weight", "bool_weight", "complex_weight", "float_tiff_8000px",
         "animated_gif", "gif_header_bomb"]
IMAGE_CASES = ("float_tiff_8000px", "animated_gif", "gif_header_bomb")


def _demo_state():
    from safetensors.torch import load_file

    return load_file(str(ROOT / "assets" / "weights" / "demo_r50.safetensors"))


def make(case: str, folder: Path) -> tuple[str, dict[str, str]]:
    """The file for ``case`` and extra environment for the child."""
    import torch
    from PIL import Image

    if case == "zip_bomb_2GiB":
        return str(hostile.zip_bomb_checkpoint(folder / "bomb.pth")), {}
    if case == "declared_storage_1TiB":
        pickled = hostile.torch_pickle(hostile.declared_state(1 << 38))
        return str(hostile.torch_zip(folder / "declared.pth", pickled,
                                     [hostile.stored("archive/data/0", bytes(64))])), {}
    if case == "oversize_path_1.5GiB":
        return str(hostile.sparse_checkpoint(folder / "big.pth")), {"PFCAM_MAX_BYTES": str(1 << 20)}
    if case == "oversize_safetensors_1.5GiB":
        return str(hostile.sparse_safetensors(folder / "big.safetensors")), {"PFCAM_MAX_BYTES": str(1 << 20)}
    if case == "os_system_payload":
        path = folder / "evil.pth"
        torch.save({"state_dict": _demo_state(), "hook": hostile.ShellPayload(folder / "ran")}, path)
        return str(path), {}
    if case.endswith("_weight"):
        state = _demo_state()
        key = "layer1.0.conv_block.0.weight"
        kind = case[: -len("_weight")]
        value = state[key].clone()
        if kind == "nan":
            value.view(-1)[3] = float("nan")
        else:
            value = value.to({"int": torch.int64, "bool": torch.bool, "complex": torch.complex64}[kind])
        state[key] = value
        torch.save(state, folder / f"{kind}.pth")
        return str(folder / f"{kind}.pth"), {}
    if case == "float_tiff_8000px":
        return str(hostile.float_tiff(folder / "float.tif")), {}
    if case == "animated_gif":
        frames = [Image.new("RGB", (64, 64), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
        frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
        return str(folder / "anim.gif"), {}
    if case == "gif_header_bomb":
        return str(hostile.gif_header_bomb(folder / "bomb.gif")), {}
    raise ValueError(case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose pfnet/cams are measured")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    print(f"code: {args.root}\n")
    print("| case | outcome | seconds | peak RSS growth (MB) |\n|---|---|---|---|")
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="pfcam-hostile-") as folder:
            path, env = make(case, Path(folder))
            kind = "image" if case in IMAGE_CASES else "checkpoint"
            try:
                report = hostile.measure_load(kind, path, env, root=args.root)
            except RuntimeError as error:
                print(f"| {case} | {error} | | |")
                continue
            outcome = report["outcome"].replace("|", "/").replace("\n", " ")[:300]
            if case == "os_system_payload":
                outcome += f" [payload ran: {(Path(folder) / 'ran').exists()}]"
            print(f"| {case} | {outcome} | {report['seconds']:.3f} | {report['peak_growth_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
