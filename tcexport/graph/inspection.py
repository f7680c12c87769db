"""`tcexport inspect`: what an ONNX file holds, as a JSON-serialisable report and as a rich printout.

The report is a flat dict built from SECTIONS, an ordered list of Section(name, collect, render):
    collect(ctx) -> a dict of JSON-serialisable top-level keys merged into the report (None: nothing added)
    render(report) -> a rich renderable printed by print_report (None: nothing printed)
Other modules can add their own sections with register_section(); the InspectContext they receive gives the
loaded model, the FLOP count and the transformer blocks (each computed once, on first use). The FLOPs are
tcexport.graph.flops.measure's, the accounting every command uses: shapes from one run of the graph at --batch;
where a count cannot be derived, "total_gflops" is null and "not_derived" says why.
"blocks found" lists the blocks tcexport.graph.blocks finds (the ones compress can rewrite); "token schedule"
shows what compress recorded (tokens per block, method and parameters) and the FLOPs saved.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import onnx

from tcexport.graph import flops as flops_mod
from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.core.errors import UsageError


@dataclass
class InspectContext:
    path: Path
    model: onnx.ModelProto  # loaded without external data: initializers give dims, not necessarily values
    batch: int

    @cached_property
    def flops(self) -> flops_mod.FlopsResult:
        try:
            return flops_mod.measure(self.path, batch=self.batch)  # with its external weights: the run needs them
        except UsageError:  # weights that cannot be read: no run, shapes from inference (the result says so)
            return flops_mod.measure(self.model, batch=self.batch)

    @cached_property
    def blocks(self) -> tuple[list, str | None]:
        """(blocks found by tcexport.graph.blocks, None) or ([], why none were found). Never raises."""
        try:
            import onnx_ir as ir

            from tcexport.graph import blocks as blocks_mod

            return blocks_mod.find_blocks(ir.from_proto(self.model).graph), None
        except Exception as exc:  # noqa: BLE001 - inspect reports what it can; the reason goes in the report
            return [], " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class Section:
    name: str
    collect: Callable[[InspectContext], dict | None]
    render: Callable[[dict], Any] | None = None


SECTIONS: list[Section] = []


def register_section(section: Section, before: str | None = None) -> None:
    """Add a section (replacing one of the same name), at the end or before the section named `before`."""
    SECTIONS[:] = [s for s in SECTIONS if s.name != section.name]
    names = [s.name for s in SECTIONS]
    SECTIONS.insert(names.index(before) if before in names else len(SECTIONS), section)


def inspect_model(path: str | Path, batch: int = 1) -> dict:
    """The report for one .onnx file. Raises UsageError when the file is missing or not ONNX."""
    path = Path(path)
    model = onnxfile.load(path, load_external_data=False)
    ctx = InspectContext(path=path, model=model, batch=batch)
    report: dict[str, Any] = {}
    for section in SECTIONS:
        report.update(section.collect(ctx) or {})
    return report


def print_report(report: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    for section in SECTIONS:
        if section.render is None:
            continue
        renderable = section.render(report)
        if renderable is not None:
            console.print(renderable)


# ---------------------------------------------------------------- collectors

def _dtype_name(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type in onnx.TensorProto.DataType.values() \
            else f"type{elem_type}"


def _value_info(value: onnx.ValueInfoProto) -> dict:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "dtype": kind or "unknown", "shape": None}
    tensor_type = value.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    return {"name": value.name, "dtype": _dtype_name(tensor_type.elem_type), "shape": shape}


def _external_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(base / entry.value)
    return files


def _collect_file(ctx: InspectContext) -> dict:
    model = ctx.model
    external = sorted(p for p in _external_files(model, ctx.path.parent) if p.is_file())
    return {
        "path": str(ctx.path),
        "file_size_bytes": ctx.path.stat().st_size,
        "external_data_bytes": sum(p.stat().st_size for p in external),
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": {"name": model.producer_name, "version": model.producer_version},
    }


def _collect_io(ctx: InspectContext) -> dict:
    graph = ctx.model.graph
    initializers = {t.name for t in graph.initializer}
    return {
        "inputs": [_value_info(v) for v in graph.input if v.name not in initializers],
        "outputs": [_value_info(v) for v in graph.output],
    }


def _collect_graph(ctx: InspectContext) -> dict:
    model = ctx.model
    histogram: dict[str, int] = {}
    for node in model.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        histogram[op] = histogram.get(op, 0) + 1
    with_scopes = sum(1 for node in model.graph.node
                      if any(p.key == flops_mod.SCOPES_KEY for p in node.metadata_props))
    nodes = len(model.graph.node)
    return {
        "node_count": nodes,
        "op_histogram": dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "initializer_count": len(model.graph.initializer),
        # elements in all initializers (weights, plus any constant tensors the exporter stored as initializers)
        "parameter_count": sum(math.prod(t.dims) for t in model.graph.initializer),
        "functions": [f"{f.domain}::{f.name}" if f.domain else f.name for f in model.functions],
        "scope_metadata": {"nodes_with_scopes": with_scopes,
                           "fraction": round(with_scopes / nodes, 4) if nodes else 0.0},
    }


def _collect_metadata(ctx: InspectContext) -> dict:
    model = ctx.model
    try:
        records = metadata.all_records(model)
    except json.JSONDecodeError:
        records = {}
        for prop in model.metadata_props:
            if prop.key.startswith("tcexport."):
                try:
                    records[prop.key] = json.loads(prop.value)
                except json.JSONDecodeError:
                    records[prop.key] = {"unreadable": prop.value[:200]}
    return {
        "tcexport": records,
        "metadata_keys": [p.key for p in model.metadata_props if not p.key.startswith("tcexport.")],
    }


def _collect_flops(ctx: InspectContext) -> dict:
    result = ctx.flops
    total = result.total
    return {"flops": {
        "batch": result.batch,
        "shapes": result.shapes,  # "run" (one ONNX Runtime run at the batch) or "inference" (it could not run)
        "total_gflops": None if total is None else total / 1e9,
        "not_derived": result.not_derived,  # why total_gflops is null; null when it is the model's total
        "by_op_type_gflops": {op: v / 1e9 for op, v in sorted(result.by_op_type.items(), key=lambda kv: -kv[1])},
        "other_gflops": result.other_flops / 1e9,
        "other_by_op_type_gflops": {op: v / 1e9
                                    for op, v in sorted(result.other_by_op_type.items(), key=lambda kv: -kv[1])},
        "unknown_nodes": result.unknown_nodes,
        "unknown_examples": [f"{u.name} ({u.op_type}): {u.reason}" for u in result.unknown[:10]],
        "notes": list(result.notes),
    }}


def _collect_blocks(ctx: InspectContext) -> dict:
    found, reason = ctx.blocks
    items = [{"index": s["index"], "scope": s["scope"], "norm": "post-norm" if s["post_norm"] else "pre-norm",
              "hidden": s["hidden"], "softmax": s["softmax"]} for s in (b.summary() for b in found)]
    note = None if found else f"no transformer blocks found: {reason}"
    return {"blocks": {"found": len(items), "items": items, "note": note}}


def _collect_token_schedule(ctx: InspectContext) -> dict:
    """What compress recorded (tcexport.tokens, tcexport.compression) and what it saves in FLOPs."""
    try:
        steps = metadata.read(ctx.model, metadata.TOKENS)
        record = metadata.read(ctx.model, metadata.COMPRESSION) or {}
    except UsageError:
        steps, record = None, {}
    if not steps:
        return {"token_schedule": None}
    keys = ("method", "layers", "params", "impl", "protected", "prop_attn", "schedule")
    return {"token_schedule": {
        "compression": {k: record.get(k) for k in keys},
        "blocks": [{"block": s.get("block"), "scope": s.get("scope"), "in": s.get("in"), "out": s.get("out")}
                   for s in steps],
        "tokens_in": steps[0].get("in"),
        "tokens_out": steps[-1].get("out"),
        "flops": _schedule_flops(ctx, steps),
    }}


def _schedule_flops(ctx: InspectContext, steps: list[dict]) -> dict:
    """GFLOPs of the compressed file against the same model without compression, from the per-node estimate.

    Each MatMul/Gemm/Conv of block b (found by its module scope) is rescaled to the uncompressed token count N0:
    attention products (a MatMul of two activations, q @ k^T and attn @ v) are quadratic in the tokens entering
    the block, (N0 / N_in)^2; layers with weights are linear: N0 / N_in before the block's hidden state (where
    the method sits), N0 / N_out after it. The method's own nodes (tc_*) are dropped. Everything else runs on a
    token count no method changes. "ideal_speedup" = uncompressed / compressed FLOPs without the method's own.
    "gflops" is null when some node is not counted (the flops section says why); when those are only the method's
    own nodes (a TensorRT plugin node has no body to count), the comparison without them still holds.
    """
    result = ctx.flops
    total = result.total
    out: dict[str, Any] = {"batch": result.batch, "gflops": None if total is None else total / 1e9}
    found, reason = ctx.blocks
    graph = ctx.model.graph
    nodes = {node.name: node for node in graph.node if node.name}
    order = {node.name: i for i, node in enumerate(graph.node) if node.name}
    own = [u for u in result.uncounted if u.name.startswith("tc_")]  # the method's own nodes
    blind = [u for u in result.uncounted if not u.name.startswith("tc_")]
    if blind:
        return {**out, "note": f"not derived: {len(blind)} node(s) that may hold MatMul/Gemm/Conv compute are not "
                               f"counted, e.g. {blind[0].name} ({blind[0].op_type}): {blind[0].reason}"}
    if len(found) != len(steps):
        return {**out, "note": f"not derived: the token schedule lists {len(steps)} blocks, the graph shows "
                               f"{len(found)}" + (f" ({reason})" if reason else "")}
    n0 = steps[0]["in"]
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    method = sum(rec.flops for rec in result.nodes if rec.name.startswith("tc_"))
    compressed = uncompressed = 0.0
    for step, block in zip(steps, found):
        producer = block.hidden.producer()
        hidden_at = order.get(producer.name if producer is not None else "")
        records = [rec for rec in result.nodes if rec.scope and step.get("scope") in rec.scope]
        if hidden_at is None or not records:
            return {**out, "note": f"not derived: block {step['block']} cannot be told apart in the graph "
                                   "(it needs the exporter's module scopes)"}
        for rec in records:
            node = nodes[rec.name]
            if node.op_type == "MatMul" and not any(name in constants for name in node.input):
                scale = (n0 / step["in"]) ** 2
            elif order[rec.name] < hidden_at:
                scale = n0 / step["in"]
            else:
                scale = n0 / step["out"]
            compressed += rec.flops
            uncompressed += rec.flops * scale
    without_method = result.total_flops - method
    estimate = without_method - compressed + uncompressed
    out.update({
        "method_gflops": None if own else method / 1e9,
        "uncompressed_gflops": estimate / 1e9,
        "ideal_speedup": estimate / without_method if without_method else None,
    })
    if own:
        out["note"] = f"the method's {len(own)} node(s) are not counted, e.g. {own[0].name}: {own[0].reason}"
    return out


# ---------------------------------------------------------------- renderers

def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def _fmt_gflops(value: float) -> str:
    return f"{value:.3f}" if value == 0 or value >= 0.001 else f"{value:.2e}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _render_file(report: dict):
    from rich.panel import Panel
    from rich.table import Table

    f = report
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    size = _human_bytes(f["file_size_bytes"])
    if f["external_data_bytes"]:
        size += f" (+ {_human_bytes(f['external_data_bytes'])} external data)"
    table.add_row("size", size)
    table.add_row("ir_version", str(f["ir_version"]))
    table.add_row("opsets", ", ".join(f"{d} {v}" for d, v in f["opsets"].items()))
    producer = " ".join(x for x in (f["producer"]["name"], f["producer"]["version"]) if x)
    table.add_row("producer", escape(producer) or "-")
    return Panel(table, title=escape(f["path"]), title_align="left")


def _render_io(report: dict):
    from rich.table import Table

    table = Table(title="Inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for kind in ("inputs", "outputs"):
        for v in report[kind]:
            shape = "?" if v["shape"] is None else "[" + ", ".join(str(d) for d in v["shape"]) + "]"
            table.add_row(kind[:-1], escape(v["name"]), escape(v["dtype"]), escape(shape))
    return table


def _render_graph(report: dict):
    from rich.console import Group
    from rich.table import Table

    g = report
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("nodes", str(g["node_count"]))
    summary.add_row("initializers", f"{g['initializer_count']} ({g['parameter_count']:,} elements)")
    summary.add_row("functions", escape(", ".join(g["functions"])) or "none")
    scopes = g["scope_metadata"]
    summary.add_row("module scopes", f"{scopes['nodes_with_scopes']} of {g['node_count']} nodes "
                                     f"({scopes['fraction']:.0%})")
    ops = Table(title="Op histogram", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in g["op_histogram"].items():
        ops.add_row(escape(op), str(count))
    return Group(summary, ops)


def _render_metadata(report: dict):
    from rich.panel import Panel
    from rich.text import Text

    m = report
    lines = []
    for key, value in m["tcexport"].items():
        lines.append(f"{key}: {json.dumps(value, sort_keys=True)}")
    if not lines:
        lines.append("no tcexport records (not written by 'tcexport export')")
    if m["metadata_keys"]:
        lines.append("other metadata keys: " + ", ".join(m["metadata_keys"]))
    return Panel(Text("\n".join(lines)), title="Provenance", title_align="left")


def _render_flops(report: dict):
    from rich.table import Table

    f = report["flops"]
    source = "one run of the graph" if f.get("shapes") == "run" else "shape inference"
    table = Table(title=f"Compute at batch {f['batch']} (shapes from {source})", title_justify="left")
    table.add_column("op")
    table.add_column("GFLOPs", justify="right")
    for op, value in f["by_op_type_gflops"].items():
        table.add_row(escape(op), _fmt_gflops(value))
    total = "not derived" if f["total_gflops"] is None else _fmt_gflops(f["total_gflops"])
    table.add_row("[bold]total[/bold]", f"[bold]{total}[/bold]")
    table.add_row("other (elementwise, norm, softmax; rough)", _fmt_gflops(f["other_gflops"]))
    caption = [f"total not derived: {f['not_derived']}"] if f.get("not_derived") else []
    if f["unknown_nodes"] and not caption:
        caption.append(f"{f['unknown_nodes']} node(s) not estimated, e.g. {f['unknown_examples'][0]}")
    caption.extend(f["notes"])
    if caption:
        table.caption = escape("\n".join(caption))
        table.caption_justify = "left"
    return table


def _render_blocks(report: dict):
    from rich.table import Table
    from rich.text import Text

    b = report.get("blocks") or {}
    if not b.get("found"):
        return Text(f"Blocks: {b.get('note') or 'none found'}")
    table = Table(title=f"Transformer blocks ({b['found']} found)", title_justify="left")
    for column in ("block", "scope", "norm", "hidden state"):
        table.add_column(column)
    for item in b["items"]:
        table.add_row(str(item["index"]), escape(item["scope"] or "-"), item["norm"], escape(item["hidden"]))
    return table


def _compact_layers(layers) -> str:
    layers = list(layers or [])
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(layer) if layer == start else f"{start}-{layer}")
            start = None
    return ",".join(parts) or "-"


def _compact_params(params) -> str:
    params = list(params or [])
    if not params:
        return "-"
    if all(p == params[0] for p in params):
        return " ".join(f"{k}={v}" for k, v in params[0].items())
    keys = list(params[0])
    return " ".join(f"{k}=" + ",".join(str(p.get(k)) for p in params) for k in keys)


def _render_token_schedule(report: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = report.get("token_schedule")
    if not t:
        return None
    c = t["compression"]
    summary = (f"{c.get('method')} at blocks {_compact_layers(c.get('layers'))}, {_compact_params(c.get('params'))}, "
               f"protected {c.get('protected')}, impl {c.get('impl')}: tokens {t['tokens_in']} -> {t['tokens_out']}")
    table = Table()
    for column in ("block", "scope", "tokens in", "tokens out"):
        table.add_column(column, justify="right" if column.startswith("tokens") else "left")
    for step in t["blocks"]:
        changed = step["in"] != step["out"]
        table.add_row(str(step["block"]), escape(step["scope"] or "-"), str(step["in"]),
                      f"[bold]{step['out']}[/bold]" if changed else str(step["out"]))
    f = t["flops"]
    if f.get("ideal_speedup"):
        if f["gflops"] is None:  # the method's own nodes are not counted: compare without them
            line = (f"GFLOPs at batch {f['batch']} without the method's own ops: "
                    f"{_fmt_gflops(f['uncompressed_gflops'] / f['ideal_speedup'])} compressed vs ")
        else:
            line = f"GFLOPs at batch {f['batch']}: {_fmt_gflops(f['gflops'])} compressed vs "
        line += f"{_fmt_gflops(f['uncompressed_gflops'])} uncompressed; FLOP-ideal speedup {f['ideal_speedup']:.2f}x"
        if f.get("method_gflops"):
            line += f"; the method itself adds {_fmt_gflops(f['method_gflops'])}"
        if f.get("note"):
            line += f" ({f['note']})"
    else:
        line = f"GFLOPs vs uncompressed: {f.get('note')}"
    return Group(Text(f"Token schedule: {summary}", style="italic"), table, Text(line))


for _section in (
    Section("file", _collect_file, _render_file),
    Section("io", _collect_io, _render_io),
    Section("graph", _collect_graph, _render_graph),
    Section("metadata", _collect_metadata, _render_metadata),
    Section("blocks found", _collect_blocks, _render_blocks),
    Section("token schedule", _collect_token_schedule, _render_token_schedule),
    Section("flops", _collect_flops, _render_flops),
):
    register_section(_section)
