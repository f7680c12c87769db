#!/usr/bin/env python
"""How far ToMe moves all-MiniLM-L6-v2's embeddings on real text that fills the whole 128-token sequence.

    python scripts/minilm_fidelity.py [--out out/minilm_fidelity] [--r 2,3,4,5,6,7,8,9,10]

For each r (ToMe on all 6 layers), embeds the project's sample paragraphs (each pair joined and truncated to
128 tokens, so there is no padding to merge away) with the uncompressed and the compressed ONNX model on ONNX
Runtime, and reports the cosine between the two embeddings (mean and worst), plus retrieval: for one query per
paragraph (embedded uncompressed), whether the compressed paragraph embeddings still rank the right text first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sentence_transformers import SentenceTransformer

from tcexport import data
from tcexport.compress import rewrite as compress
from tcexport.export import exporter as export
from tcexport.models import sources


def filled_texts() -> list[str]:
    paragraphs = data.paragraphs()
    return [paragraphs[i] + " " + paragraphs[(i + 1) % len(paragraphs)] for i in range(len(paragraphs))]


def embed(path: Path, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/minilm_fidelity", type=Path)
    parser.add_argument("--r", default="2,3,4,5,6,7,8,9,10")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "minilm.onnx"
    if not base.exists():
        export.export_to_file(sources.load("st:all-MiniLM-L6-v2", seq_len=128), base)
    tokenizer = SentenceTransformer(str(sources.resolve_st_path("all-MiniLM-L6-v2")), device="cpu").tokenizer

    def encode(texts):
        enc = tokenizer(texts, padding="max_length", max_length=128, truncation=True, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    texts = filled_texts()
    feeds = encode(texts)
    assert feeds["attention_mask"].sum(1).min() == 128, "the texts must fill the sequence"
    reference = embed(base, feeds)
    query_embeddings = embed(base, encode(data.queries()))
    truth = np.arange(len(texts))
    base_hits = float(np.mean((query_embeddings @ reference.T).argmax(1) == truth))

    rows = []
    for r in (int(v) for v in args.r.split(",")):
        path = args.out / f"minilm_tome_r{r}.onnx"
        schedule = compress.compress_file(base, path, r=str(r))
        got = embed(path, feeds)
        cosine = np.sum(got * reference, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
        hits = float(np.mean((query_embeddings @ got.T).argmax(1) == truth))
        rows.append({"r": r, "tokens_last_block": schedule[-1]["out"],
                     "tokens_removed": 128 - schedule[-1]["out"],
                     "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                     "retrieval_top1": hits})
    (args.out / "results.json").write_text(json.dumps({"texts": len(texts), "retrieval_top1_uncompressed": base_hits,
                                                       "rows": rows}, indent=2))
    print(f"uncompressed retrieval top-1: {100 * base_hits:.0f}%")
    print("| r | tokens after block 5 | cosine mean | cosine min | retrieval top-1 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['r']} | {row['tokens_last_block']} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} | "
              f"{100 * row['retrieval_top1']:.0f}% |")


if __name__ == "__main__":
    main()
