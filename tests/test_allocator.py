"""reuse_freed_memory: a step's freed memory is reused, not page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recoder_dist.training.allocator import _glibc

# Allocates and frees 64 MB (above glibc's largest adaptive mmap threshold, 32 MB), then
# allocates 32 MB, which fits in the freed block, and prints the page faults of that second
# allocation. A fresh process: the settings are process-wide, and this test session's own
# training runs have set them already.
PROGRAM = """
import contextlib, resource, torch
from recoder_dist.training.allocator import reuse_freed_memory
with reuse_freed_memory() if {keep} else contextlib.nullcontext():
    torch.empty(2**24).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**23).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_allocation_faults(keep: bool) -> int:
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(keep=keep)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 2**25 // 4096  # the second allocation: 8,192 pages of 4 KiB
    assert second_allocation_faults(keep=False) > pages // 2  # glibc's default: mapped afresh
    assert second_allocation_faults(keep=True) < pages // 16
