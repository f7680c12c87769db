"""Benchmarking: interleaved timing, statistics, reports and plots, and the inserted ops' own cost.

    timing         runners (ONNX Runtime's here) and the interleaved timing loop: warm-up, rounds or duration
    stats          latency statistics: percentiles, throughput, device times, speedups, noise warnings
    report         the results table, summary lines and warnings, the JSON file and the PNG plot
    session        `tcexport bench`'s run: open the artifacts, plan their feeds, time, summarize into results
    inserted_cost  wall-clock cost of the ops compression inserted, measured without a profiler
"""
