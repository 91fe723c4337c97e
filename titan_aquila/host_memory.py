"""Host memory that the C allocator keeps after PyTorch has freed it (training.return_freed_host_memory).

PyTorch's CPU tensors come from malloc. glibc serves a block below its mmap threshold from a heap, and returns
freed heap memory to the operating system only from the heap's top; the threshold starts at 128 KiB but rises, up
to 32 MiB, to the size of each mmapped block that is freed. After the first large tensor is freed, the per-block
weights, all-gathered shards and activations of an FSDP run all land in the heap, and the holes they leave stay
resident. Measured here on a 2-rank FSDP2 growth + audit + 2 AdamW steps of SmolLM2 (zero depth 30 -> 34): the
audit left 2.0 GiB resident per rank of which 1.25 GiB was free heap (malloc_trim gave it back), and the run's peak
was 3.10 GiB per rank; with the fixed thresholds below, 1.87 GiB (the 0.8B run of the README: 3.98 instead of
4.85-5.16 GiB). The price is the system time of a page fault per fresh page of every block >= 128 KiB, so it grows
with how much a run allocates: ~20% of the step time of one CPU process training a dim-512 model, 44% of the 0.8B
run's wall time while its growth still drew a real random tensor per layer per pass (nothing for a GPU's tensors,
which do not come from malloc).

    mallopt(M_MMAP_THRESHOLD, 128 KiB)   fixed: every block >= 128 KiB gets its own pages, unmapped when freed
    mallopt(M_TRIM_THRESHOLD, 1 MiB)     fixed: the heap's free top is returned once it exceeds 1 MiB
"""

from __future__ import annotations

import ctypes
import ctypes.util

from titan_aquila.errors import UserError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 128 << 10, 1 << 20


def glibc_function(name: str):
    """The C library's `name` (mallopt, malloc_trim) through ctypes, or None where it has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError, TypeError):
        return None


def return_freed_memory_to_os() -> str:
    """Fix glibc's malloc thresholds as above; returns the start-up line. Not glibc (no mallopt): a UserError."""
    mallopt = glibc_function("mallopt")
    if mallopt is None:
        raise UserError("training.return_freed_host_memory = true needs glibc's mallopt (Linux with glibc); this C "
                        "library has none: set it to false")
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        raise UserError("training.return_freed_host_memory: glibc's mallopt refused the thresholds")
    return (f"[memory] host blocks >= {MMAP_THRESHOLD_BYTES >> 10} KiB are mmapped and returned to the OS when freed; "
            f"heap trimmed above {TRIM_THRESHOLD_BYTES >> 20} MiB (training.return_freed_host_memory)")
