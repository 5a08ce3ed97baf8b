"""Ray for the commands that scale out (``--engine ray``): whether Ray is installed, joining a cluster or starting
a local runtime, the actor pool's shape, and the command-line options those commands share.

Ray is optional (``requirements/ray.txt``, the ``ray`` extra); nothing here imports it before it is asked to.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np

ENGINES = ("local", "ray")
INSTALL_HINT = "pip install -r requirements/ray.txt (or pip install 'pfcam[ray]')"
_RAISED = re.compile(r"^((?:\w+\.)*\w+(?:Error|Exception)): (.*)$")  # "module.Error: message" in a traceback
COLUMN = "payload"  # the engines' Ray Data rows: one pickled value each (between their own processes only)


class RayUnavailable(RuntimeError):
    """``--engine ray`` asked for where Ray is not installed."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run goes.

    ``address``: a running cluster (``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:10001"``); None starts a local
    runtime sized to this machine (and stops it afterwards). ``workers``: actors in the pool that runs the
    models (None: as many as the cluster's GPUs allow with ``gpus_per_worker``, else one per two CPUs).
    ``gpus_per_worker``: GPUs each actor holds (fractions share a GPU); 0 runs the models on CPUs.
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or int(self.workers) != self.workers
                                         or self.workers < 1):
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if not float(self.gpus_per_worker) >= 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker!r}")


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or ``RayUnavailable`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the engines run on Ray Data)
    except ImportError as exc:
        raise RayUnavailable(f"--engine ray needs Ray (Ray Data), which is not installed here ({exc}); "
                             f"install it with: {INSTALL_HINT}") from None
    return ray


def check_engine(engine: str, error: type[Exception]) -> None:
    """Raise ``error`` for an unknown engine, or for ``"ray"`` where Ray is missing (saying how to install it)."""
    if engine not in ENGINES:
        raise error(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "ray":
        try:
            require_ray()
        except RayUnavailable as exc:
            raise error(str(exc)) from None


def project_root() -> Path | None:
    """The checkout this code runs from (the folder holding ``cams``), or None when pfcam is installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def init_ray(options: RayOptions) -> Any:
    """Join ``options.address`` or start a local runtime; Ray's own chatter kept to errors. From a checkout,
    the workers import pfcam from the same folder (a cluster's nodes need it at that path, or pfcam installed)."""
    ray = require_ray()
    env: dict[str, str] = {}
    root = project_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    ray.init(address=options.address, include_dashboard=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": env} if env else None)
    quiet_ray_data()
    return ray


def quiet_ray_data() -> None:
    """No Ray Data progress bars or start-up lines: the commands draw their own progress."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


@contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Ray, connected for the block: the caller's connection when there is one, else ours, shut down after. A
    local runtime we start is watched by :mod:`cams.ray_reaper`: killed with this process, its processes go too."""
    ray = require_ray()
    if ray.is_initialized():
        quiet_ray_data()
        yield ray
        return
    reaper = start_reaper() if options.address is None else None
    try:
        init_ray(options)
        yield ray
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.kill()  # Ray is down: nothing left to reap
            reaper.wait()


def start_reaper() -> subprocess.Popen | None:
    """:mod:`cams.ray_reaper` watching this process, in a session of its own (a signal to this process's group
    does not reach it); None where it cannot start (then Ray's own clean-up is all there is)."""
    script = Path(__file__).with_name("ray_reaper.py")
    try:
        return subprocess.Popen([sys.executable, str(script), str(os.getpid())], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


class Shared:
    """A value put once into Ray's object store (by the driver, which owns it for the run) and handed to actors
    by reference: each actor fetches it once, again after a restart on another node."""

    def __init__(self, value: Any):
        import ray

        self.refs = [ray.put(value)]  # in a list: Ray hands it over as a reference, not as a resolved argument

    def get(self) -> Any:
        import ray

        return ray.get(self.refs[0])


def pool_arguments(options: RayOptions) -> dict[str, Any]:
    """``map_batches`` arguments for the actor pool that runs the models: its size (it shrinks to what is left
    when nodes go, and grows back), and each actor's CPU and GPUs. Needs a connected Ray."""
    import ray
    from ray.data import ActorPoolStrategy

    resources = ray.cluster_resources()
    gpus = float(options.gpus_per_worker)
    if options.workers is not None:
        workers = int(options.workers)
    elif gpus > 0:
        workers = max(1, int(resources.get("GPU", 0) // gpus))
    else:
        workers = max(1, int(resources.get("CPU", 1)) // 2)
    arguments: dict[str, Any] = {"compute": ActorPoolStrategy(min_size=1, max_size=workers), "num_cpus": 1}
    if gpus > 0:
        arguments["num_gpus"] = gpus
    return arguments


def worker_device() -> str:
    """Where an actor runs its models: the GPU Ray gave it, else the CPU."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def to_column(values: Sequence[Any]) -> dict[str, np.ndarray]:
    """A Ray Data batch of one row per value."""
    column = np.empty(len(values), dtype=object)
    column[:] = [pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL) for value in values]
    return {COLUMN: column}


def from_column(batch: dict[str, np.ndarray]) -> list[Any]:
    """The values of a batch made by :func:`to_column`."""
    return [pickle.loads(data) for data in batch[COLUMN]]


def dataset_of(values: Sequence[Any], blocks: int) -> Any:
    """A Ray Data dataset of one row per value, in about ``blocks`` blocks (the units retried alone)."""
    import ray.data

    return ray.data.from_items([{COLUMN: data} for data in to_column(values)[COLUMN]],
                               override_num_blocks=max(1, min(len(values), blocks)))


def results_of(dataset: Any) -> Iterator[Any]:
    """The values a dataset's last stage returned (through :func:`to_column`), as they come."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield from from_column(batch)


def failure_message(exc: BaseException) -> str:
    """What went wrong in a failed Ray run, in one line: the worker's own exception where Ray kept it, else the
    worker's exception line in Ray's report (Ray Data keeps the text of a task's error, not the error)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    if cause is not None and not type(cause).__module__.startswith("ray"):
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    raised = [match for match in map(_RAISED.match, lines) if match and not match.group(1).startswith("ray.")]
    if raised:
        return f"{raised[-1].group(1).rsplit('.', 1)[-1]}: {raised[-1].group(2)}"
    return lines[-1] if lines else type(exc).__name__


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--ray-address``, ``--workers``, ``--gpus-per-worker``."""
    group = parser.add_argument_group("scale-out (Ray)")
    group.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: this process (default); ray: a Ray cluster through Ray Data "
                            f"(needs Ray: {INSTALL_HINT})")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="with --engine ray: the cluster to join ('auto', HOST:PORT or ray://HOST:10001); "
                            "default: start a local Ray runtime sized to this machine")
    group.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="with --engine ray: actors running the models (default: one per --gpus-per-worker "
                            "GPUs, else one per two CPUs)")
    group.add_argument("--gpus-per-worker", type=_non_negative, default=0.0, metavar="G",
                       help="with --engine ray: GPUs per actor, fractions share one (default 0: CPUs)")


def ray_options(args: argparse.Namespace) -> RayOptions:
    return RayOptions(args.ray_address, args.workers, args.gpus_per_worker)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
