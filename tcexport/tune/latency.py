"""Latency budgets, measured: the compressed plan timed interleaved with the uncompressed model (bench's loop),
on this machine's ONNX Runtime CPU, one plan at a time so the numbers stay comparable.

The ratio a plan is judged by is conservative: per pair of rounds (both models run in each, so drift cancels)
the compressed latency over the uncompressed one, and of those the upper quartile, not the median. A plan that
meets the budget this way meets it in three pairs of four, so a later `tcexport bench` of the same two models on
a noisy machine still shows the speedup the budget asks for. Pairs, not single rounds: bench's rounds alternate
the order (b c, c b, b c, ...), so within one round one model runs right after itself (caches warm) and the
other right after the other model; a pair of rounds holds one run of each kind for both."""

from __future__ import annotations

import numpy as np
import onnx

from tcexport.bench.timing import OrtRunner, time_interleaved
from tcexport.tune import objective

WARMUP = 5
ITERS = 30
UPPER_QUARTILE = 75


class LatencyMeter:
    def __init__(self, model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int | None = None,
                 iters: int = ITERS):
        self.feed, self.threads, self.iters = feed, threads, iters
        self.base = OrtRunner("uncompressed", objective.session(model, threads))

    def ratio(self, compressed: onnx.ModelProto) -> float:
        """Upper quartile over rounds of compressed / uncompressed latency (see the module doc)."""
        runner = OrtRunner("compressed", objective.session(compressed, self.threads))
        names = [i.name for i in runner.session.get_inputs()]
        feed = {k: v for k, v in self.feed.items() if k in names}
        timing = time_interleaved([self.base, runner], [feed, feed], WARMUP, self.iters)
        return round_ratio_quartile(*timing.latencies_ns)


def round_ratio_quartile(base_ns, compressed_ns, period: int = 2) -> float:
    """75th percentile over consecutive windows of `period` rounds (the order's rotation period) of
    sum(compressed) / sum(uncompressed); rounds are aligned by index, a trailing partial window is left out."""
    base, compressed = np.asarray(base_ns, dtype=float), np.asarray(compressed_ns, dtype=float)
    windows = max(1, len(base) // period)
    ratios = [compressed[k * period:(k + 1) * period].sum() / base[k * period:(k + 1) * period].sum()
              for k in range(windows)]
    return float(np.percentile(ratios, UPPER_QUARTILE))
