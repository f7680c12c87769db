"""`tcexport bench` on decoder graphs: time to first token and decode speed, base and compressed side by side.

Each artifact generates `new_tokens` greedy tokens after a prompt of each `--prompt-len` (random ids, the same for
every artifact; EOS does not stop a timed run). Runs are interleaved (one generation of each artifact in turn,
`repeats` rounds), so machine drift hits all artifacts alike. Reported per artifact and prompt length: TTFT (the
prefill, minimum over rounds), decode tokens/s (the best round), peak KV bytes and the ratios to the first
artifact. When onnxruntime-genai is installed and the first artifact's folder has a genai_config.json, the same
prompts through onnxruntime-genai's own loop are a peer row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from tcexport.core import artifacts as artifacts_mod
from tcexport.core.errors import UsageError
from tcexport.generation import loop, policies
from tcexport.generation.run import decoder_records, is_decoder_artifact as is_decoder, refuse_embeds_input  # noqa: F401


def run(paths: list[Path], prompt_lens: list[int], new_tokens: int = 32, repeats: int = 3,
        threads: int | None = None, seed: int = 0, genai: bool = True) -> dict:
    from tcexport.generation.runners import OrtRunner

    loaded = []
    for path in paths:
        artifact, source, compression = decoder_records(path)
        refuse_embeds_input(path, source)
        loaded.append((artifact, source, compression, OrtRunner(artifact.model_path, threads=threads)))
    shapes = {a.path: s["info"]["decoder"] for a, s, _, _ in loaded}
    vocab = min(shape["vocab_size"] for shape in shapes.values())
    context = min(shape["context"] for shape in shapes.values())
    for length in prompt_lens:
        if length + new_tokens > context:
            raise UsageError(f"--prompt-len {length} plus --new-tokens {new_tokens} is longer than the context "
                             f"({context})")
    rng = np.random.default_rng(seed)
    prompts = {length: rng.integers(0, vocab, length).tolist() for length in prompt_lens}
    peer = _genai_peer(loaded[0][0], threads) if genai else None
    rows: dict[tuple[str, int], list] = {}
    for _ in range(repeats):
        for length in prompt_lens:
            for artifact, _, compression, runner in loaded:
                result = loop.generate(runner, [prompts[length]], new_tokens, policy=policies.from_record(compression))
                rows.setdefault((artifact.label, length), []).append(result)
            if peer is not None:
                rows.setdefault(("onnxruntime-genai", length), []).append(peer(prompts[length], new_tokens))
    entries = []
    for (label, length), results in rows.items():
        entries.append({"label": label, "prompt_len": length, "new_tokens": new_tokens,
                        "ttft_ms": min(r.ttft_ms for r in results),
                        "decode_tokens_per_s": max(r.decode_tokens_per_s for r in results),
                        "kv_bytes": max(r.kv_bytes for r in results), "rounds": len(results)})
    for entry in entries:
        base = next(e for e in entries if e["prompt_len"] == entry["prompt_len"])
        entry["ttft_speedup"] = base["ttft_ms"] / entry["ttft_ms"]
        entry["decode_speedup"] = entry["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        entry["kv_ratio"] = entry["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] and entry["kv_bytes"] else None
    return {"kind": "decoder", "threads": threads, "repeats": repeats, "entries": entries}


def _genai_peer(artifact: artifacts_mod.Artifact, threads: int | None):
    """onnxruntime-genai's loop over the same graph, timed as ours is; None when it cannot run here."""
    folder = artifact.model_path.parent
    if not (folder / "genai_config.json").is_file():
        return None
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    config = og.Config(str(folder))
    if threads and hasattr(config, "overlay"):  # the same thread count as our sessions
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def generate(prompt: list[int], new_tokens: int) -> loop.Generation:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                                  do_sample=False, batch_size=1)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))  # the prefill
        generator.generate_next_token()  # the first token, as our TTFT counts it
        first = time.perf_counter()
        steps = 1
        while not generator.is_done() and steps < new_tokens:
            generator.generate_next_token()
            steps += 1
        end = time.perf_counter()
        result = loop.Generation([prompt])
        result.ttft_ms = (first - start) * 1000
        result.decode_tokens_per_s = (steps - 1) / (end - first) if steps > 1 else 0.0
        return result

    return generate


def format_lines(results: dict) -> list[str]:
    lines = [f"{'artifact':<28} {'prompt':>7} {'TTFT ms':>9} {'x':>6} {'decode tok/s':>13} {'x':>6} "
             f"{'KV MiB':>8} {'KV x':>6}"]
    for e in results["entries"]:
        kv = f"{e['kv_bytes'] / 2**20:8.2f}" if e["kv_bytes"] else f"{'-':>8}"
        kv_ratio = f"{e['kv_ratio']:6.2f}" if e["kv_ratio"] is not None else f"{'-':>6}"
        lines.append(f"{e['label'][:28]:<28} {e['prompt_len']:>7} {e['ttft_ms']:9.1f} {e['ttft_speedup']:6.2f} "
                     f"{e['decode_tokens_per_s']:13.1f} {e['decode_speedup']:6.2f} {kv} {kv_ratio}")
    lines.append(f"min TTFT and best decode speed over {results['repeats']} interleaved rounds; x: against the first "
                 "row of the same prompt length")
    return lines
