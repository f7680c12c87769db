"""`tcexport validate COMPRESSED --reference-onnx BASE` on decoders: how close a compressed decoder stays to the
uncompressed one on real text (a FIDELITY report: compression changes outputs by design).

The text (the user's --text-file, paragraphs separated by blank lines, or tcexport's bundled paragraphs) is
tokenized once into one stream; evaluation points are spread over it. At each point the prompt is the
`prompt_len` tokens before it and the continuation the `continuation` tokens after it. Both graphs read the prompt
(each with its own compression) and are then fed the true continuation (teacher forcing). Reported:
  - next-token agreement: the share of continuation positions where both graphs' top token is the same;
  - perplexity of the continuation under each graph, and its relative change;
  - greedy agreement: from each prompt both generate `continuation` tokens greedily; the share of points whose
    greedy answers are identical, and the mean share of identical leading tokens.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from tcexport.core.atomic import atomic_file, check_writable
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.generation import loop, policies, prompts
from tcexport.generation.run import decoder_records, refuse_embeds_input


def text_stream(tokenizer, text_file: Path | None) -> list[int]:
    if text_file is not None:
        if not Path(text_file).is_file():
            raise UsageError(f"--text-file {text_file}: no such file")
        text = Path(text_file).read_text(encoding="utf-8")
    else:
        text = resources.files("tcexport.data").joinpath("paragraphs.txt").read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return [int(i) for i in tokenizer("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"]]


def points(stream_len: int, prompt_len: int, continuation: int, count: int) -> list[int]:
    """Up to `count` evaluation points with a whole prompt before and a whole continuation after each."""
    first, last = prompt_len, stream_len - continuation
    if last < first:
        raise UsageError(f"the text has {stream_len} tokens: too short for a {prompt_len}-token prompt and a "
                         f"{continuation}-token continuation; give a longer --text-file or a shorter --prompt-len")
    return sorted(set(np.linspace(first, last, num=count).astype(int).tolist()))


def run(model: Path, reference: Path, text_file: Path | None = None, prompt_len: int | None = None,
        continuation: int = 16, count: int = 6, threads: int | None = None, json_path: Path | None = None,
        min_agreement: float | None = None) -> dict:
    from tcexport.compress.decoder import stages_of
    from tcexport.generation.runners import OrtRunner

    if json_path is not None:
        check_writable(json_path, "--json")
    graphs = []
    for path in (reference, model):
        artifact, source, compression = decoder_records(path)
        refuse_embeds_input(path, source)
        graphs.append((artifact, source, compression, OrtRunner(artifact.model_path, threads=threads)))
    if graphs[0][1].get("weights", {}).get("sha256") != graphs[1][1].get("weights", {}).get("sha256"):
        raise UsageError(f"{model} and {reference} come from different weights; compare a compressed graph with "
                         "the export it was compressed from")
    tokenizer = prompts.tokenizer_for(graphs[0][1])
    if tokenizer is None:
        raise UsageError("the decoder was exported without a tokenizer; fidelity reads text through it")
    stream = text_stream(tokenizer, text_file)
    stages, _, cache_methods = stages_of(graphs[1][2])
    need = max([m.params.get("budget", 0) + m.params.get("window", 0) + 1 for m in cache_methods] + [16])
    prompt_len = prompt_len or max(need, min(1024, 2 * (len(stream) - continuation) // 3))  # room for points
    for method in [s.method for s in stages] + cache_methods:
        method.check_prompt(prompt_len)
    rows = []
    for point in points(len(stream), prompt_len, continuation, count):
        prompt, truth = stream[point - prompt_len:point], stream[point:point + continuation]
        scored = [loop.generate(runner, [prompt], continuation, forced=[truth],
                                policy=policies.from_record(compression)) for _, _, compression, runner in graphs]
        greedy = [loop.generate(runner, [prompt], continuation, policy=policies.from_record(compression))
                  for _, _, compression, runner in graphs]
        base, ours = scored
        same = [a == b for a, b in zip(base.argmax[0], ours.argmax[0])]
        leading = next((k for k, (a, b) in enumerate(zip(*[g.tokens[0] for g in greedy])) if a != b),
                       min(len(g.tokens[0]) for g in greedy))
        rows.append({"point": point, "next_token_agreement": float(np.mean(same)),
                     "perplexity_base": float(np.exp(-np.mean(base.logprobs[0]))),
                     "perplexity": float(np.exp(-np.mean(ours.logprobs[0]))),
                     "greedy_identical": greedy[0].tokens[0] == greedy[1].tokens[0],
                     "greedy_leading_share": leading / max(1, len(greedy[0].tokens[0]))})
    ppl_base = float(np.exp(np.mean([np.log(r["perplexity_base"]) for r in rows])))
    ppl = float(np.exp(np.mean([np.log(r["perplexity"]) for r in rows])))
    report = {"kind": "decoder_fidelity", "model": str(model), "reference": str(reference),
              "prompt_len": prompt_len, "continuation": continuation, "points": rows,
              "next_token_agreement": float(np.mean([r["next_token_agreement"] for r in rows])),
              "perplexity_base": ppl_base, "perplexity": ppl, "perplexity_change": ppl / ppl_base - 1,
              "greedy_agreement": float(np.mean([r["greedy_identical"] for r in rows])),
              "greedy_leading_share": float(np.mean([r["greedy_leading_share"] for r in rows]))}
    if json_path is not None:
        with atomic_file(json_path) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    if min_agreement is not None and report["next_token_agreement"] < min_agreement:
        raise ValidationFailed(format_report(report), report)
    return report


def format_report(report: dict) -> str:
    return (f"FIDELITY of {report['model']} vs {report['reference']} on {len(report['points'])} points of the text "
            f"({report['prompt_len']}-token prompts, {report['continuation']}-token continuations; how close, not an "
            f"equality check): next-token agreement {report['next_token_agreement']:.3f}, perplexity "
            f"{report['perplexity_base']:.3f} -> {report['perplexity']:.3f} ({report['perplexity_change']:+.2%}), "
            f"greedy answers identical {report['greedy_agreement']:.2f} (leading tokens shared "
            f"{report['greedy_leading_share']:.2f})")
