#!/usr/bin/env python
"""The model matrix: export -> compress (tome, topk; adjacent too for speech) -> validate -> bench over every model
family tcexport supports, as docs/models.md (one row per model and method) and docs/models.json.

    python scripts/model_matrix.py [--full] [--only NAME,...] [--merge] [--out docs] [--work DIR] [--iters 20]

Models come from tcexport.models.zoo: the timm variants (zoo.TIMM), the transformers kinds (zoo.HF_KINDS, saved as
hf: directories) and the sentence-transformers kinds (zoo.ST_KINDS). By default they are the zoo's tiny
configs (2 blocks, width 32-64: minutes for the whole matrix); --full uses the real sizes (timm defaults, the
transformers config classes' base sizes), with seeded weights drawn by tcexport.models.seeded_init.exercise either way.

`--only NAME,... --merge` runs a few models and merges their rows into the models.json/models.md already in --out
(rows of those models replaced, new ones placed in matrix order, every other row kept as it was measured); the
header keeps the run that produced the rest and names each merged run's command.

Each step's UsageError (a family the rewriter or the reference does not cover yet, a refused model) lands in
its row as the step's status; later steps of that row are skipped. Columns:
  tokens      tokens into the first block -> out of the last one (tcexport.tokens)
  max rel     the worst relative error validate measured (fp32, batch 1 and 3)
  speedup     ONNX Runtime CPU median latency, uncompressed / compressed (interleaved bench, batch 1 and 4)
  FLOP-ideal  MatMul/Gemm/Conv FLOPs of the model's own ops, uncompressed / compressed (tcexport.graph.flops.measure):
              the speedup if latency followed FLOPs and the inserted ops were free
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_tome import INSERTED_PREFIX  # noqa: E402  (names of the nodes compression inserts)

from tcexport.bench import session as bench_session
from tcexport.compress import rewrite as compress
from tcexport.export import exporter as export
from tcexport.graph import flops
from tcexport.models import sources
from tcexport.validate import equality as validate
from tcexport.models import zoo  # noqa: E402
from tcexport.core.atomic import atomic_file  # noqa: E402
from tcexport.core.errors import UsageError, ValidationFailed  # noqa: E402

METHODS = ("tome", "topk")
# Methods a modality adds to the rows: adjacent merging keeps the order of speech frames.
MODALITY_METHODS = {"speech": ("adjacent",)}
BATCHES = (1, 4)
TINY_TEXT_LEN = 32
FULL_TEXT_LEN = 128
TOPK_KEEP = 0.7

# What each model exercises, for the family column.
TIMM_FAMILIES = {
    "vit_tiny_patch16_224": "ViT, CLS token",
    "beit_base_patch16_224": "BEiT: relative position bias, layer scale",
    "vit_relpos_small_patch16_224": "ViT relpos: MLP position bias, avg pool",
    "eva02_tiny_patch14_224": "EVA-02: rotary embedding",
    "vit_medium_patch16_gap_256": "ViT, global avg pool, no CLS",
    "vit_small_patch14_reg4_dinov2": "DINOv2 ViT: 4 registers + CLS",
    "vit_base_patch16_reg4_gap_256": "ViT: 4 registers, avg pool",
    "deit3_small_patch16_224": "DeiT-III: layer scale",
    "vit_base_patch16_siglip_224": "SigLIP ViT: attention-pool head",
    "vit_base_patch16_dinov3": "DINOv3 ViT: rotary embedding, 4 registers + CLS",
    "swin_tiny_patch4_window7_224": "Swin: windowed attention (refused)",
    "convnext_atto": "ConvNeXt: no attention (refused)",
    "vit_small_patch16_18x2_224": "ViT: parallel blocks (two attentions per residual)",
    "levit_128s": "LeViT: attention subsampling (refused)",
    "cait_xxs24_224": "CaiT: talking-heads attention (refused)",
    "xcit_nano_12_p16_224": "XCiT: attention over channels (refused)",
    "mvitv2_tiny": "MViTv2: pooled keys and queries (refused)",
    "pit_ti_224": "PiT: token pooling between stages (refused)",
}


@dataclass
class Entry:
    """One model of the matrix: a name for --only, a family, and how to load it."""

    name: str
    family: str
    make_spec: object  # (work_dir) -> spec string
    load_options: dict = field(default_factory=dict)


def entries(full: bool) -> list[Entry]:
    text_len = FULL_TEXT_LEN if full else TINY_TEXT_LEN
    found = []
    for name in zoo.TIMM:
        options = {} if full else {"model_args": zoo.timm_model_args(name)}
        found.append(Entry(name, f"timm {TIMM_FAMILIES.get(name, '')}".strip(), lambda work, n=name: f"timm:{n}",
                           options))
    for kind in zoo.HF_KINDS:
        text = kind in zoo.TEXT_KINDS + zoo.MASKED_TEXT_KINDS + zoo.STRUCTURE_TEXT_KINDS
        modality = ("text" if text else "vision" if kind in zoo.VISION_KINDS else "speech")
        options = {"seq_len": text_len} if text else {}
        if kind in zoo.RAW_AUDIO_KINDS and not full:
            options = {"input_shape": str(zoo.AUDIO_SAMPLES)}
        found.append(Entry(f"hf-{kind}", f"transformers {kind} ({modality})",
                           lambda work, k=kind: f"hf:{zoo.hf_dir(k, work / 'zoo', full=full)}", options))
    for kind in zoo.ST_KINDS:
        found.append(Entry(f"st-{kind}", f"sentence-transformers {kind}",
                           lambda work, k=kind: f"st:{zoo.st_dir(k, work / 'zoo', full=full)}", {"seq_len": text_len}))
    return found


def select(all_entries: list[Entry], only: str | None) -> list[Entry]:
    if not only:
        return all_entries
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = {e.name: e for e in all_entries}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UsageError(f"--only: unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [known[n] for n in wanted]


def compress_params(method: str, tokens: int, depth: int, protected: int) -> dict:
    """A moderate budget for any size: ToMe (and adjacent merging) removes about a third of the mergeable tokens
    over all blocks; top-k keeps 70% at a quarter, half and three quarters of the depth (EViT's placement)."""
    if method in ("tome", "adjacent"):
        per_block = max(1, (tokens - protected) // (3 * max(depth, 1)))
        return {"method": method, "r": str(per_block)}
    layers = sorted({max(0, depth * q // 4) for q in (1, 2, 3)} - {depth}) or [0]
    return {"method": "topk", "params": {"keep": TOPK_KEEP}, "layers": ",".join(map(str, layers))}


def step(row: dict, name: str, fn):
    """Run one step; its UsageError (or any other error, labelled internal) becomes the row's status."""
    start = time.perf_counter()
    try:
        result = fn()
    except UsageError as exc:
        row[name] = f"refused: {_one_line(exc)}"
        return None
    except ValidationFailed as exc:
        row[name] = f"failed: {_one_line(exc)}"
        return None
    except Exception as exc:  # a bug somewhere in tcexport: keep going, but say so loudly
        row[name] = f"internal error: {type(exc).__name__}: {_one_line(exc)}"
        row.setdefault("tracebacks", {})[name] = traceback.format_exc(limit=6)
        return None
    finally:
        row.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
    row[name] = "ok"
    return result


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def run_entry(entry: Entry, work: Path, iters: int, warmup: int, methods: tuple[str, ...]) -> list[dict]:
    """Rows for one model: one per method (all carrying the export's status when the export fails)."""
    base_row = {"model": entry.name, "family": entry.family}
    model_dir = work / entry.name
    model_dir.mkdir(parents=True, exist_ok=True)
    base_path = model_dir / "model.onnx"

    def do_export():
        source = sources.load(entry.make_spec(work), **entry.load_options)
        # zoo directories live in a temp dir: record the spec only where it is reproducible by itself
        base_row["spec"] = source.spec if source.spec.startswith("timm:") else f"zoo {entry.name}"
        base_row["load_options"] = entry.load_options
        base_row["depth"] = int(source.info.get("depth") or 0)
        export.export_to_file(source, base_path)
        return source

    source = step(base_row, "export", do_export)
    rows = []
    extra = MODALITY_METHODS.get(source.info.get("modality"), ()) if source is not None else ()
    for method in dict.fromkeys((*methods, *extra)):
        row = {**base_row, "method": method}
        rows.append(row)
        if source is None:
            continue
        compressed = model_dir / f"{method}.onnx"
        params = _params(method, source)
        row["params"] = params
        schedule = step(row, "compress", lambda: compress.compress_file(base_path, compressed, **params))
        if schedule is None:
            continue
        row["tokens_in"], row["tokens_out"] = schedule[0]["in"], schedule[-1]["out"]
        report = step(row, "validate", lambda: validate.validate(compressed, samples=2))
        if report is not None:
            row["validate"] = "passed" if report.passed else "failed"
            row["max_rel"] = report.worst("max_rel")
            row["max_abs"] = report.worst("max_abs")
        results = step(row, "bench", lambda: bench_session.run([base_path, compressed], batches=list(BATCHES),
                                                               iters=iters, warmup=warmup))
        if results is not None:
            for entry_ in results["results"][1::2]:
                row[f"speedup_b{entry_['batch']}"] = entry_["speedup"]
        ideal = step(row, "flops", lambda: flop_ideal_speedup(base_path, compressed))
        if ideal is not None:
            row["flop_ideal_speedup"] = ideal
    return rows


def own_flops(path: Path) -> int:
    """FLOPs of the model's own MatMul/Gemm/Conv ops at batch 1 (inserted tc_ nodes apart), counted as every
    tcexport command counts them (tcexport.graph.flops.measure: shapes from one run of the graph)."""
    result = flops.measure(path, batch=1)
    if result.total is None:  # a ratio over a partial count would flatter the compressed model
        raise UsageError(f"{path.name}: FLOPs not derived ({result.not_derived})")
    return result.total - sum(n.flops for n in result.nodes if n.name.startswith(INSERTED_PREFIX))


def flop_ideal_speedup(base: Path, compressed: Path) -> float:
    return own_flops(base) / own_flops(compressed)


def _params(method: str, source) -> dict:
    tokens = int(source.info.get("tokens") or source.inputs[0].shape[1])  # no count recorded: a sequence length
    depth = int(source.info.get("depth") or 1)
    protected = int(source.info.get("num_prefix_tokens") or 0)
    return compress_params(method, tokens, depth, protected)


# ---------------------------------------------------------------------------------------------- output


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def status(row: dict, name: str) -> str:
    text = row.get(name)
    if text is None:
        return "—"
    return text if len(text) <= 90 else text[:87] + "..."


def _flop_cell(row: dict) -> str:
    if str(row.get("flops", "")).startswith("refused"):
        return "not derived"  # models.json says which nodes are not counted
    return fmt(row.get("flop_ideal_speedup"), ".2f")


def produced_line(command: str, settings: dict) -> str:
    return f"Produced by `{command}` ({settings['size']} configs, seeded weights; {settings['when']})."


def merged_line(runs: list[dict]) -> str:
    def listed(names):
        quoted = [f"`{name}`" for name in names]
        return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]

    parts = "; ".join(f"{listed(run['models'])} by `{run['command']}` ({run['when']})" for run in runs)
    return f"Rows merged in later (`--merge`; every other row is from the run above): {parts}."


def markdown(rows: list[dict], command: str, settings: dict, merged: list[dict] = (),
             produced: str | None = None) -> str:
    """The matrix as markdown. `merged`: the --merge runs whose rows replaced or joined the base run's; `produced`:
    the base run's header line as the file already has it (it may carry a note on how it was run)."""
    tokens = [r["tokens_in"] for r in rows if "tokens_in" in r]
    span = f"{min(tokens)}-{max(tokens)} tokens" if tokens else "a few dozen tokens"
    lines = [
        "# Model matrix",
        "",
        produced or produced_line(command, settings),
        "",
        *([merged_line(list(merged)), ""] if merged else []),
        "Each row: export -> compress -> validate (fp32, batch 1 and 3, vs the eager PyTorch reference) -> bench "
        "(ONNX Runtime CPU, interleaved, median latency). FLOP-ideal: MatMul/Gemm/Conv FLOPs of the model's own "
        "ops, uncompressed / compressed. A step that is refused says why; the steps after it are skipped. "
        "validate passes when every element is within 1e-4 + 1e-4 x |reference|; max abs err is the worst "
        "difference, max rel err the worst ratio difference / max(|reference|, 1e-6), which grows large where "
        "a reference element is near zero.",
        "",
        *([f"With the tiny configs ({span}, width 32-64) the speedups measure what the inserted ops cost at "
           "that size, not what a deployment gains: the FLOPs saved are a few MatMuls of 2 blocks. "
           "`--full` runs the real sizes.", ""] if settings["size"] == "tiny" else []),
        "| model | family | method | tokens | export | compress | validate | max abs err | max rel err | speedup b1 "
        "| speedup b4 | FLOP-ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tokens = f"{r['tokens_in']} → {r['tokens_out']}" if "tokens_in" in r else "—"
        lines.append(
            f"| {r['model']} | {r['family']} | {r['method']} | {tokens} | {status(r, 'export')} | "
            f"{status(r, 'compress')} | {status(r, 'validate')} | {fmt(r.get('max_abs'), '.1e')} | {fmt(r.get('max_rel'), '.1e')} | "
            f"{fmt(r.get('speedup_b1'), '.2f')} | {fmt(r.get('speedup_b4'), '.2f')} | "
            f"{_flop_cell(r)} |")
    passed = sum(1 for r in rows if r.get("validate") == "passed")
    lines += ["", f"{passed} of {len(rows)} rows validate.", ""]
    return "\n".join(lines)


def decoder_section(path: Path) -> str:
    """The Decoders section scripts/decoder_matrix.py wrote into models.md (between its markers), kept as it is
    when this script rewrites the encoder matrix; '' when there is none."""
    start, end = "<!-- decoder-matrix: start -->", "<!-- decoder-matrix: end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if start not in text or end not in text:
        return ""
    return "\n" + start + text.partition(start)[2].partition(end)[0] + end + "\n"


def write_outputs(rows: list[dict], out: Path, command: str, settings: dict, merged: list[dict] = (),
                  produced: str | None = None) -> None:
    kept = decoder_section(out / "models.md")
    with atomic_file(out / "models.md") as tmp:
        tmp.write_text(markdown(rows, command, settings, merged, produced) + kept, encoding="utf-8")
    record = {"command": command, "settings": settings, **({"merged": list(merged)} if merged else {}), "rows": rows}
    with atomic_file(out / "models.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def read_existing(out: Path) -> tuple[dict, str | None]:
    """The matrix already in `out` (models.json), and the header line of its models.md, for --merge."""
    path = out / "models.json"
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
        existing["rows"], existing["command"], existing["settings"]  # noqa: B018 (the fields a merge keeps)
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--merge: {path} is not a model matrix to merge into; run the whole matrix there first, "
                         "or leave out --merge") from None
    try:
        produced = next((line for line in (out / "models.md").read_text(encoding="utf-8").splitlines()
                         if line.startswith("Produced by `")), None)
    except OSError:
        produced = None
    return existing, produced


def merge_rows(old: list[dict], new: list[dict], order: list[str]) -> list[dict]:
    """`old` with every model of `new` replaced by (or joined with) its new rows, models in matrix `order`
    (models the matrix no longer has keep their place at the end)."""
    by_model: dict[str, list[dict]] = {}
    for row in old:
        by_model.setdefault(row["model"], []).append(row)
    fresh: dict[str, list[dict]] = {}
    for row in new:
        fresh.setdefault(row["model"], []).append(row)
    by_model.update(fresh)
    rank = {name: i for i, name in enumerate(order)}
    models = sorted(by_model, key=lambda name: rank.get(name, len(rank)))
    return [row for name in models for row in by_model[name]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="real model sizes instead of the zoo's tiny configs")
    parser.add_argument("--only", help="comma-separated model names (timm names, hf-KIND, st-KIND)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where models.md and models.json go")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: merge the rows into the matrix already in --out instead of replacing it")
    parser.add_argument("--work", type=Path, default=None, help="keep the ONNX files here (default: a temp dir)")
    parser.add_argument("--methods", default=",".join(METHODS), help="compression methods, comma-separated")
    parser.add_argument("--iters", type=int, default=20, help="bench rounds per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="bench warm-up runs per artifact")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    all_entries = entries(args.full)
    chosen = select(all_entries, args.only)
    if args.merge and not args.only:
        raise UsageError("--merge adds the rows of --only NAME,... to the matrix in --out; give --only")
    existing, produced = read_existing(args.out) if args.merge else (None, None)
    if existing is not None and existing["settings"].get("size") != ("full" if args.full else "tiny"):
        raise UsageError(f"--merge: {args.out / 'models.json'} holds {existing['settings'].get('size')} configs; "
                         f"merge {'--full' if existing['settings'].get('size') == 'full' else 'tiny'} rows into it")
    command = "python scripts/model_matrix.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    settings = {"size": "full" if args.full else "tiny", "methods": list(methods), "batches": list(BATCHES),
                "iters": args.iters, "warmup": args.warmup, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "versions": export.versions()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcexport-matrix-") as tmp:
        work = args.work or Path(tmp)
        for entry in chosen:
            print(f"[matrix] {entry.name}", file=sys.stderr, flush=True)
            rows.extend(run_entry(entry, work, args.iters, args.warmup, methods))
    if existing is None:
        write_outputs(rows, args.out, command, settings)
        print(f"wrote {args.out / 'models.md'} and {args.out / 'models.json'} ({len(rows)} rows)", file=sys.stderr)
        return rows
    run = {"command": command, "when": settings["when"], "models": [e.name for e in chosen],
           "versions": settings["versions"]}
    # an earlier merged run keeps its line for the models it still holds the rows of
    earlier = [{**m, "models": [n for n in m["models"] if n not in run["models"]]} for m in existing.get("merged", [])]
    merged = [m for m in earlier if m["models"]] + [run]
    all_rows = merge_rows(existing["rows"], rows, [e.name for e in all_entries])
    write_outputs(all_rows, args.out, existing["command"], existing["settings"], merged, produced)
    print(f"merged {len(rows)} rows into {args.out / 'models.md'} and {args.out / 'models.json'} "
          f"({len(all_rows)} rows)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    try:
        main()
    except UsageError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
