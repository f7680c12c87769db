"""sentence-transformers Pooling after a compression: every mode, computed from the compressed token state.

Before any compression a pipeline's own Pooling runs unchanged. After one, each of its modes (in the module's
order, concatenated as the module concatenates them) is computed here from x [B,N,C], the current mask (1 real,
0 padding), the weights w = round(mask * size) (how many real original tokens each token holds) and, for the modes
that depend on where tokens stand, their positions (the largest-constituent rule, reference/flow.py). Inputs are
padded at the end, as tokenizers pad and validate feeds them.

  cls                   the token the pipeline's rule names (the first real token: with padding at the end, token
                        0, the protected CLS token, which stays first)
  max                   the max over the real tokens of their (merged) values; padding excluded
  mean                  sum_t x_t w_t / max(sum_t w_t, 1e-9)                 (sum_t w_t: the real original tokens)
  mean_sqrt_len_tokens  sum_t x_t w_t / sqrt(max(sum_t w_t, 1e-9))
  weightedmean          weights w_t (position_t + 1 - pad), pad = the input's leading padding (0 when padded at the
                        end): sum_t x_t w_t (p_t + 1 - pad) / max(sum_t w_t (p_t + 1 - pad), 1e-9)
  lasttoken             the real token standing at the largest original position (times its mask, 1); zeros for
                        a row without real tokens

A mode that picks one token (cls, lasttoken) names an original position i from the input mask by the pipeline's
own rule (first / last real token); after a compression it reads the real token at the largest position <= i
(token 0 when there is none). graph/pooling.py builds the same in the rewritten graph.

Refused (UsageError, at compress time from the export's provenance): include_prompt=False (the exported graph takes
no prompt length, so it cannot leave the prompt out), a mode this file does not know, and a method that cannot
say where its tokens stand (query) with a mode that needs positions.
"""

from __future__ import annotations

import torch

from tcexport.core.errors import UsageError
from tcexport.models.pooling import MODES, describe, modes_of
from tcexport.reference.flow import first_argmax

POSITIONAL = ("cls", "weightedmean", "lasttoken")  # modes that read the tokens' positions after a compression


def refuse_unsupported(info: dict, spec: str, methods=()) -> None:
    """UsageError, one line, when a pipeline's pooling (its export's recorded `info`) cannot be computed after a
    compression, or not with these `methods`. Records without pooling (not sentence-transformers) pass."""
    modes = info.get("pooling")
    if modes is None:
        return
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UsageError(f"{spec}: its Pooling uses {', '.join(repr(m) for m in unknown)}, a sentence-transformers "
                         f"pooling mode tcexport does not know; it compresses pipelines pooling with "
                         f"{', '.join(MODES)}")
    if info.get("pooling_include_prompt") is False:
        raise UsageError(f"{spec}: its Pooling leaves the prompt out (include_prompt=False), but the exported graph "
                         "takes no prompt length, so its pooling cannot; tcexport does not compress it (save the "
                         "pipeline with include_prompt=True if its inputs carry no prompt)")
    positional = [m for m in modes if m in POSITIONAL]
    blind = [method.name for method in methods if getattr(method, "decides_from_x", False)]
    if positional and blind:
        raise UsageError(f"{spec}: its {positional[0]} pooling reads where each token stands, but the {blind[0]} "
                         "method decides from the hidden states themselves, so tcexport cannot tell which position "
                         "its tokens hold; use tome, topk, prune-merge, adjacent or pool")


def pool(module, features: dict, flow) -> dict:
    """The Pooling module's forward after a compression (module doc): features gain "sentence_embedding"."""
    modes = modes_of(module)
    refuse_unsupported(describe(module), "the sentence-transformers pipeline", flow.plan.values())
    x = features["token_embeddings"]
    vectors = [_mode(mode, x, flow) for mode in modes]
    features["sentence_embedding"] = torch.cat(vectors, dim=-1)
    return features


def _mode(mode: str, x: torch.Tensor, flow) -> torch.Tensor:
    batch, count = x.shape[:2]
    mask = flow.mask if flow.mask is not None else torch.ones(batch, count, device=x.device)
    real = mask > 0.5
    weights = torch.round(flow.pool_weights()).to(x.dtype)  # [B,N]
    if mode == "max":
        return x.masked_fill(~real[..., None], float("-inf")).amax(dim=1)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = (x * weights[..., None]).sum(dim=1)
        mass = torch.clamp(weights.sum(dim=1, keepdim=True), min=1e-9)
        return total / (mass if mode == "mean" else torch.sqrt(mass))
    original = flow.input_mask if flow.input_mask is not None else torch.ones(batch, flow.n0, device=x.device)
    positions = flow.positions()
    if mode == "weightedmean":
        pad = first_argmax(original)  # leading padding of the input (the pipeline's own rule)
        weighted = weights * (positions + 1 - pad[:, None]).to(x.dtype)
        return (x * weighted[..., None]).sum(dim=1) / torch.clamp(weighted.sum(dim=1, keepdim=True), min=1e-9)
    if mode == "cls":
        return _at(x, _pick(positions, real, first_argmax(original)))
    # lasttoken: the last real original position (0 for a row without real tokens), as the pipeline finds it
    index = torch.arange(original.shape[1], device=x.device).expand_as(original)
    last = torch.where(original > 0, index, 0).amax(dim=1)
    picked = _pick(positions, real, last)
    return _at(x * mask[..., None].to(x.dtype), picked)


def _pick(positions: torch.Tensor, real: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the real token at the largest position <= target (an original position); 0 when there is none."""
    ok = real & (positions <= target[:, None])
    return first_argmax(torch.where(ok, positions, torch.full_like(positions, -1)))


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[torch.arange(x.shape[0], device=x.device), index]
