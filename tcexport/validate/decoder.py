"""`tcexport validate` on a decoder graph: the graph's generation loop against transformers' own, stage for stage.

The reference is the source model rebuilt from the file's provenance (weights checked by hash), run by
tcexport/reference/decoder.py with the same stages at the same layers and the same cache policy. For each
sample (a batch of prompts of different lengths, so rows are left-padded; random token ids, seeded) it compares
  - the prefill's last-position logits: max abs error <= atol;
  - the greedy tokens for `new_tokens` steps: identical, or they part where the reference's two best logits
    are within atol of each other (a near-tie: reported, not a failure).
It also reports, as information, how often the compressed reference's tokens agree with the uncompressed model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tcexport.core.atomic import atomic_file, check_writable
from tcexport.compress.decoder import stages_of
from tcexport.generation.run import decoder_records, is_decoder_artifact as is_decoder_file  # noqa: F401
from tcexport.core.errors import UsageError, ValidationFailed

DEFAULT_ATOL = 1e-3
DEFAULT_NEW_TOKENS = 8
PROMPT_LENGTHS = ((24, 17), (40, 31), (33,))  # per sample: one batch; rows shorter than the longest are padded


@dataclass
class DecoderReport:
    model: str
    atol: float
    new_tokens: int
    samples: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s["ok"] for s in self.samples)

    def to_json(self) -> dict:
        return {"model": self.model, "kind": "decoder", "atol": self.atol, "new_tokens": self.new_tokens,
                "passed": self.passed, "samples": self.samples}


def _first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return k
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def validate(path: Path, samples: int = 3, seed: int = 0, atol: float | None = None,
             new_tokens: int = DEFAULT_NEW_TOKENS) -> DecoderReport:
    from tcexport.generation import loop, policies
    from tcexport.generation.runners import OrtRunner
    from tcexport.models import sources
    from tcexport.reference import decoder as reference

    artifact, record, compression = decoder_records(path)
    stages, decode_policies, cache_methods = stages_of(compression)
    source = sources.load_from_record(record)
    hf_model = source.model.model
    shape = record["info"]["decoder"]
    atol = DEFAULT_ATOL if atol is None else atol
    runner = OrtRunner(artifact.model_path)
    graph_policy = policies.from_record(compression)
    torch_policy = reference.policy_from_record(compression)
    rng = np.random.default_rng(seed)
    report = DecoderReport(str(path), atol, new_tokens)
    for index in range(samples):
        lengths = PROMPT_LENGTHS[index % len(PROMPT_LENGTHS)]
        for method in [s.method for s in stages] + cache_methods:
            method.check_prompt(min(lengths))
        prompts = [rng.integers(0, shape["vocab_size"], n).tolist() for n in lengths]
        ours = loop.generate(runner, prompts, new_tokens, policy=graph_policy, embed=table_embedding(hf_model))
        theirs = reference.generate(hf_model, stages, prompts, new_tokens, policy=torch_policy,
                                    cache_methods=cache_methods)
        compressed = stages or decode_policies or cache_methods
        base = reference.generate(hf_model, [], prompts, new_tokens) if compressed else theirs
        logits_err = float(np.abs(ours.first_logits - theirs["first_logits"]).max())
        rows = []
        for row in range(len(prompts)):
            split = _first_divergence(ours.tokens[row], theirs["tokens"][row])
            agree = float(np.mean([a == b for a, b in zip(theirs["tokens"][row], base["tokens"][row])]))
            rows.append({"prompt_len": lengths[row], "tokens_equal": split is None, "first_divergence": split,
                         "agreement_with_uncompressed": agree})
        near_tie = False
        if any(not r["tokens_equal"] for r in rows):
            # A split right at the prefill's near-tie is the only excused one (later steps are not compared).
            top2 = np.sort(theirs["first_logits"], axis=-1)[:, -2:]
            near_tie = all(r["tokens_equal"] or (r["first_divergence"] == 0 and top2[k, 1] - top2[k, 0] <= atol)
                           for k, r in enumerate(rows))
        ok = logits_err <= atol and (all(r["tokens_equal"] for r in rows) or near_tie)
        report.samples.append({"index": index, "batch": len(prompts), "prompt_lengths": list(lengths),
                               "prefill_logits_max_abs": logits_err, "rows": rows, "near_tie": near_tie,
                               "ok": ok, "cache_lengths": ours.cache_lengths})
    return report


def format_report(report: DecoderReport) -> str:
    lines = [f"validate {report.model}: decoder, {len(report.samples)} samples, prefill logits atol {report.atol:g}, "
             f"greedy tokens for {report.new_tokens} steps must be identical"]
    for sample in report.samples:
        flag = "ok" if sample["ok"] else "FAILED"
        tokens = "tokens identical" if all(r["tokens_equal"] for r in sample["rows"]) else (
            "tokens part at a near-tie" if sample["near_tie"] else "TOKENS DIFFER")
        agree = ", ".join(f"{r['agreement_with_uncompressed']:.2f}" for r in sample["rows"])
        lines.append(f"  sample {sample['index']} (prompts of {', '.join(map(str, sample['prompt_lengths']))} "
                     f"tokens) [{flag}]: prefill logits max abs {sample['prefill_logits_max_abs']:.2e}, {tokens}; "
                     f"agreement with the uncompressed model (information): {agree}")
    lines.append(f"{'PASSED' if report.passed else 'FAILED'}: "
                 f"{sum(not s['ok'] for s in report.samples)} failing sample(s)")
    return "\n".join(lines)


def run(path: Path, json_path: Path | None = None, **options) -> DecoderReport:
    if json_path:
        check_writable(json_path, "--json")
    report = validate(path, **options)
    if json_path:
        with atomic_file(json_path) as tmp:
            Path(tmp).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if not report.passed:
        raise ValidationFailed(format_report(report), report.to_json())
    return report


def table_embedding(hf_model):
    """ids -> the model's own token embeddings, for a graph that takes inputs_embeds (the loop embeds each step's
    tokens; a VLM's embedding graph does the same with image features spliced in)."""
    import torch

    table = hf_model.get_input_embeddings()

    def embed(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return table(torch.as_tensor(ids)).numpy()

    return embed

