"""Process trees of loopback deployments (coordinator, `pollinate join` and their Flower children), for the fault
experiments and the deploy tests: list, freeze-and-kill, stop, and find the ClientApps a round started."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil


class ProcessTreeError(RuntimeError):
    """A process survived SIGKILL."""


def process_tree(root: int | psutil.Process) -> list[psutil.Process]:
    """``root`` and all its descendants; empty when it has exited (a psutil.Process knows its start time, so a
    reused pid is not mistaken for it)."""
    try:
        proc = root if isinstance(root, psutil.Process) else psutil.Process(root)
        return [proc, *proc.children(recursive=True)] if proc.is_running() else []
    except psutil.NoSuchProcess:
        return []


def kill_tree(root: int | psutil.Process) -> list[int]:
    """SIGKILL ``root`` and every descendant, frozen first (SIGSTOP, top down) so none can start a child unseen;
    returns the killed pids once they are gone."""
    frozen: dict[int, psutil.Process] = {}
    while new := [p for p in process_tree(root) if p.pid not in frozen]:
        for proc in new:
            frozen[proc.pid] = proc
            try:
                proc.suspend()
            except psutil.NoSuchProcess:
                pass
    for proc in frozen.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(frozen.values()), timeout=15)
    if alive := [p for p in alive if is_alive(p)]:
        raise ProcessTreeError(f"processes {[p.pid for p in alive]} survived SIGKILL")
    return sorted(frozen)


def stop_tree(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM a running child (``pollinate`` stops its own children on it), then SIGKILL whatever is left of the
    tree it had."""
    tree = process_tree(proc.pid)  # not reaped yet, so the pid is still this child's
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    for member in tree:
        kill_tree(member)


def is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def flower_command(proc: psutil.Process) -> str:
    """The Flower executable a process runs (``flwr-clientapp``, ...), else its name."""
    try:
        return next((Path(arg).name for arg in proc.cmdline()[:2] if "flwr" in arg or "flower" in arg), proc.name())
    except psutil.Error:
        return "?"


def started_at(proc: psutil.Process) -> float:
    """When ``proc`` started, in epoch seconds to the clock tick. ``Process.create_time`` adds the start (ticks since
    boot) to the boot time in whole seconds (/proc/stat's btime), so it can read up to 1 s early: a ClientApp started
    just after a round was recorded would look older than the record."""
    boot = getattr(time, "CLOCK_BOOTTIME", None)
    if boot is None:  # not Linux: psutil's value is all there is
        return proc.create_time()
    return proc.create_time() - psutil.boot_time() + (time.time() - time.clock_gettime(boot))


def clientapps_since(pid: int, since: float) -> list[psutil.Process]:
    """Flower ClientApp processes under ``pid`` started after ``since`` (epoch seconds): a message being trained."""
    found = []
    for proc in process_tree(pid)[1:]:
        try:
            if "flwr-clientapp" in " ".join(proc.cmdline()) and started_at(proc) > since:
                found.append(proc)
        except psutil.Error:  # exited (or a zombie) while we looked
            pass
    return found
