"""What a job runs on besides the model: torch's threads, and the interpreter's switch interval."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """The GIL's switch interval set for the block (see lib/job.py)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@contextlib.contextmanager
def torch_threads(requested: int | None) -> Iterator[None]:
    """torch's threads set for the job, and the caller's own setting back after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads(requested))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def threads(requested: int | None) -> int:
    """runtime.threads, else OMP_NUM_THREADS (torchrun sets it), else the cores this process
    may use over the ranks on this host."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
