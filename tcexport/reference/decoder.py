"""The eager reference of decoder stages: transformers' own forward, with the same selection at the same places.

Patch points, found on any transformers causal LM by what they are rather than by family:
  - the decoder layers: the first ModuleList whose entries are called once per layer (model.model.layers,
    transformer.h, ...);
  - layer L's attention module (the child whose forward returns (output, attention probabilities) under
    eager attention): a forward hook reads the probabilities and runs the method's `select`;
  - layer L itself: a forward hook gathers its output hidden states at the kept indices;
  - every later layer: a forward pre-hook gathers what the model computed once for the whole chunk and hands to
    each layer: tensors [B, n, ...] (rotary cos/sin, position ids) at the kept tokens, the attention bias
    [B, 1, n, total] at the kept rows and at the group's key positions (its cache's original positions plus the
    kept tokens').
The cache is transformers' DynamicCache, whose layers simply hold what they were given, so later layers' caches
are shorter. This is what tcexport/graph/decoder_prune.py does in the graph, written against the model instead.

Masks are gathered by original position, so a sliding-window layer keeps its window over the surviving tokens'
original slots (the rule decoder_prune.py follows too). For that the masks transformers builds must cover the
original slots: it sizes each mask type by the first cache layer of that type, which may be a pruned one (Gemma-2's
first global layer after fastv@0) or may differ from a pruned windowed layer's (kept tokens are fewer than slots);
so while a step runs, the cache answers get_mask_sizes / get_query_offset for a pruned layer as that layer would
unpruned (its own class's code on a stand-in holding the whole sequence's past). A mask [B, 1, n, K] then covers
the last K slots of the sequence; a layer's keys are the last (its cache + kept tokens) of its group's key
positions, and a key outside the mask's slots is masked (outside its window).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from tcexport.core.errors import UsageError
from tcexport.models.causal import cache_kwarg


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The causal LM's list of decoder layers (the longest ModuleList of identical blocks)."""
    best = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise UsageError(f"{type(model).__name__}: found no list of decoder layers")
    return best


def attention_of(layer: torch.nn.Module) -> torch.nn.Module:
    for name in ("self_attn", "attn", "attention", "self_attention"):
        module = getattr(layer, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UsageError(f"{type(layer).__name__}: found no attention module (self_attn, attn, ...)")


@dataclass
class _Step:
    n_prompt: int = 0  # tokens in this call
    past_full: int = 0  # the full sequence's cache length before this call
    kept: list = field(default_factory=list)  # per stage: indices into this call's tokens [B, n_s]
    local: list = field(default_factory=list)  # per stage: indices into the previous stage's tokens
    keys: list = field(default_factory=list)  # per stage: this call's key positions [B, past_s + n_s]


class PrunedDecoder:
    """A transformers causal LM with decoder stages applied through hooks; `step` runs one forward."""

    def __init__(self, model: torch.nn.Module, stages: list, cache_methods: list = ()):
        self.model, self.stages = model, sorted(stages, key=lambda s: s.layer)
        self.cache_methods = list(cache_methods)
        self.layers = decoder_layers(model)
        self.probs: dict[int, torch.Tensor] = {}
        self.key_positions: list[torch.Tensor | None] = [None] * len(self.stages)  # per group, across steps
        self.now = _Step()
        self.handles = []
        depth = len(self.layers)
        for s, stage in enumerate(self.stages):
            if stage.layer >= depth - 1:
                raise UsageError(f"{stage.method.name}@{stage.layer}: the decoder has {depth} layers")
            self.handles.append(attention_of(self.layers[stage.layer]).register_forward_hook(self._scores_hook(s)))
            self.handles.append(self.layers[stage.layer].register_forward_hook(self._gather_hook(s)))
            end = self.stages[s + 1].layer if s + 1 < len(self.stages) else depth - 1
            for j in range(stage.layer + 1, end + 1):
                self.handles.append(self.layers[j].register_forward_pre_hook(
                    self._inputs_hook(s, j == stage.layer + 1, j), with_kwargs=True))
        if self.stages:
            self.handles.append(self.layers[depth - 1].register_forward_hook(self._restore_length_hook))
        if self.cache_methods:
            for i, layer in enumerate(self.layers):
                self.handles.append(attention_of(layer).register_forward_hook(self._probs_hook(i)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def reset(self) -> None:
        self.key_positions = [None] * len(self.stages)

    def step(self, ids, mask, positions, cache):
        self.now = _Step(n_prompt=ids.shape[1], past_full=mask.shape[1] - ids.shape[1])
        self.cache = cache
        sizes, offset = cache.get_mask_sizes, cache.get_query_offset

        def mask_sizes(query_length, layer_idx):
            shadow = self._unpruned(cache, layer_idx)
            return sizes(query_length, layer_idx) if shadow is None else shadow.get_mask_sizes(query_length)

        def query_offset(layer_idx=0):
            shadow = self._unpruned(cache, layer_idx)
            return offset(layer_idx) if shadow is None else shadow.get_seq_length()

        cache.get_mask_sizes, cache.get_query_offset = mask_sizes, query_offset
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             **{cache_kwarg(self.model): cache}, use_cache=True)
        finally:
            del cache.get_mask_sizes, cache.get_query_offset  # back to the class's methods
        if self.now.past_full == 0:
            for method in self.cache_methods:  # SnapKV: every layer's cache, at the end of the prefill
                for i, layer in enumerate(cache.layers[: len(self.layers)]):
                    index = method.select_cache(self.probs[i], mask, layer.keys.shape[1])
                    rows = index[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                    layer.keys, layer.values = layer.keys.gather(2, rows), layer.values.gather(2, rows)
        return out.logits

    def _unpruned(self, cache, layer_idx: int):
        """A stand-in for a pruned layer's cache layer holding the whole sequence's past (its class's own size
        rules then apply to the original slots); None for a layer no stage prunes."""
        if not self.stages or layer_idx <= self.stages[0].layer or layer_idx >= len(cache.layers):
            return None
        shadow = copy.copy(cache.layers[layer_idx])
        past = self.now.past_full
        shadow.keys = shadow.values = torch.empty(1, 1, past, 1)
        shadow.is_initialized = True
        if hasattr(shadow, "cumulative_length"):
            shadow.cumulative_length = past
        return shadow

    def _probs_hook(self, i: int):
        def hook(module, args, output):
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                self.probs[i] = output[1]

        return hook

    # -- hooks
    def _scores_hook(self, s: int):
        def hook(module, args, output):
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise UsageError("the attention module returned no probabilities; load the model with "
                                 "attn_implementation='eager'")
            scores = probs[:, :, -1, :].mean(dim=1)[:, -probs.shape[2]:]
            prefill = self.now.past_full == 0
            index = self.stages[s].method.select(scores, self.now.n_prompt, prefill)
            previous = self.now.kept[s - 1] if s > 0 else None
            self.now.local.append(index)
            self.now.kept.append(index if previous is None else previous.gather(1, index))

        return hook

    def _gather_hook(self, s: int):
        def hook(module, args, output):
            index = self.now.local[s]
            hidden = output[0] if isinstance(output, tuple) else output
            gathered = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            return (gathered, *output[1:]) if isinstance(output, tuple) else gathered

        return hook

    def _restore_length_hook(self, module, args, output):
        """After the last layer, the kept tokens go back to a tensor of the call's length, right-aligned (zeros in
        front): some forwards view the final hidden states at the input's shape (GPT2Model), and the last row stays
        the last kept token's, the row the graph's logits come from."""
        hidden = output[0] if isinstance(output, tuple) else output
        missing = self.now.n_prompt - hidden.shape[1]
        if missing <= 0:
            return output
        restored = torch.cat([hidden.new_zeros(hidden.shape[0], missing, hidden.shape[-1]), hidden], dim=1)
        return (restored, *output[1:]) if isinstance(output, tuple) else restored

    def _inputs_hook(self, s: int, first: bool, j: int):
        def hook(module, args, kwargs):
            kept = self.now.kept[s]
            if first:
                past = self.key_positions[s]
                now = kept + self.now.past_full
                self.now.keys.append(now if past is None else torch.cat([past, now], dim=1))
                self.key_positions[s] = self.now.keys[s]
            n, total = self.now.n_prompt, self.now.past_full + self.now.n_prompt
            # This layer's keys: its cache (a windowed layer keeps the last window - 1 of its group's) + kept tokens.
            layer_cache = self.cache.layers[j] if j < len(self.cache.layers) else None
            cached = layer_cache.keys.shape[-2] if layer_cache is not None and layer_cache.is_initialized else 0
            keys = self.now.keys[s][:, -(cached + kept.shape[1]):]

            def follow(value):
                if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
                    return tuple(follow(v) for v in value)
                if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != kept.shape[0]:
                    return value
                if value.dim() == 4 and value.shape[-2] == n and value.shape[-1] <= total:  # the attention bias
                    rows = value.gather(2, kept[:, None, :, None].expand(-1, value.shape[1], -1, value.shape[-1]))
                    column = keys - (total - value.shape[-1])  # the mask covers the last K slots
                    inside = (column >= 0)[:, None, None, :]
                    gathered = rows.gather(3, column.clamp(min=0)[:, None, None, :].expand(
                        -1, value.shape[1], rows.shape[2], -1))
                    never = False if gathered.dtype == torch.bool else torch.finfo(gathered.dtype).min
                    return gathered.masked_fill(~inside, never)
                if value.shape[1] == n:  # per-token tensors: rotary cos/sin, position ids
                    index = kept.reshape(*kept.shape, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:])
                    return value.gather(1, index)
                return value

            hidden, rest = args[0], args[1:]
            return (hidden, *(follow(a) for a in rest)), {k: follow(v) for k, v in kwargs.items()}

        return hook


def policy_from_record(compression: dict | None):
    """The between-steps cache policy of a compression record, acting on transformers' DynamicCache (the same
    rules tcexport/generation/policies.py applies to the graph's state)."""
    from tcexport.methods.streaming import streaming_keep

    if (compression or {}).get("cache_stages"):
        def reset_mask(cache, mask):  # a prefill that compressed the cache: its mask is all real positions
            length = cache.layers[0].keys.shape[2]
            if length < mask.shape[1] - 1:
                return cache, torch.ones(mask.shape[0], length + 1, dtype=mask.dtype)
            return cache, mask

        return reset_mask
    for stage in (compression or {}).get("decode_policies", []):
        if stage["method"] == "streaming":
            sink, window = int(stage["params"]["sink"]), int(stage["params"]["window"])

            def trim(cache, mask):
                keep = streaming_keep(mask.shape[1] - 1, sink, window)
                if keep is None:
                    return cache, mask
                index = torch.as_tensor(keep)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]
                return cache, torch.cat([mask[:, index], mask[:, -1:]], dim=1)

            return trim
    return None


def left_pad(prompts: list[list[int]], pad_id: int):
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), longest), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def generate(model: torch.nn.Module, stages: list, prompts: list[list[int]], max_new_tokens: int,
             eos_ids: tuple[int, ...] = (), pad_id: int = 0, policy=None, cache_methods: list = ()) -> dict:
    """Greedy generation with the stages applied (none: the model as it is); the same loop as the graph's
    (tcexport/generation/loop.py): left padding, positions counting real tokens, every row until all met EOS.
    `policy(cache_lists, mask) -> (cache_lists, mask)` trims the cache between steps."""
    from transformers import DynamicCache

    pruned = PrunedDecoder(model, stages, cache_methods) if stages or cache_methods else None
    try:
        ids, mask = left_pad(prompts, pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        tokens = [[] for _ in prompts]
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        first_logits = None
        step_input = ids
        for step in range(max_new_tokens):
            if pruned is not None:
                logits = pruned.step(step_input, mask, positions, cache)[:, -1, :]
            else:
                logits = model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                               **{cache_kwarg(model): cache}, use_cache=True).logits[:, -1, :]
            if step == 0:
                first_logits = logits.clone()
            chosen = logits.argmax(-1)
            for row in range(len(prompts)):
                if not finished[row]:
                    tokens[row].append(int(chosen[row]))
                    finished[row] = int(chosen[row]) in eos_ids
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            step_input = torch.where(finished, pad_id, chosen)[:, None]
            if policy is not None:
                cache, mask = policy(cache, mask)
        return {"tokens": tokens, "first_logits": first_logits.numpy()}
    finally:
        if pruned is not None:
            pruned.remove()
