"""The local Ray runtime does not outlive the pfcam process that started it (issue #26).

Ray's local runtime (GCS, raylet, dashboard and runtime-env agents, workers) runs in processes of its own; when
its driver is killed outright (SIGKILL, the OOM killer) nothing calls ``ray.shutdown`` and some of them (the
dashboard and runtime-env agents) kept running. :func:`cams.ray_runtime.ray_session` starts this script beside a
local runtime, in a session of its own: it notes the driver's descendants (Ray's processes) every half second,
and when the driver is gone it kills those and theirs, and any process whose command line names the runtime's
session folder (one started between two looks), then exits. A driver that shuts Ray down stops it first.

Run as a script (``python cams/ray_reaper.py DRIVER_PID``): it imports only psutil, not pfcam or torch.
"""
from __future__ import annotations

import os
import re
import sys
import time

import psutil

POLL_S = 0.5
# A local Ray runtime's session folder, named in the command line of each process it starts (until a worker renames
# itself ray::...): how a process started between two polls, and orphaned when its raylet died, is still found.
SESSION = re.compile(r"/[^\s=,]*/session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+")


def descendants(pid: int) -> dict[int, float]:
    """The processes below ``pid`` (none when it is gone), as pid -> start time (a pid may be reused later)."""
    found: dict[int, float] = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return found


def sessions(pids) -> set[str]:
    """The Ray session folders named in these processes' command lines."""
    found: set[str] = set()
    for pid in pids:
        try:
            found.update(SESSION.findall(" ".join(psutil.Process(pid).cmdline())))
        except psutil.Error:
            continue
    return found


def in_sessions(folders: set[str]) -> dict[int, psutil.Process]:
    """Every process whose command line names one of these session folders."""
    found: dict[int, psutil.Process] = {}
    if not folders:
        return found
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info.get("cmdline") or ())
        if any(folder in command for folder in folders):
            found[process.pid] = process
    return found


def reap(seen: dict[int, float], folders: set[str] = frozenset()) -> None:
    """Kill the processes of ``seen`` that still run (the same processes: same pid and start time), everything
    below them and every process of the runtime's session folders (SIGKILL: their driver is already dead)."""
    victims: dict[int, psutil.Process] = {}
    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() != started:
                continue  # another process has the pid now
            victims[pid] = process
            victims.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:
            continue
    victims.update(in_sessions(set(folders)))
    victims.pop(os.getpid(), None)
    for process in victims.values():
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)


def watch(driver: int) -> None:
    """Note the driver's descendants (the latest view) until it is gone, then reap them."""
    seen: dict[int, float] = {}
    folders: set[str] = set()
    try:
        process = psutil.Process(driver)
        while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            now = descendants(driver)
            folders |= sessions(pid for pid in now if pid not in seen)
            seen = now or seen
            time.sleep(POLL_S)
    except psutil.Error:
        pass
    reap(seen, folders)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
