"""Latency statistics of timed runs: trtexec-style percentiles, throughput, device times, speedups, noise warnings.

A result entry holds latency_ms (min, max, mean, median, p90, p95, p99, std of host wall time per run), the
throughput (timed runs over the wall-clock they held, not 1 / mean latency), one statistics dict per device
time a runner reports, and the speedup: the median latency of the first artifact at the same batch size divided
by this one's median. noise_warnings says when such numbers should not be trusted.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

PERCENTILES = {"p90": 90, "p95": 95, "p99": 99}
NOISY_P99_OVER_MEDIAN = 3.0  # a p99 beyond this many medians: the machine interfered, the numbers do not describe the model
# Device-time fields a runner may report, in table/report order. Each one is a latency_stats dict in a result.
DEVICE_FIELDS = ("gpu_compute_ms", "h2d_ms", "d2h_ms")


def latency_stats(latencies_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    stats = {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
    }
    for name, q in PERCENTILES.items():
        stats[name] = float(np.percentile(values, q))
    stats["std"] = float(values.std())
    return stats


def merge_device_stats(entry: dict, device_times: dict[str, Sequence[float]] | None) -> dict:
    """Add one latency_stats dict per device field to `entry`, next to its host latency_ms.

    Each field must hold exactly one time per timed run (entry["iters"]), so host and device statistics describe
    the same runs; a runner that reports fewer or more is a bug, not something to average over.
    """
    for name in DEVICE_FIELDS:
        values = (device_times or {}).get(name)
        if values is None:
            continue
        if len(values) != entry["iters"]:
            raise ValueError(f"{entry['artifact']}: {len(values)} {name} samples for {entry['iters']} timed runs "
                             f"at batch {entry['batch']}")
        entry[name] = latency_stats(values)
    return entry


def summarize(label: str, batch: int, latencies_ns: Sequence[int], wall_ns: int,
              device_times: dict[str, Sequence[float]] | None = None, warmup_runs: int | None = None) -> dict:
    """One result entry (speedup is filled in by add_speedups once every artifact at this batch is known).

    Throughput is timed runs over wall_ns, the wall-clock those runs held (see time_interleaved), not 1 / mean
    latency. device_times ({field: [ms per run]}) adds device statistics for runners that measure them.
    """
    if not latencies_ns:
        raise ValueError(f"{label}: no timed runs at batch {batch}")
    latency_ms = latency_stats(np.asarray(latencies_ns, dtype=np.float64) / 1e6)
    wall_s = wall_ns / 1e9
    runs_per_s = len(latencies_ns) / wall_s if wall_s > 0 else float("inf")
    entry = {
        "artifact": label,
        "batch": batch,
        "iters": len(latencies_ns),
        "warmup_runs": warmup_runs,
        "latency_ms": latency_ms,
        "wall_s": wall_s,
        "throughput_qps": runs_per_s,
        "throughput_samples_per_s": batch * runs_per_s,
        "speedup": None,
    }
    return merge_device_stats(entry, device_times)


def add_speedups(entries: list[dict]) -> list[dict]:
    """speedup = baseline median / own median, the baseline being the first entry seen at each batch size."""
    baseline_median: dict[int, float] = {}
    for entry in entries:
        baseline_median.setdefault(entry["batch"], entry["latency_ms"]["median"])
    for entry in entries:
        median = entry["latency_ms"]["median"]
        entry["speedup"] = baseline_median[entry["batch"]] / median if median > 0 else float("inf")
    return entries


def noise_warnings(entries: Sequence[dict]) -> list[str]:
    """Why some numbers should not be trusted: a long tail (p99 > 3x median), or too few runs for a percentile."""
    warnings = []
    for entry in entries:
        latency = entry["latency_ms"]
        if latency["median"] > 0 and latency["p99"] > NOISY_P99_OVER_MEDIAN * latency["median"]:
            warnings.append(f"{entry['artifact']} at batch {entry['batch']}: p99 {latency['p99']:.3g} ms is "
                            f"{latency['p99'] / latency['median']:.1f}x the median {latency['median']:.3g} ms: too "
                            "noisy to trust; stop other work on the machine, pin --threads, or time longer")
    fewest = min((e["iters"] for e in entries), default=0)
    short = [name for name, q in PERCENTILES.items() if fewest < runs_needed(q)]
    if short:
        need = runs_needed(PERCENTILES[short[-1]])
        warnings.append(f"{fewest} timed runs are too few for {', '.join(short)}: a {short[-1]} needs at least "
                        f"{need} runs to be more than the slowest run interpolated; use --iters {need} or more")
    return warnings


def runs_needed(percentile: float) -> int:
    """Runs for a percentile to rest on at least one run beyond it: p99 needs 100, p95 20, p90 10."""
    return math.ceil(100 / (100 - percentile))
