"""Peak memory as a run reports it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from safe_llm.core import memory


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM is Linux's")
def test_a_process_started_by_a_large_parent_reports_its_own_peak():
    ballast = torch.ones(2**27)  # 0.5 GiB resident in this (parent) process
    assert memory.process_peak_bytes() > ballast.nbytes
    code = "from safe_llm.core.memory import process_peak_bytes as p; print(p())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # ru_maxrss would report the parent's resident memory at fork time: above 0.5 GiB
    assert int(child.stdout) < ballast.nbytes


@pytest.mark.skipif(sys.platform != "linux", reason="samples /proc/self/statm")
def test_a_stage_reports_a_peak_reached_inside_it():
    import time

    peaks = memory.StagePeaks(torch.device("cpu"), interval=0.005)
    with peaks.stage("small"):
        pass
    with peaks.stage("big"):
        block = torch.ones(2**26)  # 256 MiB, touched
        time.sleep(0.1)  # held for many sampling intervals
        del block
    assert peaks.bytes["big"] >= peaks.bytes["small"] + 200 * 2**20
    assert list(peaks.to_dict()) == ["small", "big"]


def test_the_mmap_threshold_is_set_inside_its_scope_only_and_scopes_nest():
    import sys

    assert memory.mmap_threshold() is None
    with memory.large_buffers_from_mmap() as took:
        assert took is (sys.platform == "linux")  # glibc's mallopt is there to take it
        assert memory.mmap_threshold() == memory.MMAP_THRESHOLD_BYTES
        with memory.large_buffers_from_mmap(128 * 2**10):
            assert memory.mmap_threshold() == 128 * 2**10
        assert memory.mmap_threshold() == memory.MMAP_THRESHOLD_BYTES
    assert memory.mmap_threshold() is None
