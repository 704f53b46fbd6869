"""Peak memory per stage of a run (load, calibration, evaluation, pruning, ...).

On CUDA the peak is torch's allocator peak, reset at each stage. On a CPU it is the process's
resident set size, sampled every ``interval`` seconds by a background thread (Linux
``/proc/self/statm``) and bounded below by the process's peak so far when a stage ends
within one sample; the process-wide peak (``getrusage``) is never reset, so ``time -v``
still reports the whole run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_STATM = Path("/proc/self/statm")


def resident_bytes() -> int | None:
    """The process's current resident set size, or None where ``/proc`` is missing."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_STATUS = Path("/proc/self/status")


def process_peak_bytes() -> int:
    """The process's peak resident set size so far.

    Linux's ``VmHWM`` where there is one: ``getrusage``'s ``ru_maxrss`` also counts the
    resident memory of the parent a process was forked from (the pre-exec copy), so a run
    started by a large Python process (a benchmark driver) reported the driver's peak.
    """
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _mallopt():
    """glibc's ``mallopt``, or None on other C libraries."""
    return getattr(_libc(), "mallopt", None)


# What a scope leaves behind: the ceiling of glibc's own dynamic threshold on 64-bit (it starts
# at 128 KiB and rises to the size of the largest mapped buffer freed, up to this). Left at
# 128 KiB, fixed, every later buffer above it (a decode step's logits, its activations) was
# mapped and unmapped at each use: SmolLM2 decoded 8-17% slower after load_sparse than
# transformers' own model.
AFTER_SCOPES_THRESHOLD_BYTES = 32 * 2**20
_thresholds: list[int] = []  # the thresholds set by the scopes now open, innermost last


def _set_mmap_threshold(threshold: int) -> bool:
    mallopt = _mallopt()
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1)


@contextmanager
def large_buffers_from_mmap(threshold: int = MMAP_THRESHOLD_BYTES) -> Iterator[bool]:
    """Have glibc serve every allocation of ``threshold`` bytes or more by ``mmap`` inside the
    ``with`` body; yields whether the setting took effect (glibc only).

    By default glibc raises its mmap threshold (up to 32 MB) after the first large buffers are
    freed, and from then on keeps freed activations, gradients and logit chunks in its heap:
    the resident memory of a SmolLM2 run rose by 0.2-0.45 GB over the model that way. Fixed at
    1 MB, a freed tensor goes back to the OS at once (measured: pruning-stage peak 1.46 ->
    1.30 GiB, evaluation 1.24 -> 1.18 GiB).

    Afterwards the threshold of the enclosing scope is set again, or outside every scope
    :data:`AFTER_SCOPES_THRESHOLD_BYTES`: glibc can neither report its threshold nor turn its
    dynamic adjustment back on once a threshold was set, so a library user gets the value that
    adjustment converges to, fixed."""
    took = _set_mmap_threshold(threshold)
    _thresholds.append(threshold)
    try:
        yield took
    finally:
        _thresholds.pop()
        if took:
            _set_mmap_threshold(_thresholds[-1] if _thresholds else AFTER_SCOPES_THRESHOLD_BYTES)


def mmap_threshold() -> int | None:
    """The threshold :func:`large_buffers_from_mmap` set for the scope now open, or None
    outside every such scope."""
    return _thresholds[-1] if _thresholds else None


MADV_DONTNEED = 4
_MAPS = Path("/proc/self/maps")


def drop_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the resident pages of ``tensor`` where it lies in a memory-mapped file (a tensor
    read from safetensors), keeping its contents; returns whether any were dropped.

    Every tensor of a safetensors file maps the file, and the pages read stay resident until
    the last tensor of that file is gone: a teacher's embeddings, replaced by the student's
    equal ones, would stay for the whole teacher phase. ``MADV_DONTNEED`` on whole pages of a
    file mapping drops them; touched again they are read from the file, with the same values
    (a model's frozen tensors are never written). Memory that is not file-mapped is left
    alone (there it would read back as zeros)."""
    madvise, page = getattr(_libc(), "madvise", None), os.sysconf("SC_PAGE_SIZE")
    storage = tensor.untyped_storage()
    start = -(-storage.data_ptr() // page) * page  # the whole pages inside the storage
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if madvise is None or tensor.device.type != "cpu" or end <= start:
        return False
    try:
        maps = _MAPS.read_text().splitlines()
    except OSError:
        return False
    for line in maps:
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= start and end <= high:
            if len(fields) < 6 or not fields[5].startswith("/"):
                return False  # anonymous memory
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            return madvise(start, end - start, MADV_DONTNEED) == 0
    return False


@functools.cache
def malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries (nothing to trim there)."""
    return getattr(_libc(), "malloc_trim", None)


def return_freed_memory() -> None:
    """Give freed heap memory back to the operating system.

    glibc keeps freed pages (tensors below its mmap threshold, a tokenizer's buffers) and
    reuses them only in part: a released streamed block, or the encodings of a 2 MB text
    (about 0.3 GB), would otherwise stay resident (measured in eval/stream_benchmark.py).
    """
    trim = malloc_trim()
    if trim is not None:
        trim(0)


class StagePeaks:
    """``with peaks.stage("load"): ...`` records each stage's peak memory in ``peaks.bytes``."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.bytes: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                self.bytes[name] = int(torch.cuda.max_memory_allocated(self.device))
            return
        sampler = _RSSSampler(self.interval)
        sampler.start()
        try:
            yield
        finally:
            self.bytes[name] = sampler.stop()

    def to_dict(self) -> dict[str, int]:
        return dict(self.bytes)


class _RSSSampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = resident_bytes() or 0
        self.before = process_peak_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, resident_bytes() or 0)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, resident_bytes() or 0)
        after = process_peak_bytes()
        # a new process-wide peak was reached inside this stage: it is this stage's peak
        return max(self.peak, after) if after > self.before else self.peak
