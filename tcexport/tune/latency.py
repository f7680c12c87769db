"""Latency budgets, measured: the compressed plan timed interleaved with the uncompressed model (bench's loop),
on this machine's ONNX Runtime CPU, one plan at a time so the numbers stay comparable."""

from __future__ import annotations

import numpy as np
import onnx

from tcexport import bench
from tcexport.tune import objective

WARMUP = 5
ITERS = 30


class LatencyMeter:
    def __init__(self, model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int | None = None,
                 iters: int = ITERS):
        self.feed, self.threads, self.iters = feed, threads, iters
        self.base = bench.OrtRunner("uncompressed", objective.session(model, threads))

    def ratio(self, compressed: onnx.ModelProto) -> float:
        """Median latency of the compressed model over the uncompressed one's, in the same rounds."""
        runner = bench.OrtRunner("compressed", objective.session(compressed, self.threads))
        names = [i.name for i in runner.session.get_inputs()]
        feed = {k: v for k, v in self.feed.items() if k in names}
        timing = bench.time_interleaved([self.base, runner], [feed, feed], WARMUP, self.iters)
        base_ms, ours_ms = (bench.latency_stats(np.asarray(t) / 1e6)["median"] for t in timing.latencies_ns)
        return ours_ms / base_ms
