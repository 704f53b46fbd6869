"""Which way of multiplying a matrix decodes fastest on this CPU: measured, kept on disk.

What is fastest differs between Intel and AMD, between AVX-512 and AVX2, by shape, density and
thread count, so ``load_sparse``'s ``auto`` measures, for the first matrix of each kind (shape,
pattern, density to 0.05, dtype, threads), one decode product ``[1, in] @ W.T`` on every
compiled path this CPU runs and with a dense weight (``F.linear``), and keeps the fastest. The
figures go to ``$SAFE_LLM_CACHE/kernel-timings/<cpu>-<build>.json`` (one file per CPU model,
torch capability and kernel build), so a second load on the same machine measures nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safe_llm.core.atomic import atomic_write
from safe_llm.core.precision import cpu_capability
from safe_llm.inference import kernel
from safe_llm.inference.format import CompressedMatrix
from safe_llm.io.models import cache_dir

log = logging.getLogger(__name__)

DENSE = "dense"
PAY_MARGIN = 0.95  # a kernel path is taken only at most at 95% of dense's time
MEASURE_BYTES = 96 << 20  # dense bytes a round streams: above a CPU's last-level cache
MAX_COPIES = 256  # (tiny matrices: the per-call cost dominates anyway)
ROUNDS = 5


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def timings_file() -> Path:
    """The timing cache of this CPU model, torch capability and kernel build."""
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", f"{cpu_name()}-{cpu_capability()}").strip("-")
    return cache_dir() / "kernel-timings" / f"{cpu}-{kernel.build_id()}.json"


def matrix_key(matrix: CompressedMatrix, threads: int) -> str:
    """What the timing of a decode product depends on."""
    out, width = matrix.shape
    density = round(matrix.density * 20) / 20
    dtype = str(matrix.dtype).removeprefix("torch.")
    return f"{out}x{width} {matrix.kind} d{density:.2f} {dtype} t{threads}"


def _copies(matrix: CompressedMatrix) -> list[CompressedMatrix]:
    dense_bytes = matrix.shape[0] * matrix.shape[1] * matrix.values.element_size()
    count = min(MAX_COPIES, max(1, -(-MEASURE_BYTES // dense_bytes)))
    fields = ("values", "mask", "tile_offsets")
    return [
        dataclasses.replace(matrix, **{k: getattr(matrix, k).clone() for k in fields})
        for _ in range(count)
    ]


def measure(matrix: CompressedMatrix, paths: list[str]) -> dict[str, float]:
    """Seconds of one decode product ``[1, in] @ W.T`` on each of ``paths`` and with a dense
    weight (key :data:`DENSE`). As in decoding, where every weight comes from memory once per
    token, each round runs through enough copies to exceed the last-level cache; the variants
    are interleaved over :data:`ROUNDS` rounds and their medians kept, so that the ratios
    survive a loaded machine."""
    copies = _copies(matrix)
    x = torch.randn(1, matrix.shape[1], dtype=matrix.dtype)
    products = {path: [kernel.decoder(c, path) for c in copies] for path in paths}
    weights = [torch.randn(matrix.shape, dtype=matrix.dtype) for _ in copies]
    products[DENSE] = [functools.partial(F.linear, weight=w) for w in weights]
    rounds: dict[str, list[float]] = {name: [] for name in products}
    with torch.inference_mode():
        for _ in range(ROUNDS + 1):  # the first round warms up
            for name, calls in products.items():
                start = time.perf_counter()
                for call in calls:
                    call(x)
                rounds[name].append((time.perf_counter() - start) / len(calls))
    return {name: statistics.median(times[1:]) for name, times in rounds.items()}


class TimingCache:
    """The measured seconds per matrix key, read once and written back atomically."""

    def __init__(self, path: Path | None = None):
        self.path = path or timings_file()
        try:
            self.entries: dict[str, dict[str, float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def timings(self, matrix: CompressedMatrix, paths: list[str]) -> tuple[dict, bool]:
        """``(seconds by path and dense, whether they were measured now)``."""
        key = matrix_key(matrix, torch.get_num_threads())
        known = self.entries.get(key, {})
        if all(p in known for p in [*paths, DENSE]):
            return known, False
        self.entries[key] = {**known, **measure(matrix, paths)}
        self._save()
        return self.entries[key], True

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.entries, indent=1, sort_keys=True)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        except OSError as exc:  # a read-only cache costs a measurement next time, no more
            log.warning("cannot save kernel timings to %s: %s", self.path, exc)


def candidate_paths(path: str) -> list[str]:
    """The compiled paths ``auto`` weighs (``scalar`` only where no SIMD path runs), or the
    one path asked for."""
    if path != "auto":
        return [path] if path != "torch" else []
    compiled = [p for p in kernel.cpu_paths() if p != "torch"]
    simd = [p for p in compiled if p != "scalar"]
    return simd or compiled


def fastest(timings: dict[str, float], paths: list[str]) -> str:
    """The fastest of ``paths`` when it takes at most :data:`PAY_MARGIN` of dense's time,
    else :data:`DENSE`."""
    if not paths:
        return DENSE
    best = min(paths, key=lambda p: timings[p])
    return best if timings[best] <= PAY_MARGIN * timings[DENSE] else DENSE
