"""Side inputs of the eager reference: tensors that still hold the original token count after a compression.

An elementwise op that meets the current tokens with such a tensor (right-aligned broadcasting, the axes where the
two differ by exactly the tokens removed so far) needs it to follow the tokens:

- a padding-mask term added to attention logits becomes the mask rebuilt from the current token mask (with the
  block's sliding window over the tokens' original positions, when its mask has one);
- anything else is a position term (relative position bias [1,H,N,N], rotary cos/sin [N,d], a position
  embedding): it is gathered at each current token's position (TokenFlow.positions), per batch row. An axis that
  holds the tokens after a fixed prefix (x[:, 1:] in EVA's rotary embedding: delta = -1) takes the positions of
  those tokens, shifted by the prefix.
"""

from __future__ import annotations

import torch

from tcexport.core.errors import UsageError


def follow_tokens(flow, value: torch.Tensor, other: torch.Tensor, from_mask: bool,
                  window: tuple[int, int] | None = None) -> torch.Tensor:
    """`value` as it must be to meet `other` (which holds the current tokens); `value` itself if nothing is off.
    `window` (before, after): the sliding window of the block whose logits a mask term meets."""
    shift = flow.n0 - flow.count
    rank = max(value.dim(), other.dim())
    value_shape = [1] * (rank - value.dim()) + list(value.shape)
    other_shape = [1] * (rank - other.dim()) + list(other.shape)
    axes = [a for a in range(rank) if value_shape[a] != other_shape[a] and 1 not in (value_shape[a], other_shape[a])
            and value_shape[a] - other_shape[a] == shift]
    between = [a for a in range(rank) if 1 not in (value_shape[a], other_shape[a])
               and 0 < value_shape[a] - other_shape[a] < shift]
    if between:  # tokens from between two compressions, not the input's: carried around a compressed block
        a = between[0]
        raise UsageError(f"a tensor holding {value_shape[a]} tokens meets the {other_shape[a]} current ones: the model "
                         "carries its tokens around a compressed block (a skip connection, as MobileBERT's "
                         "bottleneck adds each layer's input back after its feed-forward stack); tcexport cannot "
                         "compress this model")
    if not axes:
        return value
    if from_mask:
        if rank == 4 and axes[-1] == 3:  # a key mask on [B,H,Nq,Nk] logits
            return flow.rebuilt_mask(other.dtype, window)
        raise UsageError("the model uses its attention mask after a compressed block outside attention and "
                         "outside sentence-transformers pooling; tcexport cannot rebuild that use of the mask")
    return gather_positions(flow, value.reshape(value_shape), {a: other_shape[a] for a in axes})


def gather_positions(flow, value: torch.Tensor, lengths: dict[int, int]) -> torch.Tensor:
    """value[b, ..., positions[b, i], ...] along each axis in `lengths` (axis -> tokens it must hold)."""
    positions = flow.positions()
    batch, count = positions.shape
    if value.shape[0] not in (1, batch) or 0 in lengths:
        raise UsageError(f"a position term of shape {list(value.shape)} has no batch axis tcexport can follow; "
                         "expected [1 or batch, ..., tokens, ...]")
    value = value.expand(batch, *value.shape[1:])
    for axis, length in lengths.items():
        prefix = count - length  # tokens before the ones this axis holds (protected tokens keep theirs)
        if not 0 <= prefix <= flow.protected:
            raise UsageError(f"a position term holds {length} of the {count} tokens; tcexport follows terms over all "
                             f"tokens or all but the first {flow.protected}")
        index = positions[:, prefix:] - prefix
        shape = [1] * value.dim()
        shape[0], shape[axis] = batch, length
        full = list(value.shape)
        full[axis] = length
        value = value.gather(axis, index.reshape(shape).expand(full))
    return value
