"""RAM sample integrity: after a VM is stopped, hash pages spread over each RAM memfd; after the
kexec, hash the same pages of the retrieved memfd before QEMU starts and refuse on a mismatch.

One random page per stratum (the memfd cut into equal slices), so every part of guest RAM is
sampled and no fixed offset can be relied upon to escape the check."""

from __future__ import annotations

import hashlib
import os
import secrets
import time

from luoagent.errors import RestoreError

PAGE = 4096
#: pages per sample: one per 16 MiB (64 per GiB), at least 64, at most 4096
PER_BYTES, MIN_PAGES, MAX_PAGES = 16 << 20, 64, 4096


def offsets(size: int, rng: secrets.SystemRandom | None = None) -> list[int]:
    """Page-aligned offsets, one random page inside each of N equal strata of ``size``."""
    pages = size // PAGE
    if pages <= 0:
        return []
    n = min(pages, max(MIN_PAGES, min(MAX_PAGES, size // PER_BYTES)))
    rng = rng or secrets.SystemRandom()
    out = []
    for i in range(n):
        lo, hi = i * pages // n, (i + 1) * pages // n
        out.append(rng.randrange(lo, max(hi, lo + 1)) * PAGE)
    return out


def digest(fd: int, offs: list[int]) -> str:
    h = hashlib.sha256()
    for off in offs:
        page = os.pread(fd, PAGE, off)
        h.update(page + b"\0" * (PAGE - len(page)))  # a hole past EOF reads short; count it as zeros
    return h.hexdigest()


def take(fd: int, size: int) -> tuple[dict, float]:
    """(sample record for the manifest, seconds it took)."""
    t0 = time.perf_counter()
    offs = offsets(size)
    record = {"page_size": PAGE, "offsets": offs, "sha256": digest(fd, offs)}
    return record, time.perf_counter() - t0


def verify(backend_id: str, fd: int, record: dict) -> float:
    """Seconds spent; RestoreError naming the pages that differ if the sample does not match."""
    t0 = time.perf_counter()
    offs = [int(o) for o in record["offsets"]]
    if digest(fd, offs) != record["sha256"]:
        raise RestoreError(
            f"RAM backend {backend_id}: the sampled pages ({len(offs)} of 4 KiB spread over the memfd) do not "
            "match the hash taken after the VM stopped: guest RAM changed across the kexec. QEMU was not started "
            "for this VM"
        )
    return time.perf_counter() - t0


def ms_per_gib(seconds: float, size: int) -> float:
    return seconds * 1000 / max(size / (1 << 30), 1e-9)
