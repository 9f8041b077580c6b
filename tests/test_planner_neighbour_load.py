"""`pdserve plan calibrate --neighbour-load`: a real engine process decodes on the other core while
the calibration runs, and is gone after it."""

from __future__ import annotations

import argparse
import os
import time

import psutil
import pytest

from pdserve.planner.calibrate.command import add_calibrate_arguments, run_calibrate
from pdserve.planner.calibrate.neighbour_load import NeighbourLoad

needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a second core")


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "neighbour_load" in " ".join(p.cmdline())]


@needs_two_cores
def test_the_neighbour_decodes_on_its_own_core_and_stops() -> None:
    core = sorted(os.sched_getaffinity(0))[-1]
    with NeighbourLoad([core], model=None, dtype="auto", batch=2) as load:
        (child,) = _children()
        assert child.cpu_affinity() == [core]
        child.cpu_percent(None)
        time.sleep(1.0)
        assert child.cpu_percent(None) > 50, "the neighbour is not busy"
        assert load.describe() == f"an engine decoding a batch on core(s) {core}"
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert _children() == []


def test_a_neighbour_needs_a_core() -> None:
    with pytest.raises(ValueError, match="at least one core"):
        NeighbourLoad([], model=None, dtype="auto")


def test_calibrate_refuses_a_neighbour_load_without_a_spare_core(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    args = parser.parse_args(["--threads", str(len(os.sched_getaffinity(0))), "--neighbour-load"])
    affinity = os.sched_getaffinity(0)
    try:
        assert run_calibrate(args) == 2
    finally:
        os.sched_setaffinity(0, affinity)  # run_calibrate pins this process before it checks
    assert "needs a core that is not calibrated" in capsys.readouterr().err
