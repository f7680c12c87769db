"""Reports of a bench results structure (see tcexport.bench.session): the table, the summary lines, warnings,
the JSON file and the PNG plot.

The table (rich) shows one row per artifact and batch size with the latency statistics, throughput and speedup,
plus a median device-time column per field any TensorRT engine reported; numbers share one format per column.
The plot draws one panel per batch size: a bar per artifact at its median, a whisker to p90, its speedup.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tcexport.core.atomic import atomic_file
from tcexport.core.errors import UsageError

def _stdout_console():
    from rich.console import Console

    console = Console()
    # Piped into a file, rich assumes 80 columns and would squeeze eleven columns into unreadable wraps.
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


TABLE_COLUMNS = ("artifact", "batch", "runs", "min", "median", "mean", "p90", "p95", "p99", "qps", "samples/s",
                 "speedup")
LATENCY_COLUMNS = ("min", "median", "mean", "p90", "p95", "p99")
# Device columns (median of each device field), shown only when some entry has that field; placed after p99.
DEVICE_COLUMNS = {"gpu_compute_ms": "gpu", "h2d_ms": "h2d", "d2h_ms": "d2h"}
MISSING_CELL = "-"
SIGNIFICANT_DIGITS = 3  # a column's smallest value keeps this many; every cell of the column has its decimals


def table_columns(results: dict) -> tuple[str, ...]:
    """The table's columns: the host ones always, plus a device column per field any entry reports.

    A mixed run (ONNX Runtime next to TensorRT) shows the device columns, with MISSING_CELL in ORT rows.
    """
    present = [column for name, column in DEVICE_COLUMNS.items()
               if any(name in entry for entry in results["results"])]
    split = TABLE_COLUMNS.index("p99") + 1
    return TABLE_COLUMNS[:split] + tuple(present) + TABLE_COLUMNS[split:]


def cell_value(entry: dict, column: str) -> float | None:
    """The number behind a numeric cell (None where not measured)."""
    field_by_column = {column: name for name, column in DEVICE_COLUMNS.items()}
    if column in LATENCY_COLUMNS:
        return entry["latency_ms"][column]
    if column in field_by_column:
        stats = entry.get(field_by_column[column])
        return stats["median"] if stats else None
    if column == "qps":
        return entry["throughput_qps"]
    if column == "samples/s":
        return entry["throughput_samples_per_s"]
    raise ValueError(f"unknown table column {column!r}")


def column_decimals(values: Sequence[float | None]) -> int:
    """One format per column: enough decimals for its smallest value to keep SIGNIFICANT_DIGITS (0 to 4)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    if not finite:
        return 2
    return max(0, min(4, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(min(finite)))))


def column_formats(entries: Sequence[dict], columns: Sequence[str]) -> dict[str, int]:
    numeric = [c for c in columns if c not in ("artifact", "batch", "runs", "speedup")]
    return {c: column_decimals([cell_value(e, c) for e in entries]) for c in numeric}


def table_row(entry: dict, columns: Sequence[str], decimals: dict[str, int] | None = None) -> list[str]:
    """The cells of one result entry under `columns` (see table_columns), numbers at the column's `decimals`."""
    decimals = decimals if decimals is not None else column_formats([entry], columns)
    cells = []
    for column in columns:
        if column == "artifact":
            cells.append(entry["artifact"])
        elif column in ("batch", "runs"):
            cells.append(str(entry["batch"] if column == "batch" else entry["iters"]))
        elif column == "speedup":
            cells.append(f"{entry['speedup']:.2f}x")
        else:
            value = cell_value(entry, column)
            cells.append(MISSING_CELL if value is None else f"{value:.{decimals[column]}f}")
    return cells


def table_caption(columns: Sequence[str], settings: dict | None = None) -> str:
    caption = "speedup = first artifact's median / median, same batch"
    device = [c for c in columns if c in DEVICE_COLUMNS.values()]
    if device:
        caption += (f"; {'/'.join(device)} = median device time (CUDA events, TensorRT engines; "
                    f"{MISSING_CELL} = not measured)")
    if settings:
        caption += f"\nruns = timed runs per artifact, after {warmup_text(settings)}; qps = runs / wall-clock they took"
    return caption


def warmup_text(settings: dict) -> str:
    if settings.get("warmup_ms") is not None:
        return f"{settings['warmup_ms']:g} ms of warm-up"
    runs = settings.get("warmup", 0)
    return f"{runs} warm-up run{'s' if runs != 1 else ''}"


def results_table(results: dict, compact: bool = False):
    """The results as a rich Table; compact drops the borders and padding so it fits an 80-column terminal."""
    from rich import box
    from rich.table import Table

    style = dict(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0)) if compact else {}
    columns = table_columns(results)
    decimals = column_formats(results["results"], columns)
    table = Table(title="latency in ms (interleaved runs)", caption=table_caption(columns, results.get("settings")),
                  **style)
    table.add_column(columns[0], overflow="fold")
    for name in columns[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    for entry in results["results"]:
        table.add_row(*table_row(entry, columns, decimals))
    return table


def print_table(results: dict) -> None:
    console = _stdout_console()
    table = results_table(results)
    # Twelve columns overflow a narrow terminal, and rich would then cut every number short: go compact first.
    natural_width = console.measure(table, options=console.options.update_width(10_000)).maximum
    if natural_width > console.width:
        table = results_table(results, compact=True)
    console.print(table)


def summary_lines(results: dict) -> list[str]:
    """The closing lines: each artifact against the first, naming both, at every batch size."""
    artifacts = results.get("artifacts") or []
    path_of = {a["label"]: a.get("path", a["label"]) for a in artifacts}
    entries = results["results"]
    labels = list(dict.fromkeys(e["artifact"] for e in entries))
    if len(labels) < 2:
        return []
    base = labels[0]
    lines = []
    for label in labels[1:]:
        speedups = ", ".join(f"{e['speedup']:.2f}x at batch {e['batch']}" for e in entries if e["artifact"] == label)
        lines.append(f"{label} ({path_of.get(label, label)}) vs {base} ({path_of.get(base, base)}): {speedups} "
                     "(median latency)")
    return lines


def print_warnings(results: dict) -> None:
    import sys

    for text in results.get("warnings", []):
        print(f"warning: {text}", file=sys.stderr)


def write_json(results: dict, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def plot_caption(results: dict) -> str:
    """Machine and settings, so a printed plot says what it measured."""
    env, settings = results.get("environment") or {}, results.get("settings") or {}
    machine = ", ".join(filter(None, [env.get("processor"), f"{env['usable_cpus']} usable CPUs"
                                      if env.get("usable_cpus") else None, env.get("platform")]))
    if settings.get("duration_s") is not None:
        amount = f"{settings['duration_s']:g} s per batch size"
    else:
        amount = f"{settings.get('iters', '?')} timed runs per artifact"
    threads = settings.get("threads") or "ONNX Runtime default"
    lines = [machine or "machine not recorded",
             f"onnxruntime {env.get('onnxruntime_version', '?')}, threads {threads}, {amount} after "
             f"{warmup_text(settings)}, interleaved; bars: median, whisker to p90; label: speedup vs the first",
             f"{results.get('tool', 'tcexport')}, {env.get('timestamp', '')}"]
    return "\n".join(lines)


def write_plot(results: dict, path: str | Path) -> None:
    """One panel per batch size (latencies differ by orders of magnitude between them): a bar per artifact at
    its median, a whisker up to p90, its speedup written on the bar, machine and settings in the caption."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"{path}: the plot is written as PNG; give a path ending in .png")
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI backend picked up from the environment
    import matplotlib.pyplot as plt

    entries = results["results"]
    labels = list(dict.fromkeys(e["artifact"] for e in entries))
    batches = list(dict.fromkeys(e["batch"] for e in entries))
    by_key = {(e["artifact"], e["batch"]): e for e in entries}
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(labels))]
    width = max(6.0, 1.2 + len(batches) * (0.9 + 0.75 * len(labels)))
    fig, axes = plt.subplots(1, len(batches), figsize=(width, 5.2), squeeze=False)
    try:
        for ax, batch in zip(axes[0], batches):
            shown = [label for label in labels if (label, batch) in by_key]
            medians = [by_key[(label, batch)]["latency_ms"]["median"] for label in shown]
            above = [max(by_key[(label, batch)]["latency_ms"]["p90"] - m, 0.0) for label, m in zip(shown, medians)]
            x = np.arange(len(shown))
            bars = ax.bar(x, medians, 0.7, color=[colors[labels.index(label)] for label in shown],
                          yerr=[np.zeros(len(shown)), above], capsize=4, edgecolor="black", linewidth=0.6)
            for bar, label in zip(bars, shown):
                speedup = by_key[(label, batch)]["speedup"]
                ax.annotate(f"{speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height() / 2),
                            ha="center", va="center", fontsize=12, fontweight="bold", color="white",
                            bbox=dict(boxstyle="round,pad=0.2", facecolor="black", alpha=0.55, linewidth=0))
            ax.set_xticks(x)
            ax.set_xticklabels(shown, rotation=20 if max(map(len, shown)) > 10 else 0, ha="right"
                               if max(map(len, shown)) > 10 else "center", fontsize=11)
            ax.set_title(f"batch {batch}", fontsize=13)
            ax.set_ylim(0, max(m + a for m, a in zip(medians, above)) * 1.12)
            ax.tick_params(axis="y", labelsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("latency (ms)", fontsize=12)
        fig.suptitle("tcexport bench: median latency per batch size", fontsize=14)
        import textwrap

        caption = plot_caption(results).splitlines()
        caption = [wrapped for line in caption for wrapped in textwrap.wrap(line, int(width * 13))]  # 8.5 pt mono
        fig.text(0.01, 0.01, "\n".join(caption), fontsize=8.5, ha="left", va="bottom", family="monospace")
        fig.tight_layout(rect=(0, 0.035 * len(caption) + 0.02, 1, 0.95))
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=150)  # tmp ends in .tmp, so the format must be explicit
    finally:
        plt.close(fig)
