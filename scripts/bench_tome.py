#!/usr/bin/env python
"""ToMe on ViT-B/16 with ONNX Runtime (CPU): measured speedup vs the FLOP-ideal speedup of the token schedule,
and the share of compressed latency spent in the ops tcexport inserted (from ORT's profiler).

    python scripts/bench_tome.py [--out out/bench_tome] [--r 8,13,16] [--batch 1,8] [--iters 12]
    python scripts/bench_tome.py --oracle vit_b,minilm --batch 1,8 --iters 15 [--out out/bench_tome_oracle]

--oracle: ToMe as standard ops (--impl subgraph) and as one fused op per block (--impl plugin, tcexport's ONNX
Runtime op library), each speedup as a fraction of the same-schedule oracle's (below), ViT-B r=8,16 and MiniLM
r=4,8, all timed interleaved in one process, from the minimum of the runs.

FLOP-ideal speedup = FLOPs(baseline) / FLOPs(compressed model's own ops): what a perfect engine would gain
from the fewer tokens alone. The inserted ops (names starting with "tc_") are excluded there and measured
separately: their profiler time over all node time. Weights are seeded random (timing does not depend on them).

The oracle: the same token counts per block reached by dropping tokens with one constant Gather per tensor
(`uniform:keep_count`, no proportional attention), timed in the same rounds. It is what the token schedule alone
buys on this engine; ToMe's extra wall time over it, (ToMe - oracle) / ToMe, is the cost of the inserted ops
without the profiler's per-node overhead.

The inserted ops' share of latency is measured twice. By ORT's profiler (their node time over all node time),
which charges every node its own per-node overhead too (measured here on a chain of tiny Add nodes, with and
without the profiler), so for ~40 small nodes per merge it mostly measures the profiler. And in wall-clock time,
no profiler (tcexport.bench.inserted_cost): the inserted ops cut out of the built model, fed the tensors the whole model
feeds them, timed against the whole model, both as `tcexport bench` runs sessions (idle threads asleep, runs
interleaved) and as a deployed session runs by default (threads spinning between runs).

Also printed: the nodes of one merge (block 3: its metric, the merge, and the proportional-attention bias of the
next block), as written and after ONNX Runtime's graph optimizations, and the latency of tcexport's eager PyTorch
reference of the same compression (torch on the same threads), timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import collections
import time

import numpy as np
import onnxruntime as ort
import torch

from onnx import TensorProto, helper

from tcexport.bench import report as bench_report
from tcexport.bench import session as bench_session
from tcexport.compress import rewrite as compress
from tcexport.export import exporter as export
from tcexport.graph import flops
from tcexport.models import inputs
from tcexport.bench import inserted_cost
from tcexport.core import metadata
from tcexport.models import sources
from tcexport.backends import ort as ort_backend
from tcexport.methods.tome import ToMe
from tcexport.reference import compressed_reference

INSERTED_PREFIX = inserted_cost.INSERTED_PREFIX  # one definition of which nodes compression inserted


def inserted_share(model_path: Path, batch: int, runs: int, threads: int | None) -> dict:
    """Run with ORT's profiler; return the share of node time in inserted ops, and which of them cost most."""
    options = ort_backend.session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        model = ort_backend.onnxfile.load(model_path, load_external_data=False)
        feeds = inputs.random_feeds(inputs.specs_from_graph(model), batch)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    node_time, inserted_time, by_op = 0, 0, {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"].removesuffix("_kernel_time")
        node_time += event["dur"]
        if name.startswith(INSERTED_PREFIX):
            inserted_time += event["dur"]
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0) + event["dur"]
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:4]
    return {"share": inserted_time / node_time if node_time else 0.0,
            "top_ops": [{"op": op, "share": t / node_time} for op, t in top]}


def profiler_overhead_us(threads: int | None, nodes: int = 200, runs: int = 300) -> float:
    """What ORT's profiler adds to each node's time: a chain of `nodes` tiny Adds, timed with and without it."""
    def chain(length: int) -> bytes:
        names = ["x", *[f"y{i}" for i in range(length)]]
        graph = helper.make_graph(
            [helper.make_node("Add", [names[i], "one"], [names[i + 1]], name=f"add{i}") for i in range(length)],
            "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 197, 1])],
            [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, 197, 1])],
            initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()

    def per_run_us(length: int, profiled: bool) -> float:
        options = ort_backend.session_options(threads, opt_level="disable")
        with tempfile.TemporaryDirectory() as tmp:
            if profiled:
                options.enable_profiling = True
                options.profile_file_prefix = os.path.join(tmp, "profile")
            session = ort.InferenceSession(chain(length), options, providers=["CPUExecutionProvider"])
            feed = {"x": np.zeros((1, 197, 1), np.float32)}
            for _ in range(20):
                session.run(None, feed)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            if profiled:
                session.end_profiling()
        return 1e6 * float(np.median(times))

    plain = (per_run_us(nodes + 1, False) - per_run_us(1, False)) / nodes
    profiled = (per_run_us(nodes + 1, True) - per_run_us(1, True)) / nodes
    return profiled - plain


def merge_nodes(model_path: Path, block: int = 3) -> dict:
    """Non-constant nodes of one merge: block's metric and merge, and the next block's proportional attention."""
    model = ort_backend.onnxfile.load(model_path, load_external_data=False)
    mine = (f"tc_blk{block}/metric", f"tc_blk{block}_", f"tc_blk{block + 1}/prop_attn")
    ops = collections.Counter(node.op_type for node in model.graph.node
                              if node.op_type != "Constant" and node.name.startswith(mine))
    return {"nodes": sum(ops.values()), "ops": dict(ops.most_common())}


def eager_reference_ms(source, blocks: int, r: int, batches: list[int], iters: int) -> dict:
    """Median latency of tcexport's eager reference (the model's own forward with ToMe applied), per batch."""
    reference = compressed_reference(source, {block: ToMe(r=r) for block in range(blocks)})
    medians = {}
    with torch.no_grad():
        for batch in batches:
            feed = source.example_inputs(batch, seed=0)
            reference(*feed)
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                reference(*feed)
                times.append(time.perf_counter() - start)
            medians[batch] = 1000 * float(np.median(times))
    return medians


def model_flops(path: Path, batch: int) -> tuple[float, float]:
    """(FLOPs of the model's own ops, FLOPs of the inserted ops) at this batch, counted as every tcexport command
    counts them (tcexport.graph.flops.measure: shapes from one run of the graph)."""
    result = flops.measure(path, batch=batch)
    if result.total is None:  # a ratio over a partial count would flatter the compressed model
        raise RuntimeError(f"{path.name}: FLOPs not derived ({result.not_derived})")
    inserted = sum(n.flops for n in result.nodes if n.name.startswith(INSERTED_PREFIX))
    return result.total_flops - inserted, inserted


ORACLE_MODELS = {  # name: (spec, load options, ToMe r values), as issue 21 asks
    "vit_b": ("timm:vit_base_patch16_224", {}, (8, 16)),
    "minilm": ("st:all-MiniLM-L6-v2", {"seq_len": 128}, (4, 8)),
}


def oracle_model_builds(out: Path, name: str, threads: int | None) -> tuple[dict[str, Path], dict]:
    """Export one model (once) and build, for each r: the same-schedule oracle, ToMe as standard ops
    (--impl subgraph) and ToMe as one fused op per block (--impl plugin, tcexport's ONNX Runtime op library)."""
    spec, options, rs = ORACLE_MODELS[name]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.onnx"
    if not base.exists():
        export.export_to_file(sources.load(spec, seed=0, **options), base)
    def build(source: Path, label: str, directory: Path) -> None:  # kept from an earlier run of the same --out
        builds[label] = directory
        if not (directory / "model.onnx").is_file():
            ort_backend.build(source, directory, threads=threads)

    builds: dict[str, Path] = {}
    build(base, f"{name}/base", folder / "base-ort")
    info = {}
    for r in rs:
        for impl in ("subgraph", "plugin"):
            path = folder / f"tome_r{r}_{impl}.onnx"
            if not path.is_file():
                compress.compress_file(base, path, r=str(r), impl=impl)
            build(path, f"{name}/r{r}/{impl}", folder / f"tome_r{r}_{impl}-ort")
        written = ort_backend.onnxfile.load(folder / f"tome_r{r}_subgraph.onnx", load_external_data=False)
        protected = metadata.read(written, metadata.COMPRESSION)["protected"]
        schedule = metadata.read(written, metadata.TOKENS)
        stages = [f"uniform:keep_count={block['out'] - protected}@{block['block']}" for block in schedule
                  if block["out"] < block["in"]]
        path = folder / f"oracle_r{r}.onnx"
        if not path.is_file():
            compress.compress_file(base, path, stages=stages, prop_attn=False)
        build(path, f"{name}/r{r}/oracle", folder / f"oracle_r{r}-ort")
        inserted = {impl: sum(1 for node in onnx_nodes(folder / f"tome_r{r}_{impl}.onnx")
                              if node.name.startswith(INSERTED_PREFIX) and node.op_type != "Constant")
                    for impl in ("subgraph", "plugin")}
        info[r] = {"tokens_out": schedule[-1]["out"], "inserted_nodes": inserted}
    return builds, info


def onnx_nodes(path: Path):
    return ort_backend.onnxfile.load(path, load_external_data=False).graph.node


def cpu_time_runs(builds: dict[str, Path], batches: list[int], warmup: int, iters: int) -> tuple[dict, int]:
    """Minimum CPU time (ms) of one run per (label, batch): sessions with one intra-op thread run in the calling
    thread, so its CPU time (time.thread_time) is the run's work without the waits a loaded machine adds to wall
    time. Interleaved as bench runs them: one run of each artifact per round, the order rotating."""
    sessions = {}
    for label, directory in builds.items():
        options = ort_backend.session_options(1, interleaved=True)
        sessions[label] = ort_backend.open_session(directory / "model.onnx", options=options)
    least: dict = {}
    for batch in batches:
        model = ort_backend.onnxfile.load(builds[next(iter(builds))] / "model.onnx", load_external_data=False)
        feeds = inputs.random_feeds(inputs.specs_from_graph(model), batch)
        labels = list(sessions)
        for label in labels:
            for _ in range(warmup):
                sessions[label].run(None, feeds)
        for round_ in range(iters):
            for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
                start = time.thread_time()
                sessions[label].run(None, feeds)
                spent = 1000 * (time.thread_time() - start)
                least[(label, batch)] = min(least.get((label, batch), spent), spent)
    return least, iters


def oracle_report(args) -> None:
    """Each ToMe form's speedup as a fraction of the same-schedule oracle's, all timed interleaved in one process
    (one run of each artifact per round, rotating), from the minimum of the runs (medians move by +-5% on a
    shared machine; the minimum is the run least disturbed). The inserted ops' wall cost is the fused form's
    extra time over the oracle, 1 - oracle / plugin."""
    out: Path = args.out
    batches = [int(b) for b in args.batch.split(",")]
    rows, environment = [], None
    for name in args.oracle.split(","):
        builds, info = oracle_model_builds(out, name, args.threads)
        if args.cpu_time:
            least, runs = cpu_time_runs(builds, batches, args.warmup, args.iters)
            environment = {"timing": "CPU time of the calling thread per run, 1 intra-op thread"}
        else:
            timing = bench_session.run([str(p) for p in builds.values()], batches=batches, threads=args.threads,
                                       warmup=args.warmup, iters=args.iters)
            environment = timing["environment"]
            bench_report.write_json(timing, out / name / "bench.json")
            by_label = {path.name: label for label, path in builds.items()}  # bench labels an artifact by folder
            least = {(by_label[e["artifact"]], e["batch"]): e["latency_ms"]["min"] for e in timing["results"]}
            runs = min(e["iters"] for e in timing["results"])
        for batch in batches:
            base = least[(f"{name}/base", batch)]
            for r, details in info.items():
                oracle = least[(f"{name}/r{r}/oracle", batch)]
                row = {"model": name, "r": r, "batch": batch, "tokens_out": details["tokens_out"],
                       "base_min_ms": base, "oracle_min_ms": oracle, "oracle_speedup": base / oracle,
                       "runs": runs}
                for impl in ("subgraph", "plugin"):
                    ms = least[(f"{name}/r{r}/{impl}", batch)]
                    row[impl] = {"min_ms": ms, "speedup": base / ms, "of_oracle": oracle / ms,
                                 "extra_over_oracle": 1 - oracle / ms,
                                 "inserted_nodes": details["inserted_nodes"][impl]}
                rows.append(row)
    (out / "oracle.json").write_text(json.dumps({"rows": rows, "iters": args.iters, "warmup": args.warmup,
                                                 "threads": args.threads, "environment": environment}, indent=2))
    print("\n| model | r | batch | tokens (last block) | base ms | oracle | subgraph | of oracle | plugin | of oracle | "
          "plugin extra over oracle | inserted nodes (subgraph / plugin) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        sub, plug = row["subgraph"], row["plugin"]
        print(f"| {row['model']} | {row['r']} | {row['batch']} | {row['tokens_out']} | {row['base_min_ms']:.2f} | "
              f"{row['oracle_speedup']:.3f}x | {sub['speedup']:.3f}x | {100 * sub['of_oracle']:.1f}% | "
              f"{plug['speedup']:.3f}x | {100 * plug['of_oracle']:.1f}% | {100 * plug['extra_over_oracle']:.1f}% | "
              f"{sub['inserted_nodes']} / {plug['inserted_nodes']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:vit_base_patch16_224")
    parser.add_argument("--out", default="out/bench_tome", type=Path)
    parser.add_argument("--r", default="8,13,16")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile-runs", type=int, default=5)
    parser.add_argument("--eager-iters", type=int, default=5)
    parser.add_argument("--wall-iters", type=int, default=24, help="timed runs of the inserted-ops cut, per mode")
    parser.add_argument("--cpu-time", action="store_true",
                        help="with --oracle: time CPU time per run on one intra-op thread instead of wall time "
                             "(a loaded machine stretches wall time; the work a run does stays)")
    parser.add_argument("--oracle", default=None, metavar="MODELS",
                        help=f"only the oracle report for these models ({','.join(ORACLE_MODELS)}): each ToMe form "
                             "(subgraph, plugin) as a fraction of the same-schedule oracle, from the minimum of "
                             "--iters interleaved runs (use >= 9)")
    args = parser.parse_args()
    if args.oracle:
        args.out.mkdir(parents=True, exist_ok=True)
        oracle_report(args)
        return
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch.split(",")]
    rs = [int(r) for r in args.r.split(",")]

    base = out / "base.onnx"
    if not base.exists():
        export.export_to_file(sources.load(args.model, seed=0), base)
    builds = {"base": out / "base-ort"}
    ort_backend.build(base, builds["base"], threads=args.threads)
    schedules = {}
    for r in rs:
        path = out / f"tome_r{r}.onnx"
        schedules[r] = compress.compress_file(base, path, r=str(r))
        builds[f"r{r}"] = out / f"tome_r{r}-ort"
        ort_backend.build(path, builds[f"r{r}"], threads=args.threads)
    for r in rs:  # the same token counts, dropped by one constant Gather per tensor (timed after all ToMe builds)
        path = out / f"oracle_r{r}.onnx"
        written = ort_backend.onnxfile.load(out / f"tome_r{r}.onnx", load_external_data=False)
        protected = metadata.read(written, metadata.COMPRESSION)["protected"]
        stages = [f"uniform:keep_count={block['out'] - protected}@{block['block']}" for block in schedules[r]
                  if block["out"] < block["in"]]
        compress.compress_file(base, path, stages=stages, prop_attn=False)
        builds[f"oracle_r{r}"] = out / f"oracle_r{r}-ort"
        ort_backend.build(path, builds[f"oracle_r{r}"], threads=args.threads)

    timing = bench_session.run([str(p) for p in builds.values()], batches=batches, threads=args.threads,
                               warmup=args.warmup, iters=args.iters)
    bench_report.print_table(timing)
    bench_report.write_json(timing, out / "bench.json")
    medians = {(e["artifact"], e["batch"]): e["latency_ms"]["median"] for e in timing["results"]}

    if args.threads:
        torch.set_num_threads(args.threads)
    source = sources.load(args.model, seed=0)  # the reference deep-copies it: one load serves every r
    eager = {r: eager_reference_ms(source, len(schedules[r]), r, batches, args.eager_iters) for r in rs}
    rows = []
    for batch in batches:
        base_flops, _ = model_flops(base, batch)
        for r in rs:
            own, inserted = model_flops(out / f"tome_r{r}.onnx", batch)
            ideal = base_flops / own
            measured = medians[("base-ort", batch)] / medians[(f"tome_r{r}-ort", batch)]
            oracle = medians[("base-ort", batch)] / medians[(f"oracle_r{r}-ort", batch)]
            built = builds[f"r{r}"] / "model.onnx"
            profile = inserted_share(built, batch, args.profile_runs, args.threads)
            loaded = ort_backend.onnxfile.load(built)  # once for both modes
            wall = {mode: inserted_cost.inserted_wall_time(loaded, batch, iters=args.wall_iters, threads=args.threads,
                                                           spinning=spinning)
                    for mode, spinning in (("asleep", False), ("spinning", True))}
            rows.append({"r": r, "batch": batch, "tokens_out": schedules[r][-1]["out"],
                         "gflops_base": base_flops / 1e9, "gflops_compressed": own / 1e9,
                         "gflops_inserted": inserted / 1e9, "flop_ideal_speedup": ideal,
                         "measured_speedup": measured, "fraction_of_ideal": measured / ideal,
                         "base_median_ms": medians[("base-ort", batch)],
                         "compressed_median_ms": medians[(f"tome_r{r}-ort", batch)],
                         "inserted_share": profile["share"], "inserted_top_ops": profile["top_ops"],
                         "inserted_wall": wall, "inserted_nodes": wall["asleep"]["inserted_nodes"],
                         "oracle_speedup": oracle, "oracle_median_ms": medians[(f"oracle_r{r}-ort", batch)],
                         "fraction_of_oracle": measured / oracle,
                         "inserted_wall_share": 1 - medians[(f"oracle_r{r}-ort", batch)]
                         / medians[(f"tome_r{r}-ort", batch)],
                         "eager_reference_ms": eager[r][batch],
                         "ort_over_eager_speedup": eager[r][batch] / medians[(f"tome_r{r}-ort", batch)]})
    merge = {"as_written": merge_nodes(out / f"tome_r{rs[0]}.onnx"),
             "after_ort_optimizations": merge_nodes(builds[f"r{rs[0]}"] / "model.onnx")}
    overhead = profiler_overhead_us(args.threads)
    (out / "results.json").write_text(json.dumps({"rows": rows, "merge_nodes_block3": merge,
                                                  "profiler_overhead_us_per_node": overhead,
                                                  "environment": timing["environment"]}, indent=2))
    print("\n| r | batch | tokens (last block) | GFLOPs base → ToMe | FLOP-ideal | measured | of ideal | "
          "base ms | ToMe ms | inserted ops |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['r']} | {row['batch']} | {row['tokens_out']} | {row['gflops_base']:.1f} → "
              f"{row['gflops_compressed']:.1f} | {row['flop_ideal_speedup']:.2f}x | {row['measured_speedup']:.2f}x | "
              f"{100 * row['fraction_of_ideal']:.0f}% | {row['base_median_ms']:.1f} | "
              f"{row['compressed_median_ms']:.1f} | {100 * row['inserted_share']:.1f}% |")
    print(f"\nORT's profiler adds {overhead:.1f} us to each node (a chain of tiny Adds, with and without it)")
    print("\n| r | batch | inserted nodes | inserted ops, profiled | wall, threads asleep (as bench) | "
          "wall, threads spinning (ORT default) | inserted ms (asleep / spinning) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        wall = row["inserted_wall"]
        print(f"| {row['r']} | {row['batch']} | {row['inserted_nodes']} | {100 * row['inserted_share']:.1f}% | "
              f"{100 * wall['asleep']['share']:.1f}% | {100 * wall['spinning']['share']:.1f}% | "
              f"{wall['asleep']['inserted_ms']:.2f} / {wall['spinning']['inserted_ms']:.2f} |")
    print("\n| r | batch | same-schedule drop (oracle) | ToMe | ToMe of oracle | ToMe's extra wall time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['r']} | {row['batch']} | {row['oracle_speedup']:.2f}x | {row['measured_speedup']:.2f}x | "
              f"{100 * row['fraction_of_oracle']:.0f}% | {100 * row['inserted_wall_share']:.1f}% |")
    print("\n| r | batch | eager reference ms | ONNX Runtime ms | ORT vs eager | top inserted ops (share of node time) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        top = ", ".join(f"{op['op']} {100 * op['share']:.1f}%" for op in row["inserted_top_ops"])
        print(f"| {row['r']} | {row['batch']} | {row['eager_reference_ms']:.1f} | {row['compressed_median_ms']:.1f} | "
              f"{row['ort_over_eager_speedup']:.2f}x | {top} |")
    for label, count in merge.items():
        print(f"\nnodes of one merge (block 3, r={rs[0]}), {label.replace('_', ' ')}: {count['nodes']} {count['ops']}")


if __name__ == "__main__":
    main()
