"""training.return_freed_host_memory: after glibc's dynamic mmap threshold has risen, freed 2 MiB tensors stay
resident (heap holes) by default and go back to the OS with the option. Each case in a fresh process: malloc's state
is per process and the thresholds cannot be unset."""

import ctypes.util
import subprocess
import sys

import pytest

from _util import ROOT

SCRIPT = r"""
import sys, torch
from titan_aquila.host_memory import return_freed_memory_to_os

def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1]) << 10

if sys.argv[1] == "on":
    print(return_freed_memory_to_os())
big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # a freed mmapped 16 MiB block: glibc's dynamic threshold rises to 16 MiB
freed, kept = [], []
for _ in range(200):
    freed.append(torch.ones(2 << 20, dtype=torch.uint8))  # 400 MiB in all, touched
    kept.append(torch.ones(64 << 10, dtype=torch.uint8))  # small blocks after each: holes, not a free heap top
before = rss()
del freed
print("released_mib", (before - rss()) >> 20)
"""


def released_mib(mode: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split("released_mib")[1]), p.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's malloc only")
def test_freed_tensors_return_to_the_os_only_with_the_option():
    off, _ = released_mib("off")
    on, out = released_mib("on")
    assert off < 64, f"default glibc returned {off} MiB of 400: the test no longer shows the heap holes"
    assert on > 380, f"with the option only {on} MiB of 400 came back"
    assert "[memory] host blocks >= 128 KiB are mmapped and returned to the OS when freed" in out
