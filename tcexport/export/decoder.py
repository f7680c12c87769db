"""Causal LM -> one ONNX decoder graph with a KV cache, in the I/O layout ONNX Runtime GenAI and Optimum read.

    inputs   input_ids [batch, seq], attention_mask [batch, total], position_ids [batch, seq],
             past_key_values.{i}.key / .value [batch, kv_heads, past_i, head_dim]
    outputs  logits [batch, 1 (or seq with all_logits), vocab], present.{i}.key / .value [batch, kv_heads, ., head_dim]

The same graph runs the prefill (past 0) and every decode step. Batch, sequence, past and total length are
dynamic (separate torch.export Dims). Each layer's cache is its own input, so layers may hold caches of different
lengths (sliding-window layers, FastV's pruned layers, SnapKV budgets): the generation loop feeds each present
back as that layer's past. The wrapper fills transformers' own DynamicCache (built from the model's config, so
sliding-window layers behave as in transformers' generate) and returns what the cache holds after the step.
"""

from __future__ import annotations

import torch

from tcexport.models.causal import DecoderShape, DecoderWithCache, input_names, output_names, past_names

EXAMPLE = {"batch": 2, "seq": 5, "past": 3}  # torch.export specialises dims of size 0 and 1
MAX_LEN = 131072


def example_inputs(shape: DecoderShape, batch: int, seq: int, past: int, seed: int = 0,
                   left_padding: int = 0, embed=None) -> tuple:
    """Random ids (or, with `embed`, their embeddings embed(ids)), a mask (its first `left_padding` positions of
    row 0 padded), positions that skip the padding, and a random cache of `past` positions."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size, (batch, seq), generator=generator)
    if embed is not None:
        with torch.no_grad():
            ids = embed(ids).detach()
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    mask[0, :left_padding] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    cache = tuple(torch.randn(batch, shape.kv_heads, past, shape.head_dim, generator=generator)
                  for _ in range(2 * shape.layers))
    return ids, mask, positions, cache


def export_program(wrapper: DecoderWithCache, shape: DecoderShape, opset: int):
    """torch.onnx (dynamo) export of the wrapper with dynamic batch, sequence, past and total length."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=MAX_LEN)
    total = torch.export.Dim("total", min=1, max=2 * MAX_LEN)
    example = example_inputs(shape, EXAMPLE["batch"], EXAMPLE["seq"], EXAMPLE["past"], embed=embedder(wrapper))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past} for past in past_dims(wrapper, shape) for _ in ("key", "value")))
    return torch.onnx.export(wrapper, example, dynamo=True, opset_version=opset,
                             input_names=input_names(shape.layers, wrapper.token_input),
                             output_names=output_names(shape.layers),
                             dynamic_shapes=dynamic, verbose=False)


def past_dims(wrapper: DecoderWithCache, shape: DecoderShape) -> list:
    """One past-length Dim for all layers ("past"), or one per layer ("past_0", ...) when some layers keep a
    sliding-window cache and others the whole context (Gemma-2/3): their pasts differ in length, and one shared
    Dim would make the graph require them equal (ORT: "invalid expand shape" at the first decode step)."""
    from transformers import DynamicCache

    sliding = DynamicCache(config=wrapper.model.config).is_sliding[: shape.layers]
    if len(set(sliding)) <= 1:
        return [torch.export.Dim("past", min=0, max=MAX_LEN)] * shape.layers
    return [torch.export.Dim(f"past_{i}", min=0, max=MAX_LEN) for i in range(shape.layers)]


def embedder(wrapper: DecoderWithCache):
    """The model's token embedding when the wrapper takes inputs_embeds, else None."""
    return wrapper.model.get_input_embeddings() if wrapper.token_input == "inputs_embeds" else None


def feeds_of(inputs: tuple, layers: int) -> dict:
    ids, mask, positions, cache = inputs
    token_input = "inputs_embeds" if ids.is_floating_point() else "input_ids"
    feeds = {token_input: ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({name: tensor.numpy() for name, tensor in zip(past_names(layers), cache)})
    return feeds


# The post-export check: a prefill with left padding in one row, and a decode step with a cache.
CHECK_CASES = ({"batch": 2, "seq": 7, "past": 0, "left_padding": 2}, {"batch": 3, "seq": 1, "past": 9})
