"""The token state of one forward pass of a compressed reference model, and what follows it.

TokenFlow holds, after the first block, x's companions: size [B,N,1] (original tokens per token), mask [B,N]
(1 real, 0 padding; None for models without one) and, on demand, positions [B,N] (the original token index each
token stands at, for position terms: relative position bias, rotary tables). `compress` applies the method
planned for a block; everything else in this package asks the flow what the current tokens are.

Positions follow one rule for every method, derived from the method itself rather than written per method:
a compressed token takes the position of its largest constituent (the input token with the largest share of
it, size-weighted; ties go to the earlier token). Kept tokens are their own largest constituent, so pruning
gathers; a ToMe merge of two equal-sized tokens keeps the earlier one's position. The share is measured by running
the method once more on one-hot rows (x = identity): output row j then holds each input token's weight in token
j. The graph side (graph/positions.py) measures it the same way. Methods that decide from x itself (query) cannot
be probed like that and refuse models with position terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcexport.core.errors import UsageError
from tcexport.methods.base import Method
from tcexport.methods.tome import log_size_bias

# Signals that come from outside the model: a method needing one makes the compressed model take an input of
# that name (graph/insert.py), and the reference a keyword argument of that name.
EXTRA_INPUTS = ("query",)


@dataclass
class _Probe:
    """What a stage decided with, kept so its origin (and so the positions) can be computed when asked for."""

    method: Method
    metric: torch.Tensor | None
    size: torch.Tensor
    mask: torch.Tensor | None
    signals: dict
    n_in: int


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along the last axis (explicit, not relying on torch's tie rule)."""
    best = values.amax(dim=-1, keepdim=True)
    index = torch.arange(values.shape[-1], device=values.device).expand_as(values)
    return torch.where(values == best, index, values.shape[-1]).amin(dim=-1)


class TokenFlow:
    """The token state shared by every patch point of one reference model during one forward pass."""

    def __init__(self, plan: dict[int, Method], protected: int, prop_attn: bool):
        self.plan = plan
        self.protected = protected
        self.prop_attn = prop_attn
        self.begin(None)

    def begin(self, input_mask: torch.Tensor | None, extra: dict | None = None) -> None:
        """Start a forward pass; `input_mask` [B,N] float (text) or None; `extra`: inputs the compressed model
        takes besides the source model's (EXTRA_INPUTS, e.g. {"query": [B,C]}), handed to methods as signals."""
        self.input_mask = input_mask
        self.extra = dict(extra or {})
        self.n0: int | None = None
        self.size: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.counts: list[tuple[int, int]] = []
        self.stage_sizes: list[torch.Tensor] = []  # size after each method: a fingerprint of its token choices
        self.stage_metrics: list[torch.Tensor | None] = []  # what each method measured its choices on
        self.x: torch.Tensor | None = None  # the last block's output
        self._probes: list[_Probe] = []
        self._positions: torch.Tensor | None = None

    # ------------------------------------------------------------------ state

    @property
    def compressed(self) -> bool:
        """True once a method changed the token count: sizes, the rebuilt mask and positions apply from here."""
        return bool(self._probes)

    @property
    def count(self) -> int | None:
        return None if self.size is None else int(self.size.shape[1])

    def start(self, batch: int, tokens: int, device: torch.device) -> None:
        """Block 0 begins: every token is itself, once."""
        self.n0 = tokens
        self.size = torch.ones(batch, tokens, 1, dtype=torch.float32, device=device)
        self.mask = self.input_mask
        if self.mask is not None and tuple(self.mask.shape) != (batch, tokens):
            raise UsageError(f"the first block got {batch} x {tokens} tokens but the attention mask is "
                             f"{tuple(self.mask.shape)}; pass input_ids and attention_mask of the same [batch, seq] "
                             "shape")

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """What compression adds to attention logits over the current tokens ([B,1,1,N] or None): log(size)
        for proportional attention. The padding mask is rebuilt separately (rebuilt_mask)."""
        if not (self.compressed and self.prop_attn):
            return None
        return log_size_bias(self.size).to(dtype)

    def rebuilt_mask(self, dtype: torch.dtype, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Additive key mask from the current token mask: 0 for real tokens, finfo.min for padding, [B,1,1,N].

        With a sliding `window` (before, after), [B,1,N,N]: key j is hidden from query i also unless
        -before <= positions[j] - positions[i] <= after (the original index each token stands at)."""
        if self.mask is None:
            keys = torch.zeros(self.size.shape[0], 1, 1, self.size.shape[1], dtype=dtype, device=self.size.device)
        else:
            keys = (1.0 - self.mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min
        if window is None:
            return keys
        positions = self.positions()
        offset = positions[:, None, :] - positions[:, :, None]  # [B, i, j]: positions[j] - positions[i]
        inside = ((offset >= -window[0]) & (offset <= window[1]))[:, None]
        return keys.masked_fill(~inside, torch.finfo(dtype).min)

    def pool_weights(self) -> torch.Tensor:
        """How many real original tokens each token holds, [B,N]: what an attention mask means after merging."""
        weights = self.size[..., 0]
        return weights if self.mask is None else weights * self.mask

    # ------------------------------------------------------------------ compression

    def compress(self, index: int, x: torch.Tensor, metric: torch.Tensor | None,
                 probs: torch.Tensor | None) -> torch.Tensor:
        """Apply the method planned for block `index` (if any) to the state; return the new x.

        metric: the block's keys averaged over heads [B,N,d]; probs: its attention probabilities [B,H,N,N]."""
        method = self.plan.get(index)
        if method is None:
            return x
        signals = {}
        if "cls_attention" in method.needs:
            signals["cls_attention"] = probs[:, :, 0, :].mean(dim=1)
        for name in EXTRA_INPUTS:
            if name in method.needs:
                if self.extra.get(name) is None:
                    raise UsageError(f"block {index}: the {method.name} method needs the input '{name}'; call the "
                                     f"reference with {name}=...")
                signals[name] = self.extra[name]
        n_in, size_in, mask_in = x.shape[1], self.size, self.mask
        x, self.size, self.mask = method.reference(x, metric, self.size, self.mask, self.protected, signals=signals)
        if x.shape[1] != n_in:  # the ONNX graph names a size output only where the method changed the count
            self._probes.append(_Probe(method, metric, size_in, mask_in, signals, n_in))
            self.stage_sizes.append(self.size.detach().clone())
            # What the method decided on: the keys metric, else its first signal (e.g. CLS attention).
            decided_on = metric if "keys" in method.needs else next(iter(signals.values()), None)
            self.stage_metrics.append(decided_on.detach().clone() if decided_on is not None else None)
        return x

    def positions(self) -> torch.Tensor:
        """[B,N] int64: the original index of the position each current token holds (see the module doc)."""
        if self._positions is not None and self._positions.shape[1] == self.count:
            return self._positions
        batch = self.size.shape[0]
        positions = torch.arange(self.n0, device=self.size.device).expand(batch, -1)
        for probe in self._probes:
            positions = positions.gather(1, self._origin(probe))
        self._positions = positions
        return positions

    def _origin(self, probe: _Probe) -> torch.Tensor:
        method = probe.method
        method.check_positions_measurable()
        batch = probe.size.shape[0]
        eye = torch.eye(probe.n_in, dtype=torch.float32, device=probe.size.device).expand(batch, -1, -1)
        with torch.no_grad():
            shares, _, _ = method.reference(eye, probe.metric, probe.size, probe.mask, self.protected,
                                            signals=probe.signals)
        return first_argmax(shares)
