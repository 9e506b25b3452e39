"""The broker-restart scenario's figures, on recorded arrivals (no broker needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from chaos.broker import _figures, _first_after, _longest_silence, _Restart
from chaos.stack import Scene


def fake_scene(arrivals: list[tuple[float, str]], produced: list[str]) -> Scene:
    namespace = SimpleNamespace(arrivals=arrivals, produced=produced, topics={"input": "in"})
    return cast(Scene, namespace)


def test_first_after_per_partition_and_per_source() -> None:
    arrivals = [(9.0, "in/0/0"), (10.5, "in/0/1"), (11.0, "in/1/0"), (12.0, "in/0/1")]
    scene = fake_scene(arrivals, ["in/0/0", "in/0/1", "in/1/0"])
    assert _first_after(scene, 10.0, {"in/0/0", "in/0/1", "in/1/0"}) == {"in/0": 0.5, "in/1": 1.0}
    by_source = _first_after(scene, 10.0, {"in/0/1"}, by=lambda source: source)
    assert by_source == {"in/0/1": 0.5}  # its first output, not the later duplicate


def test_longest_silence_counts_the_window_edges_and_silent_partitions() -> None:
    arrivals = [(11.0, f"in/{p}/0") for p in range(4)] + [(13.0, "in/0/1"), (30.0, "in/1/1")]
    scene = fake_scene(arrivals, [])
    assert _longest_silence(scene, 10.0, 15.0) == pytest.approx(4.0)  # partitions 1-3: 11 -> 15
    assert _longest_silence(scene, 20.0, 25.0) == pytest.approx(5.0)  # nobody wrote: the window


def test_figures_per_restart() -> None:
    produced = [f"in/{p}/{o}" for p in range(4) for o in range(3)]
    arrivals = [(10.2, "in/0/0"), (10.4, "in/1/0"), (10.6, "in/2/0"), (10.8, "in/3/0")]
    arrivals += [(12.0, "in/0/1"), (14.0, "in/1/1"), (30.0, "in/0/1")]
    first = _Restart("SIGTERM", stopped=0.0, back=10.0, backlog={"in/0/1", "in/1/1"})
    second = _Restart("SIGKILL", stopped=16.0, back=26.0)
    figures = _figures(fake_scene(arrivals, produced), [first, second], load_end=31.0)
    assert figures["next_output_s"] == [0.2, 4.0]
    assert figures["every_partition_s"] == [0.8, 4.0]
    assert figures["backlog_drained_s"][0] == 4.0  # in/1/1's first output, not in/0/1's duplicate
    assert figures["longest_partition_silence_s"][0] == pytest.approx(5.4)  # in/2: 10.6 -> 16
