"""Runners and the interleaved timing loop: warm-up, then rounds of one run per runner in a rotating order.

A Runner is one loaded artifact that runs a feed (OrtRunner here; tcexport.backends.trt_engine.TrtRunner for engines,
which also records device times). time_interleaved warms each runner up (a run count or a time budget), then
times them in rounds: one run of each per round, in an order that rotates every round, so machine drift (thermal
throttling, a noisy neighbour) lands on all runners alike and none always runs first. It stops after a number of
rounds or a duration, and records each run's host latency and the wall-clock slice it held (for throughput).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from tcexport.bench.stats import DEVICE_FIELDS
from tcexport.core.errors import UsageError

DEFAULT_ITERS = 50
MIN_ROUNDS_WITH_DURATION = 3  # a duration budget still yields a few samples per artifact, even for slow models


class Runner(Protocol):
    """One loaded artifact that can be run on a feed.

    Optional extras, looked up with getattr so ONNX Runtime's runner needs none of them:
    stage(feeds) prepares runs on a feed outside the timed region (called before the warm-up of each batch);
    device_fields names the device times each run records (e.g. ("gpu_compute_ms",)), and pop_device_times()
    returns {field: [ms per run]} for the runs since the last call. TrtRunner provides all three.
    """

    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> object: ...


class OrtRunner:
    """An ONNX Runtime session. run() does nothing but session.run so the timed region holds only inference."""

    def __init__(self, name: str, session) -> None:
        self.name = name
        self.session = session

    def run(self, feeds: dict[str, np.ndarray]) -> object:
        try:
            return self.session.run(None, feeds)
        except Exception as exc:  # ORT raises its own pybind11 types; any of them means this feed cannot run
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UsageError(f"{self.name}: ONNX Runtime failed to run it: {first_line}") from None


def device_fields_of(runner: Runner) -> tuple[str, ...]:
    """The device times `runner` reports per run (none for ONNX Runtime)."""
    fields = tuple(getattr(runner, "device_fields", ()) or ())
    unknown = [f for f in fields if f not in DEVICE_FIELDS]
    if unknown:
        raise ValueError(f"{getattr(runner, 'name', runner)}: unknown device time fields {unknown}")
    return fields


def pop_device_times(runner: Runner) -> dict[str, list[float]]:
    """Device times recorded by `runner` since the last call, limited to its declared fields ({} when none)."""
    fields = device_fields_of(runner)
    if not fields:
        return {}
    recorded = runner.pop_device_times()  # type: ignore[attr-defined]
    return {f: list(recorded.get(f, [])) for f in fields}


def round_order(n_artifacts: int, round_index: int) -> list[int]:
    """Artifact indices for one round, rotated by the round number so each artifact leads equally often."""
    return [(round_index + k) % n_artifacts for k in range(n_artifacts)]


@dataclass
class Timing:
    """What one interleaved timing produced, per runner (in the runners' order)."""

    latencies_ns: list[list[int]]  # each timed run, start to end
    wall_ns: list[int]  # the wall-clock each runner held: from each of its runs' start to the next run's start
    warmup_runs: list[int]  # warm-up runs done (a --warmup-ms budget turns into a count)


def warm_up(runner: Runner, feed: dict, runs: int, ms: float | None = None) -> int:
    """Run `runs` times, or for at least `ms` milliseconds (and at least once) when ms is given; return the count."""
    if ms is None:
        for _ in range(runs):
            runner.run(feed)
        return runs
    done, deadline = 0, time.perf_counter_ns() + int(ms * 1e6)
    while done == 0 or time.perf_counter_ns() < deadline:
        runner.run(feed)
        done += 1
    return done


def time_interleaved(runners: Sequence[Runner], feeds: Sequence[dict], warmup: int, iters: int | None = None,
                     duration: float | None = None, on_round: Callable[[int], None] | None = None,
                     warmup_ms: float | None = None) -> Timing:
    """Time the runners in rotating rounds. Stops after `iters` rounds, or once `duration` seconds of rounds (after
    warm-up) have passed and at least MIN_ROUNDS_WITH_DURATION rounds are done. on_round(runs) is called after
    every round, outside the timed region.

    Each run's wall-clock slice lasts from its start to the start of the next run (the last of a round: to the
    round's end), so the slices hold the loop's own overhead too and add up to the timed wall-clock, less the
    pauses between rounds where the progress bar is drawn: throughput comes from them, as trtexec's comes from
    the host wall time of its runs.
    """
    if iters is None and duration is None:
        iters = DEFAULT_ITERS
    warmup_runs = []
    for runner, feed in zip(runners, feeds):
        stage = getattr(runner, "stage", None)
        if stage is not None:
            stage(feed)
        warmup_runs.append(warm_up(runner, feed, warmup, warmup_ms))
        pop_device_times(runner)  # warm-up runs are not samples
    latencies_ns: list[list[int]] = [[] for _ in runners]
    wall_ns = [0] * len(runners)
    deadline_ns = None if duration is None else time.perf_counter_ns() + int(duration * 1e9)
    round_index = 0
    while True:
        if deadline_ns is None:
            if round_index >= iters:
                break
        elif round_index >= MIN_ROUNDS_WITH_DURATION and time.perf_counter_ns() >= deadline_ns:
            break
        previous = None  # (runner index, its start) of the run before this one in the round
        for i in round_order(len(runners), round_index):
            runner, feed = runners[i], feeds[i]
            start = time.perf_counter_ns()
            if previous is not None:
                wall_ns[previous[0]] += start - previous[1]
            runner.run(feed)
            latencies_ns[i].append(time.perf_counter_ns() - start)
            previous = (i, start)
        wall_ns[previous[0]] += time.perf_counter_ns() - previous[1]
        round_index += 1
        if on_round is not None:
            on_round(len(runners))
    return Timing(latencies_ns, wall_ns, warmup_runs)
