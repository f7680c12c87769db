#!/usr/bin/env python
"""The decoder matrix: every tiny causal-LM class of tcexport.models.decoder_zoo x every decoder method, through
export -> compress -> validate as a user runs them (the CLI, one process per step), as a Markdown table.

    python scripts/decoder_matrix.py [--only KIND,...] [--methods NAME,...] [--work DIR] [--jobs N]
                                     [--reuse-exports] [--docs docs/models.md]
                                     [--json OUT] [--md OUT]

Methods (METHODS below): fastv keep 0.5 at layer 0; pdrop two stages (keep 0.5, 0.25 at layers 0, 1) where the
class has at least 3 layers, else one (keep 0.5 at layer 0); snapkv budget 6 window 4 (validate's prompts are
17-40 tokens); streaming sink 2 window 6. Each cell is what happened: `pass` with the worst prefill logits max
abs error over validate's samples (3 left-padded batches, 8 greedy tokens each, against transformers' own
forward under the same stages), `FAILED` with that error, or the refusal line of the step that refused (exit 2).
The zoo's directories are saved under --work (default: a temporary directory) and reused when present.
`--docs FILE` writes the table as FILE's "Decoders" section (between the DOCS_START/DOCS_END markers; replaced
when present, appended otherwise; the rest of FILE is left as it is).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tcexport.models import decoder_zoo


def pdrop_args(layers: int) -> list[str]:
    return ["--stage", "pdrop:keep=0.5,0.25@0,1"] if layers >= 3 else ["--stage", "pdrop:keep=0.5@0"]


METHODS = {
    "fastv": lambda layers: ["--method", "fastv", "--keep", "0.5", "--layers", "0"],
    "pdrop": pdrop_args,
    "snapkv": lambda layers: ["--method", "snapkv", "--budget", "6", "--window", "4"],
    "streaming": lambda layers: ["--method", "streaming", "--sink", "2", "--window", "6"],
}
# What each method's cell runs, in words (the docs table's header says it).
METHOD_WORDS = {"fastv": "keep 0.5 @0", "pdrop": "keep 0.5,0.25 @0,1 (keep 0.5 @0 on 2 layers)",
                "snapkv": "budget 6, window 4", "streaming": "sink 2, window 6"}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcexport.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=1800)


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit {result.returncode}"


def run_kind(kind: str, methods: list[str], work: Path, reuse: bool = False) -> dict:
    directory = decoder_zoo.decoder_dir(kind, work)
    layers = decoder_zoo.decoder_config(kind).num_hidden_layers
    (work / kind).mkdir(exist_ok=True)  # each export writes its genai_config.json beside it
    onnx_path = work / kind / f"{kind}.onnx"
    row = {"kind": kind, "layers": layers, "windowed": kind in decoder_zoo.WINDOWED_KINDS, "cells": {}}
    exported = None if reuse and onnx_path.exists() else cli("export", f"hf:{directory}", "-o", onnx_path, "--force")
    if exported is not None and exported.returncode != 0:
        row["export"] = last_line(exported)
        return row
    for method in methods:
        out = work / kind / f"{method}.onnx"
        args = METHODS[method](layers)
        cell = {"args": args}
        out.unlink(missing_ok=True)
        compressed = cli("compress", onnx_path, "-o", out, *args)
        if compressed.returncode != 0:
            cell.update(status="refused" if compressed.returncode == 2 else "error", line=last_line(compressed))
            row["cells"][method] = cell
            print(f"{kind} x {method}: {cell['status']} {cell['line']}", file=sys.stderr, flush=True)
            continue
        report_path = work / kind / f"{method}.validate.json"
        report_path.unlink(missing_ok=True)
        validated = cli("validate", out, "--json", report_path)
        if report_path.exists():
            report = json.loads(report_path.read_text())
            cell["max_logits_err"] = max(s["prefill_logits_max_abs"] for s in report["samples"])
            cell["status"] = "pass" if report["passed"] and validated.returncode == 0 else "FAILED"
            cell["cache_lengths"] = report["samples"][-1]["cache_lengths"]
        else:
            cell.update(status="refused" if validated.returncode == 2 else "error", line=last_line(validated))
        row["cells"][method] = cell
        print(f"{kind} x {method}: {cell['status']} {cell.get('max_logits_err', cell.get('line', ''))}",
              file=sys.stderr, flush=True)
    return row


def cell_text(cell: dict) -> str:
    if cell["status"] in ("pass", "FAILED"):
        return f"{cell['status']} ({cell['max_logits_err']:.1e})"
    return f"{cell['status']}: {cell['line'].removeprefix('error: ')}"


DOCS_START, DOCS_END = "<!-- decoder-matrix: start -->", "<!-- decoder-matrix: end -->"
DOCS_INTRO = """## Decoders

Every tiny causal-LM class of `tcexport.models.decoder_zoo` (2-3 layers, width 64, SmolLM2's tokenizer, seeded
weights; windowed: a sliding window of 8 on Mistral and Phi-3's layers, Gemma-2's first and Gemma-3's first and
last; `mistral_full` and `phi3_full`: the same classes without a window, as most released checkpoints are) x
every decoder method, through `tcexport export hf:DIR`, `tcexport compress` and `tcexport validate`
(3 left-padded batches of random prompts of 17-40 tokens, prefill logits within 1e-3 and identical greedy tokens
for 8 steps, against transformers' own forward under the same stages). A cell is `pass` with the worst prefill
logits max abs error, or the line `compress` refused it with (exit 2). Sliding-window layers after a fastv/pdrop
stage keep their window over the kept tokens' original positions; snapkv and streaming are refused on models
with sliding-window layers.
"""


def write_docs(path: Path, table: str) -> None:
    section = f"{DOCS_START}\n{DOCS_INTRO}\n{table}{DOCS_END}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if DOCS_START in text and DOCS_END in text:
        head, _, rest = text.partition(DOCS_START)
        text = head + section + rest.partition(DOCS_END)[2].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def markdown(rows: list[dict], methods: list[str], command: str) -> str:
    lines = [f"Produced by `{command}`.", "",
             "| class | layers | " + " | ".join(f"{m} ({METHOD_WORDS[m]})" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for row in rows:
        kind = row["kind"] + (" (windowed)" if row["windowed"] else "")
        if "export" in row:
            lines.append(f"| {kind} | {row['layers']} | export: {row['export']} |" + " |" * (len(methods) - 1))
            continue
        lines.append(f"| {kind} | {row['layers']} | " + " | ".join(cell_text(row["cells"][m]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(decoder_zoo.KINDS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", type=Path)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--docs", type=Path, help="write the table as this file's Decoders section")
    parser.add_argument("--reuse-exports", action="store_true", help="keep exports already under --work")
    args = parser.parse_args()
    kinds, methods = args.only.split(","), args.methods.split(",")
    for name in methods:
        if name not in METHODS:
            parser.error(f"unknown method {name}; choose from {', '.join(METHODS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="decoder-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    decoder_zoo.tokenizer_dir(work)  # once, before the workers share it
    for kind in kinds:  # transformers' lazy module is not safe to resolve from several threads at once
        decoder_zoo.decoder_config(kind)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda kind: run_kind(kind, methods, work, args.reuse_exports), kinds))
    command = "python scripts/decoder_matrix.py" + (f" --only {args.only}" if args.only != ",".join(
        decoder_zoo.KINDS) else "") + (f" --methods {args.methods}" if args.methods != ",".join(METHODS) else "")
    text = markdown(rows, methods, command)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.md:
        args.md.write_text(text)
    if args.docs:
        write_docs(args.docs, text)
    print(text)


if __name__ == "__main__":
    main()
