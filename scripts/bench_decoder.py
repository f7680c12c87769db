"""Decoder benchmarks on SmolLM2-135M-Instruct (real weights), ORT CPU: the numbers BENCHMARKS.md reports.

    python scripts/bench_decoder.py [--out out/bench_decoder] [--threads 2] [--repeats 3]

1. exports hf:SmolLM2-135M-Instruct once (kept in --out), compresses it with fastv (keep 0.5 and 0.25 at layer 2),
   snapkv (budget 256 and 512, window 32) and streaming (sink 4, window 252);
2. TTFT: base vs fastv keep 0.5 on a 1,536-token prompt, with the FLOP-ideal speedup of that schedule;
3. decode: base vs snapkv budget 256 on a 2,048-token prompt (tokens/s and KV bytes);
4. the uncompressed graph vs onnxruntime-genai's loop over the same file (its genai_config.json) at 512 tokens;
5. fidelity of every compressed graph against the base on tcexport's bundled paragraphs.
Every timing comes from `tcexport bench` (interleaved rounds, min TTFT, best decode speed); results land in
--out/results.json and a Markdown summary is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SPEC = "hf:SmolLM2-135M-Instruct"
VARIANTS = {
    "fastv-0.5": ("--method", "fastv", "--keep", "0.5", "--layers", "2"),
    "fastv-0.25": ("--method", "fastv", "--keep", "0.25", "--layers", "2"),
    "snapkv-256": ("--method", "snapkv", "--budget", "256", "--window", "32"),
    "snapkv-256-w16": ("--method", "snapkv", "--budget", "256", "--window", "16"),
    "snapkv-512": ("--method", "snapkv", "--budget", "512", "--window", "32"),
    "streaming-4+252": ("--method", "streaming", "--sink", "4", "--window", "252"),
}


def tcexport(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "tcexport.cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"tcexport {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout


def flop_ideal_fastv(config: dict, n: int, layer: int, keep: float, span=(4, 8)) -> float:
    """Prefill FLOPs of the base over FastV's schedule: per layer 2 * n * (weights) + 4 * n^2 * (query width)
    (Q K^T and P V; the eager graph computes the whole square), layers after `layer` at the kept count."""
    width, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = width // heads
    weights = width * head_dim * (2 * heads + 2 * kv_heads) + 3 * width * config["intermediate_size"]
    span_len = n - span[0] - span[1]
    kept = n - span_len + int(keep * span_len + 0.5)

    def cost(tokens: int) -> float:
        return 2 * tokens * weights + 4 * tokens * tokens * heads * head_dim

    layers = config["num_hidden_layers"]
    return layers * cost(n) / ((layer + 1) * cost(n) + (layers - layer - 1) * cost(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench_decoder"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help="keep results already in --out for the same models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "smollm2.onnx"
    if not base.exists():
        tcexport("export", SPEC, "-o", base)
    paths = {"base": base}
    for name, options in VARIANTS.items():
        paths[name] = args.out / f"smollm2-{name}.onnx"
        if not paths[name].exists():
            tcexport("compress", base, "-o", paths[name], *options)
    threads = ("--threads", args.threads, "--repeats", args.repeats)
    results = {}
    for label, models, length, new in (("ttft", ["base", "fastv-0.5"], 1536, 4),
                                       ("decode", ["base", "snapkv-256"], 2048, 32),
                                       # a separate run: three 2,048-token sessions in one process need > 12 GB
                                       ("decode-w16", ["base", "snapkv-256-w16"], 2048, 32),
                                       ("genai", ["base"], 512, 32)):
        json_path = args.out / f"bench-{label}.json"
        if args.resume and json_path.exists() and _covers(json_path, models, paths):
            results[label] = json.loads(json_path.read_text())
            continue
        tcexport("bench", *[paths[m] for m in models], "--prompt-len", length, "--new-tokens", new, *threads,
                 "--json", json_path, "--peer" if label == "genai" else "--no-peer")
        results[label] = json.loads(json_path.read_text())
    import onnx

    record = json.loads(next(p.value for p in onnx.load(base, load_external_data=False).metadata_props
                             if p.key == "tcexport.source"))
    config = _config(record)
    results["fastv_flop_ideal_1536"] = flop_ideal_fastv(config, 1536, 2, 0.5)
    fidelity = {}
    for name in VARIANTS:
        json_path = args.out / f"fidelity-{name}.json"
        if args.resume and json_path.exists():
            fidelity[name] = json.loads(json_path.read_text())
            continue
        tcexport("validate", paths[name], "--reference-onnx", base, "--json", json_path)
        fidelity[name] = json.loads(json_path.read_text())
    results["fidelity"] = fidelity
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))


def _covers(json_path: Path, models: list[str], paths: dict) -> bool:
    labels = {e["label"] for e in json.loads(json_path.read_text())["entries"]}
    return {paths[m].stem for m in models} <= labels


def _config(record: dict) -> dict:
    from tcexport.models import causal

    location = causal.Location(Path(record["weights"]["path"]), record["weights"].get("gguf_file"))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(location.directory), **location.load_kwargs()).to_dict()


def _row(entries: list[dict], label: str) -> dict:
    return next(e for e in entries if e["label"].endswith(label))


def summary(results: dict) -> str:
    ttft, decode, genai = (results[k]["entries"] for k in ("ttft", "decode", "genai"))
    decode16 = results["decode-w16"]["entries"]
    fast = _row(ttft, "fastv-0.5")
    ideal = results["fastv_flop_ideal_1536"]
    snap = _row(decode, "snapkv-256")
    snap16 = _row(decode16, "snapkv-256-w16")
    lines = ["| measure | value |", "|---|---|",
             f"| FastV keep 0.5 @2, 1,536-token prompt: TTFT base / fastv | {ttft[0]['ttft_ms']:.0f} ms / "
             f"{fast['ttft_ms']:.0f} ms = {fast['ttft_speedup']:.2f}x (FLOP-ideal {ideal:.2f}x: "
             f"{(fast['ttft_speedup'] - 1) / (ideal - 1):.0%} of the ideal gain, {fast['ttft_speedup'] / ideal:.0%} "
             "of the ideal speedup) |",
             f"| SnapKV 256 at 2,048 tokens: decode tokens/s base / snapkv | {decode[0]['decode_tokens_per_s']:.1f} / "
             f"{snap['decode_tokens_per_s']:.1f} = {snap['decode_speedup']:.2f}x; peak KV {snap['kv_ratio']:.1%} of base |",
             f"| SnapKV 256, window 16, at 2,048 tokens | {snap16['decode_tokens_per_s']:.1f} tokens/s = "
             f"{snap16['decode_speedup']:.2f}x; peak KV {snap16['kv_ratio']:.1%} of base |"]
    peer = [e for e in genai if e["label"] == "onnxruntime-genai"]
    if peer:
        ours = genai[0]
        lines.append(f"| uncompressed at 512 tokens: tcexport / onnxruntime-genai | TTFT {ours['ttft_ms']:.0f} / "
                     f"{peer[0]['ttft_ms']:.0f} ms; decode {ours['decode_tokens_per_s']:.1f} / "
                     f"{peer[0]['decode_tokens_per_s']:.1f} tokens/s |")
    lines += ["", "| compressed | next-token agreement | perplexity change | greedy answers identical |",
              "|---|---|---|---|"]
    for name, f in results["fidelity"].items():
        lines.append(f"| {name} ({f['prompt_len']}-token prompts) | {f['next_token_agreement']:.3f} | "
                     f"{f['perplexity_change']:+.2%} | {f['greedy_agreement']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
