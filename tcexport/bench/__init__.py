"""Benchmarking: interleaved timing, statistics, reports and plots, and the inserted ops' own cost."""
