"""Before compress writes a graph: can `validate` check it? Build the eager reference from the file's provenance and
run the plan once, so a model the reference cannot cover is refused with its reason instead of written.

The check is skipped (returns None) only when the source cannot be rebuilt on this machine (weights not here):
then validate cannot run here either, and the file may still be validated where the weights are.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from tcexport.core.errors import UsageError


@lru_cache(maxsize=4)
def _source(record_json: str):
    from tcexport.models import sources

    return sources.load_from_record(json.loads(record_json))


def cached_source(record: dict):
    """sources.load_from_record, once per record in this process: compress's check and validate share it (the
    reference deep-copies the model, so sharing is safe)."""
    return _source(json.dumps(record, sort_keys=True))


def check(source_record: dict | None, plan: dict, prop_attn: bool, protected: int, schedule: list[dict],
          extra_inputs: list[dict] = ()) -> bool | None:
    """True when the reference covers the plan and removes the same tokens per block as the graph; UsageError when
    it cannot; None when there is no source to check against. `extra_inputs`: the specs of inputs compression
    added (the compression record's), fed by name as validate feeds them."""
    if not source_record:
        return None
    try:
        source = cached_source(source_record)
    except UsageError:
        return None
    from tcexport.reference import compressed_reference

    reference = compressed_reference(source, plan, prop_attn=prop_attn, protected=protected)
    graph_counts = [(block["in"], block["out"]) for block in schedule]
    if reference.layout.blocks != len(graph_counts):
        raise UsageError(f"the PyTorch reference of {source.spec} finds {reference.layout.blocks} attention blocks "
                         f"where the graph has {len(graph_counts)}; validate could not check this compression, so "
                         "tcexport does not write it")
    from tcexport.models.inputs import InputSpec, random_feeds

    specs = [InputSpec.from_json(spec) for spec in extra_inputs]
    extra = {name: torch.from_numpy(value) for name, value in random_feeds(specs, 2, 1).items()}
    with torch.no_grad():
        reference(*source.example_inputs(2, seed=1), **extra)
    if reference.token_counts != graph_counts:
        raise UsageError(f"the PyTorch reference of {source.spec} keeps {[c[1] for c in reference.token_counts]} "
                         f"tokens per block where the graph keeps {[c[1] for c in graph_counts]}; validate could not "
                         "check this compression, so tcexport does not write it")
    return True
