"""The bench's /proc readers (bench/proc.py), on this very process."""

from __future__ import annotations

import os
import sys

import pytest

from bench.proc import cpu_seconds, peak_rss_mb, rss_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_this_process_has_a_resident_set_a_peak_and_cpu_time() -> None:
    now, peak, cpu = rss_mb(os.getpid()), peak_rss_mb(os.getpid()), cpu_seconds(os.getpid())
    assert now is not None and peak is not None and cpu is not None
    assert 0 < now <= peak
    assert cpu > 0


def test_a_process_that_is_gone_gives_none() -> None:
    gone = 2**22 + 1  # above the largest pid_max Linux allows: never a live process
    assert rss_mb(gone) is None and peak_rss_mb(gone) is None and cpu_seconds(gone) is None
