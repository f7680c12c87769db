#!/usr/bin/env python
"""Every registered compression method at equal token budgets (about 25% and 40% fewer tokens): GFLOPs, ONNX
Runtime CPU latency on ViT-B/16 and MiniLM embedding fidelity, as a table, results.json and a Pareto plot.

    python scripts/compare_methods.py [--out out/compare_methods] [--iters 10] [--batch 1,8] [--quick]

Token budget. Every compressed model records its token schedule in tcexport.tokens: for each block, the tokens
going in (what its attention sees) and coming out (what its MLP sees; the method runs between the two). A block
counts (in + out) / 2 tokens, so

    token-blocks  = sum over blocks of (in + out) / 2
    mean tokens   = token-blocks / blocks                (mean tokens per block)
    reduction     = 1 - mean tokens / uncompressed tokens

is the share of token-blocks removed: 197 -> 148 mean tokens on ViT-B is a 25% reduction. The budget is read
back from each compressed file's metadata (not assumed from the parameters), printed per model and checked
against its target within TOLERANCE_POINTS percentage points.

Matching. CONFIGS below gives each method's parameters per target as `tcexport compress --stage` specs, tuned for
the token geometry in GEOMETRY (ViT-B/16 and vit_tiny: 197 tokens = CLS + 14x14 patches, 12 blocks;
all-MiniLM-L6-v2 at 128 tokens: 6 blocks). Methods that remove a few tokens at every block (tome, adjacent) set
r; methods that cut at a few layers (topk, random, uniform, query) share layers and set the kept share;
prune-merge sets dominant + contextual at one early layer; pool sets the layer (and, on text, the kernel). Pool
removes about 3/4 of the tokens in one step, so only its layer can be chosen and it lands within 3 points, the
others within 1.

Measurements, per method and target:
  * GFLOPs at batch 1 (tcexport.graph.flops.measure, MatMul/Gemm/Conv), the model's own ops and the inserted ops
    (node names starting with "tc_") apart, for both models;
  * ONNX Runtime CPU latency of the vision model (seeded random weights: timing does not depend on them), every
    artifact built with backends.ort.build and timed in ONE interleaved bench.session.run (baseline and all methods,
    rotating order each round, so machine drift hits all of them equally);
  * MiniLM (real weights) embedding cosine vs the uncompressed model on real text that fills all 128 tokens
    (pairs of the project's paragraphs, as in scripts/minilm_fidelity.py: no padding to remove for free), and
    retrieval top-1 of the project's queries against the compressed paragraph embeddings.
A method whose model takes an extra input (query-based selection) gets random values for it in the latency runs
and, for fidelity, the uncompressed embedding of each paragraph's own query when its width matches the
embedding; otherwise its fidelity is skipped with a note.

Outputs in --out: table.md (also printed), results.json, pareto.png (MiniLM cosine vs ViT batch-1 latency
relative to the uncompressed model; Pareto-optimal points outlined), the ONNX files and ORT builds.
--quick uses vit_tiny and few iterations (tests, smoke runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tome import model_flops  # noqa: E402  (own ops, inserted ops)
from minilm_fidelity import filled_texts  # noqa: E402

from tcexport import data, methods
from tcexport.bench import report as bench_report
from tcexport.bench import session as bench_session
from tcexport.compress import rewrite as compress
from tcexport.export import exporter as export
from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.models import sources  # noqa: E402
from tcexport.backends import ort as ort_backend  # noqa: E402

TARGETS = (25, 40)  # % of token-blocks removed
TOLERANCE_POINTS = 3.5  # |achieved - target| allowed, in percentage points

# What CONFIGS were tuned for: (tokens including CLS, blocks).
GEOMETRY = {"vision": (197, 12), "text": (128, 6)}

# method -> target -> {"vision": stage specs, "text": stage specs}; a spec is what `tcexport compress --stage`
# takes (METHOD:key=value,...@LAYERS). Expected reductions (vision / text) in the comments.
CONFIGS: dict[str, dict[int, dict[str, list[str]]]] = {
    "tome": {  # r tokens merged at every block
        25: {"vision": ["tome:r=8@all"], "text": ["tome:r=11@all"]},  # 24.4 / 25.8
        40: {"vision": ["tome:r=13@all"], "text": ["tome:r=17@all"]},  # 39.6 / 39.8
    },
    "adjacent": {  # same r as ToMe: neighbour pairs only
        25: {"vision": ["adjacent:r=8@all"], "text": ["adjacent:r=11@all"]},  # 24.4 / 25.8
        40: {"vision": ["adjacent:r=13@all"], "text": ["adjacent:r=17@all"]},  # 39.6 / 39.8
    },
    "topk": {  # EViT's layers 3,6,9 on ViT (1,3 on the 6-block MiniLM), kept share tuned
        25: {"vision": ["topk:keep=0.79@3,6,9"], "text": ["topk:keep=0.76@1,3"]},  # 24.8 / 25.1
        40: {"vision": ["topk:keep=0.62@3,6,9"], "text": ["topk:keep=0.59@1,3"]},  # 40.3 / 40.2
    },
    "prune-merge": {  # one early layer: dominant kept by CLS attention + contextual merged tokens
        25: {"vision": ["prune-merge:dominant=112,contextual=16@3"],
             "text": ["prune-merge:dominant=75,contextual=10@1"]},  # 24.5 / 24.6
        40: {"vision": ["prune-merge:dominant=76,contextual=10@3"],
             "text": ["prune-merge:dominant=52,contextual=7@1"]},  # 39.6 / 39.8
    },
    "pool": {  # one pooling step, the layer chosen for the budget. ViT: 2x2 on the 14x14 grid (196 -> 49).
        # MiniLM's 127 unprotected tokens pool 1-D; kernel 3 (-> 43) lands closer than kernel 2 (28.7 / 36.9).
        25: {"vision": ["pool:kernel=2@7"], "text": ["pool:kernel=3@3"]},  # 28.0 / 27.3
        40: {"vision": ["pool:kernel=2@5"], "text": ["pool:kernel=3@2"]},  # 40.4 / 38.3
    },
    "random": {  # same layers and kept share as topk: a fixed random subset
        25: {"vision": ["random:keep=0.79@3,6,9"], "text": ["random:keep=0.76@1,3"]},
        40: {"vision": ["random:keep=0.62@3,6,9"], "text": ["random:keep=0.59@1,3"]},
    },
    "uniform": {  # same layers and kept share as topk: evenly spread fixed subset
        25: {"vision": ["uniform:keep=0.79@3,6,9"], "text": ["uniform:keep=0.76@1,3"]},
        40: {"vision": ["uniform:keep=0.62@3,6,9"], "text": ["uniform:keep=0.59@1,3"]},
    },
    "query": {  # same layers and kept share as topk: tokens most relevant to a query embedding
        25: {"vision": ["query:keep=0.79@3,6,9"], "text": ["query:keep=0.76@1,3"]},
        40: {"vision": ["query:keep=0.62@3,6,9"], "text": ["query:keep=0.59@1,3"]},
    },
}

BUDGET_DEFINITION = ("reduction = 1 - (mean over blocks of (tokens in + tokens out) / 2) / uncompressed tokens, where "
                     "'in' is what a block's attention sees and 'out' what its MLP sees; read from each compressed "
                     "model's tcexport.tokens")
TEXT_SPEC = "st:all-MiniLM-L6-v2"
SEQ_LEN = 128
BASE_LABEL = "uncompressed"


class Skip(Exception):
    """This method/target cannot be measured here; the message says why."""


def budget(schedule: list[dict]) -> dict:
    """Achieved budget of a token schedule [{block, in, out}, ...] (one entry per block)."""
    n0 = schedule[0]["in"]
    token_blocks = sum((s["in"] + s["out"]) / 2 for s in schedule)
    mean = token_blocks / len(schedule)
    return {"tokens": n0, "blocks": len(schedule), "token_blocks": token_blocks, "mean_tokens": mean,
            "reduction": 1 - mean / n0, "last_tokens": schedule[-1]["out"],
            "per_block": [s["out"] for s in schedule]}


def recorded_budget(path: Path) -> dict:
    schedule = metadata.read(onnxfile.load(path, load_external_data=False), metadata.TOKENS)
    if not schedule:
        raise Skip(f"{path.name} has no tcexport.tokens record")
    return budget(schedule)


_START = time.perf_counter()


def phase(text: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {text}", flush=True)


def note(notes: list[str], text: str) -> None:
    notes.append(text)
    print(f"note: {text}", flush=True)


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


# ---------------------------------------------------------------------------------------------- models


def export_base(spec: str, path: Path, check: bool, **load_options) -> Path:
    """Export once; an existing file from the same spec is reused."""
    if path.exists():
        source = metadata.read(onnxfile.load(path, load_external_data=False), metadata.SOURCE) or {}
        if source.get("spec") == spec:
            return path
    phase(f"exporting {spec} -> {path}")
    export.export_to_file(sources.load(spec, **load_options), path, check=check)
    return path


def gflops(path: Path) -> dict:
    own, inserted = model_flops(path, 1)
    return {"own": own / 1e9, "inserted": inserted / 1e9}


class TextFidelity:
    """Embeddings of filled 128-token texts by the uncompressed MiniLM, and cosines of compressed models to them."""

    def __init__(self, base: Path, quick: bool = False):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(sources.resolve_st_path("all-MiniLM-L6-v2")))
        # filled_texts(): paragraph i + paragraph i+1, so text i goes with query i (retrieval). More samples for
        # the cosine: every other ordered pair (i, j), i != j, which fills the sequence just as well.
        paragraphs = data.paragraphs()
        n = len(paragraphs)
        aligned = filled_texts()
        pairs = [(i, j) for i in range(n) for j in range(n) if j not in (i, (i + 1) % n)]
        if quick:  # just filled_texts(): a fifth of the ONNX Runtime time
            pairs = []
        self.texts = aligned + [paragraphs[i] + " " + paragraphs[j] for i, j in pairs]
        self.first_paragraph = list(range(len(aligned))) + [i for i, _ in pairs]  # whose query goes with each text
        self.fed_extra: set[str] = set()  # extra inputs given a query embedding by the last embed()
        self.n_aligned = len(aligned)
        self.feeds = self.encode(self.texts)
        if self.feeds["attention_mask"].sum(1).min() != SEQ_LEN:
            raise SystemExit(f"error: the fidelity texts must fill all {SEQ_LEN} tokens")
        self.reference = self.embed(base, self.feeds)
        self.queries = self.embed(base, self.encode(data.queries()))

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(texts, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    def embed(self, path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = ort_backend.open_session(path)
        feeds = dict(feeds)
        self.fed_extra = set()
        for value in session.get_inputs():
            if value.name in feeds:
                continue
            # An extra input: a query embedding (query-based selection). Give each text its own query's
            # uncompressed embedding when the width matches; anything else has no meaning here.
            width = value.shape[-1] if value.shape else None
            if "float" not in value.type or width != self.queries.shape[1]:
                raise Skip(f"fidelity: extra input '{value.name}' {value.type} {value.shape} is not a "
                           f"{self.queries.shape[1]}-wide query embedding MiniLM can supply")
            rows = self.queries[self.first_paragraph[: len(feeds["input_ids"])]]
            if len(value.shape) == 3:
                rows = rows[:, None, :]
            feeds[value.name] = rows.astype(np.float32)
            self.fed_extra.add(value.name)
        return session.run(None, feeds)[0]

    def measure(self, path: Path) -> dict:
        got = self.embed(path, self.feeds)
        ref = self.reference
        cosine = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        truth = np.arange(self.n_aligned)
        hits = (self.queries @ got[: self.n_aligned].T).argmax(1) == truth
        return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                "retrieval_top1": float(hits.mean()), "texts": len(self.texts)}

    def base_retrieval(self) -> float:
        truth = np.arange(self.n_aligned)
        return float(np.mean((self.queries @ self.reference[: self.n_aligned].T).argmax(1) == truth))


# ---------------------------------------------------------------------------------------------- the run


def available_methods(notes: list[str], wanted: list[str] | None) -> list[str]:
    registered = methods.encoder_methods()
    for name in registered:
        if name not in CONFIGS:
            note(notes, f"method '{name}' is registered but has no budget config in CONFIGS; not compared")
    chosen = []
    for name in CONFIGS:
        if wanted is not None and name not in wanted:
            continue
        if name not in registered:
            note(notes, f"method '{name}' is not registered in this version of tcexport; skipped")
            continue
        chosen.append(name)
    if wanted:
        for name in wanted:
            if name not in CONFIGS:
                raise SystemExit(f"error: --methods: no config for '{name}'; choose from {', '.join(CONFIGS)}")
    return chosen


def compress_all(kind: str, base: Path, out: Path, names: list[str], notes: list[str]) -> dict:
    """(method, target) -> {"path", "budget", "gflops"} or {"skipped"}; compressed from `base`."""
    expected = GEOMETRY[kind]
    results = {}
    for name in names:
        for target in TARGETS:
            specs = CONFIGS[name][target][kind]
            path = out / f"{kind}-{name}-{target}.onnx"
            started = time.perf_counter()
            try:
                compress.compress_file(base, path, stages=specs)
                achieved = recorded_budget(path)
                results[(name, target)] = {"path": path, "stages": specs, "budget": achieved, "gflops": gflops(path)}
            except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others' numbers
                path.unlink(missing_ok=True)
                reason = f"{kind} {name} {target}%: compress failed ({first_line(exc)}); skipped"
                note(notes, reason)
                results[(name, target)] = {"stages": specs, "skipped": reason}
                continue
            geometry = (achieved["tokens"], achieved["blocks"])
            if geometry != expected:
                note(notes, f"{kind} model has {geometry[0]} tokens and {geometry[1]} blocks; CONFIGS were tuned "
                            f"for {expected[0]} and {expected[1]}, so its budgets may miss the targets")
                expected = geometry  # say it once
            print(f"  {kind:6s} {name:12s} {target}%: {' '.join(specs):45s} -> "
                  f"{100 * achieved['reduction']:5.1f}% ({achieved['mean_tokens']:.1f} mean tokens/block, "
                  f"{achieved['last_tokens']} after the last)  [{time.perf_counter() - started:.1f}s]", flush=True)
    return results


def build_all(base: Path, compressed: dict, out: Path, threads: int | None, notes: list[str]) -> dict[str, Path]:
    """Label -> ORT build directory; the uncompressed model first (the speedup baseline)."""
    builds = {BASE_LABEL: out / "builds" / BASE_LABEL}
    ort_backend.build(base, builds[BASE_LABEL], threads=threads)
    for (name, target), entry in compressed.items():
        if "skipped" in entry:
            continue
        label = f"{name}-{target}"
        try:
            ort_backend.build(entry["path"], out / "builds" / label, threads=threads)
        except Exception as exc:  # noqa: BLE001 - e.g. an op this ONNX Runtime lacks
            reason = f"vision {name} {target}%: ONNX Runtime build failed ({first_line(exc)}); skipped"
            note(notes, reason)
            entry["skipped"] = reason
            continue
        builds[label] = out / "builds" / label
    return builds


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (lower x = faster, higher y = more faithful)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(rows: list[dict], path: Path, vision_name: str, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    points, names = [(1.0, 1.0)], [BASE_LABEL]
    ax.scatter([1.0], [1.0], marker="*", s=220, color="black", zorder=4, label=BASE_LABEL)
    colors = plt.get_cmap("tab10")
    methods_seen = list(dict.fromkeys(r["method"] for r in rows))
    for index, name in enumerate(methods_seen):
        mine = [r for r in rows if r["method"] == name and r.get("relative_latency") and r.get("cosine_mean")]
        if not mine:
            continue
        xs = [r["relative_latency"] for r in mine]
        ys = [r["cosine_mean"] for r in mine]
        ax.plot(xs, ys, "-", color=colors(index), alpha=0.5, zorder=2)
        for r in mine:
            marker = "o" if r["target"] == TARGETS[0] else "s"
            ax.scatter([r["relative_latency"]], [r["cosine_mean"]], marker=marker, s=60, color=colors(index),
                       zorder=3, label=name if r is mine[0] else None)
            ax.annotate(f"{r['achieved_vision'] * 100:.0f}%", (r["relative_latency"], r["cosine_mean"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=7, color=colors(index))
            points.append((r["relative_latency"], r["cosine_mean"]))
            names.append(f"{name}-{r['target']}")
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", zorder=1,
            label="Pareto front")
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=140, facecolors="none",
               edgecolors="black", linewidths=1.2, zorder=5)
    ax.set_xlabel(f"{vision_name} latency relative to uncompressed (ONNX Runtime CPU, batch {batch}, median)")
    ax.set_ylabel("MiniLM embedding cosine vs uncompressed (mean)")
    ax.set_title(f"Fidelity vs latency at equal token budgets ({' and '.join(f'{t}%' for t in TARGETS)} fewer "
                 "token-blocks;\no = 25%, square = 40%, labels = achieved vision reduction)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(rows: list[dict], base: dict, batches: list[int], vision_name: str) -> str:
    head = ["method", "target", f"achieved {vision_name} (mean tok/block)", "achieved MiniLM (mean tok/block)",
            f"{vision_name} config", "MiniLM config", "GFLOPs b1 model + inserted"]
    head += [f"b{b} ms (speedup)" for b in batches]
    head += ["MiniLM cosine mean / min", "retrieval top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def latency_cells(r):
        return [f"{fmt(r['latency_ms'].get(b), '.1f')} ({fmt(r['speedup'].get(b), '.2f')}x)"
                if r["latency_ms"].get(b) is not None else "—" for b in batches]

    cells = [BASE_LABEL, "0%", f"0.0% ({base['vision_tokens']:.0f})", f"0.0% ({base['text_tokens']:.0f})", "—", "—",
             f"{base['gflops_vision']['own']:.2f} + 0", *latency_cells(base), "1.0000 / 1.0000",
             f"{100 * base['retrieval_top1']:.0f}%"]
    lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        def achieved(kind):
            b = r.get(f"budget_{kind}")
            return "skipped" if b is None else f"{100 * b['reduction']:.1f}% ({b['mean_tokens']:.1f})"

        g = r.get("gflops_vision")
        cos = (f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f}" if r.get("cosine_mean") is not None
               else "skipped")
        cells = [r["method"], f"{r['target']}%", achieved("vision"), achieved("text"),
                 "`" + " ".join(r["stages_vision"]) + "`", "`" + " ".join(r["stages_text"]) + "`",
                 f"{g['own']:.2f} + {g['inserted']:.4f}" if g else "—", *latency_cells(r), cos,
                 f"{100 * r['retrieval_top1']:.0f}%" if r.get("retrieval_top1") is not None else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_row(name: str, target: int, v: dict, t: dict, medians: dict, batches: list[int], plot_batch: int,
             fidelity: TextFidelity, notes: list[str]) -> dict:
    """One method at one target: budgets, GFLOPs, vision latency, text fidelity (None where skipped)."""
    row = {"method": name, "target": target, "stages_vision": v["stages"], "stages_text": t["stages"],
           "budget_vision": v.get("budget"), "budget_text": t.get("budget"),
           "achieved_vision": v["budget"]["reduction"] if v.get("budget") else None,
           "achieved_text": t["budget"]["reduction"] if t.get("budget") else None,
           "gflops_vision": v.get("gflops"), "gflops_text": t.get("gflops"),
           "latency_ms": {}, "speedup": {}, "relative_latency": None,
           "skipped": [e["skipped"] for e in (v, t) if "skipped" in e]}
    for b in batches:
        median, base_median = medians.get((f"{name}-{target}", b)), medians.get((BASE_LABEL, b))
        row["latency_ms"][b] = median
        row["speedup"][b] = base_median / median if median and base_median else None
    if row["speedup"].get(plot_batch):
        row["relative_latency"] = 1 / row["speedup"][plot_batch]
    if "skipped" not in t:
        try:
            row.update(fidelity.measure(t["path"]))
        except Exception as exc:  # noqa: BLE001 - e.g. an extra input MiniLM cannot feed
            reason = f"text {name} {target}%: fidelity not measured ({first_line(exc)})"
            note(notes, reason)
            row["skipped"].append(reason)
        if fidelity.fed_extra and target == TARGETS[0]:
            note(notes, f"{name}: for MiniLM fidelity its extra input ({', '.join(sorted(fidelity.fed_extra))}) gets "
                        "each text's own query, embedded by the uncompressed model (a pooled final-layer embedding "
                        "compared with intermediate hidden states: a proxy for a real query encoder); the latency "
                        "runs feed random values")
    for kind in ("vision", "text"):
        achieved = row[f"achieved_{kind}"]
        if achieved is not None and abs(100 * achieved - target) > TOLERANCE_POINTS:
            note(notes, f"{kind} {name} {target}%: achieved {100 * achieved:.1f}%, more than {TOLERANCE_POINTS} "
                        "points from the target")
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=Path("out/compare_methods"), type=Path)
    parser.add_argument("--quick", action="store_true", help="vit_tiny and few iterations (tests, smoke runs)")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds per batch (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per batch (default 2; --quick 1)")
    parser.add_argument("--batch", default="1,8", help="vision batch sizes, comma list (default 1,8)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--methods", default=None, help="comma list: compare only these (default: all in CONFIGS)")
    parser.add_argument("--vision-onnx", type=Path, default=None,
                        help="use this exported vision model instead of exporting the timm model")
    parser.add_argument("--text-onnx", type=Path, default=None,
                        help=f"use this export of {TEXT_SPEC} (seq len {SEQ_LEN}) instead of exporting it")
    args = parser.parse_args(argv)
    vision_spec = "timm:vit_tiny_patch16_224" if args.quick else "timm:vit_base_patch16_224"
    if args.vision_onnx:
        vision_spec = source_spec(args.vision_onnx)
    vision_name = vision_spec.split(":", 1)[-1].rsplit("/", 1)[-1]
    iters = args.iters if args.iters is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise SystemExit(f"error: --batch must be a comma list of integers; got '{args.batch}'") from None
    if not batches or min(batches) < 1 or iters < 1 or warmup < 0:
        raise SystemExit("error: --batch values and --iters must be >= 1, --warmup >= 0")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    wanted = [m.strip() for m in args.methods.split(",")] if args.methods else None
    names = available_methods(notes, wanted)
    if not names:
        raise SystemExit("error: no method to compare")
    started = time.perf_counter()

    vision_base = args.vision_onnx or export_base(vision_spec, out / f"{vision_name}.onnx", check=not args.quick,
                                                  seed=0)
    if args.text_onnx and source_spec(args.text_onnx) != TEXT_SPEC:
        raise SystemExit(f"error: --text-onnx {args.text_onnx} is not an export of {TEXT_SPEC}")
    text_base = args.text_onnx or export_base(TEXT_SPEC, out / "minilm.onnx", check=not args.quick, seq_len=SEQ_LEN)
    phase(f"compressing ({BUDGET_DEFINITION}):")
    vision = compress_all("vision", vision_base, out, names, notes)
    text = compress_all("text", text_base, out, names, notes)

    phase(f"building {vision_name} with ONNX Runtime (CPU)")
    builds = build_all(vision_base, vision, out, args.threads, notes)
    phase(f"timing {len(builds)} artifacts interleaved at batch {','.join(map(str, batches))}, {iters} iterations")
    timing = bench_session.run([str(p) for p in builds.values()], batches=batches, threads=args.threads,
                               warmup=warmup, iters=iters)
    bench_report.write_json(timing, out / "bench.json")
    # Labels are the build directories' names, i.e. the keys of `builds` (all distinct).
    medians = {(e["artifact"], e["batch"]): e["latency_ms"]["median"] for e in timing["results"]}

    phase("measuring MiniLM fidelity")
    fidelity = TextFidelity(text_base, quick=args.quick)
    base_row = {"vision_tokens": recorded_or_geometry(vision, "vision"),
                "text_tokens": recorded_or_geometry(text, "text"),
                "gflops_vision": gflops(vision_base), "gflops_text": gflops(text_base),
                "latency_ms": {b: medians.get((BASE_LABEL, b)) for b in batches},
                "speedup": {b: 1.0 for b in batches}, "retrieval_top1": fidelity.base_retrieval()}

    plot_batch = 1 if 1 in batches else batches[0]
    rows = [make_row(name, target, vision[(name, target)], text[(name, target)], medians, batches, plot_batch,
                     fidelity, notes)
            for name in names for target in TARGETS]

    table = markdown_table(rows, base_row, batches, vision_name)
    header = (f"# Token-compression methods at equal token budgets\n\n"
              f"Budget: {BUDGET_DEFINITION}. Targets {', '.join(f'{t}%' for t in TARGETS)} "
              f"(tolerance ±{TOLERANCE_POINTS} points). Latency: {vision_name} (random weights: timing does not "
              f"depend on them), ONNX Runtime CPU, median of {iters} interleaved runs. Fidelity: all-MiniLM-L6-v2 on "
              f"{len(fidelity.texts)} texts filling {SEQ_LEN} tokens; retrieval top-1 uncompressed "
              f"{100 * base_row['retrieval_top1']:.0f}%. GFLOPs: tcexport.graph.flops MatMul/Gemm/Conv FLOPs at batch 1, "
              "the model's own ops + the inserted (tc_*) ones; inserted elementwise, gather and TopK ops are not in "
              "that figure.\n\n")
    footer = "".join(f"\n- {n}" for n in notes)
    (out / "table.md").write_text(header + table + (f"\nNotes:{footer}\n" if notes else ""))
    plot(rows, out / "pareto.png", vision_name, plot_batch)
    results = {"vision_model": vision_spec, "text_model": TEXT_SPEC, "seq_len": SEQ_LEN, "targets": list(TARGETS),
               "tolerance_points": TOLERANCE_POINTS, "budget_definition": BUDGET_DEFINITION,
               "batches": batches, "iters": iters, "warmup": warmup, "plot_batch": plot_batch,
               "configs": {n: CONFIGS[n] for n in names}, "methods": names, "notes": notes,
               "baseline": base_row, "rows": rows, "environment": timing["environment"],
               "elapsed_s": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(header + table, end="")
    if notes:
        print(f"\nNotes:{footer}")
    phase(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'pareto.png'}")
    return results


def source_spec(path: Path) -> str:
    """The model spec an exported file records in tcexport.source."""
    source = metadata.read(onnxfile.load(path, load_external_data=False), metadata.SOURCE) or {}
    if not source.get("spec"):
        raise SystemExit(f"error: {path} has no tcexport.source record; export it with 'tcexport export'")
    return source["spec"]


def recorded_or_geometry(compressed: dict, kind: str) -> int:
    """The uncompressed token count, as the compressed models recorded it (the geometry when none did)."""
    for entry in compressed.values():
        if entry.get("budget"):
            return entry["budget"]["tokens"]
    return GEOMETRY[kind][0]


if __name__ == "__main__":
    main()
