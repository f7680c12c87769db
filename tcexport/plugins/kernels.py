"""Triton kernels for tcexport's plugins: one program per batch row, one launch per op.

The semantics are the methods' specs (tcexport/methods/tome.py, topk.py); the references there are the ground
truth and tests compare against them. One launch per op, because an AOT Python plugin (aot_impl) hands TensorRT a
single kernel: each program holds its row's scores, ranks and indices in registers, so no workspace is needed
and nothing is allocated or synchronised (CUDA-graph safe).

Tie rules as the references: argmax ties -> lowest B index; ranking ties -> lower index first (ONNX TopK
sorted=1, a stable descending sort). Scores, ranks and sizes are fp32 whatever the I/O dtype (fp32/fp16/bf16);
x is stored back in its own dtype. Tensors are contiguous (TensorRT LINEAR format): x [B,N,C], metric [B,N,Ck],
cls_attention [B,N], size [B,N,1], mask [B,N] (None when absent: the pointer is then a constexpr None).

Parameter order: input pointers, the scalar fields, output pointers, then constexprs -- the order in which an
AOT Python plugin's kernel receives inputs, extra arguments (SymIntExprs) and outputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tcexport.methods import tome

# The spec's constants, as constexpr globals (the only globals a compiled kernel may read).
PAD_BONUS = tl.constexpr(tome.PAD_BONUS)
PROTECTED_SCORE = tl.constexpr(tome.PROTECTED_SCORE)
NORM_EPS = tl.constexpr(tome.NORM_EPS)
CHANNEL_TILE = 64  # channels moved per step


def block(n: int, least: int = 16) -> int:
    """Power-of-two block covering n (tl.dot wants at least 16 on each side)."""
    return max(least, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def _rank_desc(values, offs, n):
    """rank[i] = #{j < n: v[j] > v[i] or (v[j] == v[i] and j < i)}: the position in a stable descending sort.

    All pairs at once in registers (no scratch memory: an AOT plugin launches one kernel without workspace)."""
    higher = values[None, :] > values[:, None]
    tied_before = (values[None, :] == values[:, None]) & (offs[None, :] < offs[:, None])
    before = higher | tied_before
    before = before & (offs[None, :] < n)
    return tl.sum(before.to(tl.int32), axis=1)


@triton.jit
def tome_merge_kernel(x_ptr, metric_ptr, size_ptr, mask_ptr, n, c, ck, r, protected,
                      x_out_ptr, size_out_ptr, mask_out_ptr,
                      HAS_MASK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_CK: tl.constexpr, BLOCK_C: tl.constexpr):
    """ToMe bipartite soft matching for batch row program_id(0) (tcexport.methods.tome spec steps 2-9)."""
    b = tl.program_id(0)
    n_a = (n + 1) // 2
    n_b = n // 2
    n_out = n - r
    x_row = x_ptr + b.to(tl.int64) * n * c
    m_row = metric_ptr + b.to(tl.int64) * n * ck
    s_row = size_ptr + b.to(tl.int64) * n
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_CK)
    valid_a = offs_a < n_a
    valid_b = offs_b < n_b

    # Steps 2-6: unit B rows once; then each A row's best B partner (first maximum).
    kb = tl.load(m_row + (2 * offs_b[:, None] + 1) * ck + offs_k[None, :],
                 mask=valid_b[:, None] & (offs_k[None, :] < ck), other=0.0).to(tl.float32)
    unit_b = kb / tl.maximum(tl.sqrt(tl.sum(kb * kb, axis=1)), NORM_EPS)[:, None]
    pad_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    if HAS_MASK:
        mk_row = mask_ptr + b.to(tl.int64) * n
        pad_b = (tl.load(mk_row + 2 * offs_b + 1, mask=valid_b, other=1.0).to(tl.float32) == 0.0).to(tl.float32)
    locked_b = (2 * offs_b + 1) < protected
    node_max = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    node_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for i in range(0, n_a):
        ka = tl.load(m_row + 2 * i * ck + offs_k, mask=offs_k < ck, other=0.0).to(tl.float32)
        unit_a = ka / tl.maximum(tl.sqrt(tl.sum(ka * ka, axis=0)), NORM_EPS)
        scores = tl.sum(unit_a[None, :] * unit_b, axis=1)
        if HAS_MASK:
            # +PAD_BONUS for two padding tokens, -PAD_BONUS for a mixed pair, 0 for real pairs (0/1 masks)
            pad_a = (tl.load(mk_row + 2 * i).to(tl.float32) == 0.0).to(tl.float32)
            scores += PAD_BONUS * (3.0 * pad_a * pad_b - (pad_a + pad_b))
        scores = tl.where(locked_b | (2 * i < protected), PROTECTED_SCORE, scores)
        scores = tl.where(valid_b, scores, float("-inf"))
        best = tl.max(scores, axis=0)
        first = tl.min(tl.where(scores == best, offs_b, BLOCK_B), axis=0)
        node_max = tl.where(offs_a == i, best, node_max)
        node_idx = tl.where(offs_a == i, first, node_idx)

    # Step 7: the r A tokens with the largest node_max merge (ties: lower A index first).
    rank = _rank_desc(node_max, offs_a, n_a)
    merged = valid_a & (rank < r)

    # Step 8: output positions. Protected tokens keep theirs; unmerged A tokens follow in order, then B tokens.
    locked_a = (2 * offs_a) < protected
    stays = valid_a & ~merged & ~locked_a
    pos_a = tl.where(locked_a, 2 * offs_a, protected + tl.cumsum(stays.to(tl.int32), axis=0) - 1)
    write_a = valid_a & (locked_a | stays)
    n_unmerged = n_a - (protected + 1) // 2 - r
    pos_b = tl.where(locked_b, 2 * offs_b + 1, protected + n_unmerged + offs_b - protected // 2)
    # One-hot [B tokens, A tokens]: merge of A token i lands on B token node_idx[i].
    lands = ((node_idx[None, :] == offs_b[:, None]) & merged[None, :]).to(tl.float32)

    # Step 9: size-weighted sums; merged A rows are added into their B rows by the small one-hot GEMM.
    size_a = tl.load(s_row + 2 * offs_a, mask=valid_a, other=1.0).to(tl.float32)
    size_b = tl.load(s_row + 2 * offs_b + 1, mask=valid_b, other=1.0).to(tl.float32)
    size_b_new = size_b + tl.sum(lands * size_a[None, :], axis=1)
    so_row = size_out_ptr + b.to(tl.int64) * n_out
    tl.store(so_row + pos_a, size_a.to(size_out_ptr.dtype.element_ty), mask=write_a)
    tl.store(so_row + pos_b, tl.where(locked_b, size_b, size_b_new).to(size_out_ptr.dtype.element_ty),
             mask=valid_b)
    xo_row = x_out_ptr + b.to(tl.int64) * n_out * c
    for c0 in range(0, c, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        in_c = offs_c[None, :] < c
        xa = tl.load(x_row + (2 * offs_a[:, None]) * c + offs_c[None, :], mask=valid_a[:, None] & in_c,
                     other=0.0).to(tl.float32)
        xb = tl.load(x_row + (2 * offs_b[:, None] + 1) * c + offs_c[None, :], mask=valid_b[:, None] & in_c,
                     other=0.0).to(tl.float32)
        weighted_a = xa * size_a[:, None]
        xa_out = tl.where(locked_a[:, None], xa, weighted_a / size_a[:, None])
        tl.store(xo_row + pos_a[:, None] * c + offs_c[None, :], xa_out.to(x_out_ptr.dtype.element_ty),
                 mask=write_a[:, None] & in_c)
        summed = xb * size_b[:, None] + tl.dot(lands, weighted_a, input_precision="ieee")
        xb_out = tl.where(locked_b[:, None], xb, summed / size_b_new[:, None])
        tl.store(xo_row + pos_b[:, None] * c + offs_c[None, :], xb_out.to(x_out_ptr.dtype.element_ty),
                 mask=valid_b[:, None] & in_c)
    if HAS_MASK:
        mk_row = mask_ptr + b.to(tl.int64) * n
        mask_a = tl.load(mk_row + 2 * offs_a, mask=valid_a, other=0.0).to(tl.float32)
        mask_b = tl.load(mk_row + 2 * offs_b + 1, mask=valid_b, other=0.0).to(tl.float32)
        mask_b_new = tl.maximum(mask_b, tl.max(lands * mask_a[None, :], axis=1))
        mo_row = mask_out_ptr + b.to(tl.int64) * n_out
        tl.store(mo_row + pos_a, mask_a.to(mask_out_ptr.dtype.element_ty), mask=write_a)
        tl.store(mo_row + pos_b, mask_b_new.to(mask_out_ptr.dtype.element_ty), mask=valid_b)


@triton.jit
def token_prune_kernel(x_ptr, score_ptr, size_ptr, mask_ptr, n, c, k, protected,
                       x_out_ptr, size_out_ptr, mask_out_ptr,
                       FUSE: tl.constexpr, KEEP_ORDER: tl.constexpr, HAS_MASK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """EViT top-k pruning for batch row program_id(0) (tcexport.methods.topk spec steps 1-6)."""
    b = tl.program_id(0)
    m = n - protected
    n_out = protected + k + FUSE
    offs = tl.arange(0, BLOCK_M)  # unprotected token t sits at protected + t
    valid = offs < m
    score = tl.load(score_ptr + b.to(tl.int64) * n + protected + offs, mask=valid, other=float("-inf")).to(tl.float32)
    rank = _rank_desc(score, offs, m)
    kept = valid & (rank < k)
    if KEEP_ORDER:
        pos = protected + tl.cumsum(kept.to(tl.int32), axis=0) - 1
    else:
        pos = protected + rank
    dropped = valid & ~kept
    weights = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FUSE:
        total = tl.sum(tl.where(dropped, score, 0.0), axis=0)
        safe = tl.where(total > 0.0, total, 1.0)
        weights = tl.where(total > 0.0, score / safe, 1.0 / (m - k))
        weights = tl.where(dropped, weights, 0.0)
    s_row = size_ptr + b.to(tl.int64) * n
    so_row = size_out_ptr + b.to(tl.int64) * n_out
    x_row = x_ptr + b.to(tl.int64) * n * c
    xo_row = x_out_ptr + b.to(tl.int64) * n_out * c
    size = tl.load(s_row + protected + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(so_row + pos, size.to(size_out_ptr.dtype.element_ty), mask=kept)
    if FUSE:
        tl.store(so_row + protected + k, tl.sum(tl.where(dropped, size, 0.0), axis=0).to(size_out_ptr.dtype.element_ty))
    for t in range(0, protected):  # protected tokens: unchanged, first
        tl.store(so_row + t, tl.load(s_row + t))
    for c0 in range(0, c, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        in_c = offs_c < c
        rows = tl.load(x_row + (protected + offs[:, None]) * c + offs_c[None, :], mask=valid[:, None] & in_c[None, :],
                       other=0.0)
        tl.store(xo_row + pos[:, None] * c + offs_c[None, :], rows, mask=kept[:, None] & in_c[None, :])
        if FUSE:
            fused = tl.sum(weights[:, None] * rows.to(tl.float32), axis=0)
            tl.store(xo_row + (protected + k) * c + offs_c, fused.to(x_out_ptr.dtype.element_ty), mask=in_c)
        for t in range(0, protected):
            tl.store(xo_row + t * c + offs_c, tl.load(x_row + t * c + offs_c, mask=in_c), mask=in_c)
    if HAS_MASK:
        mk_row = mask_ptr + b.to(tl.int64) * n
        mo_row = mask_out_ptr + b.to(tl.int64) * n_out
        mask = tl.load(mk_row + protected + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(mo_row + pos, mask.to(mask_out_ptr.dtype.element_ty), mask=kept)
        if FUSE:
            tl.store(mo_row + protected + k,
                     tl.max(tl.where(dropped, mask, 0.0), axis=0).to(mask_out_ptr.dtype.element_ty))
        for t in range(0, protected):
            tl.store(mo_row + t, tl.load(mk_row + t))


# ---------------------------------------------------------------- torch launchers (JIT plugins, tests, gpu_check)


def tome_blocks(n: int, c: int, ck: int) -> dict[str, int]:
    """The constexpr block sizes of tome_merge_kernel for N tokens, C channels, Ck metric channels."""
    return {"BLOCK_A": block((n + 1) // 2), "BLOCK_B": block(n // 2), "BLOCK_CK": block(ck),
            "BLOCK_C": min(CHANNEL_TILE, block(c))}


def prune_blocks(n: int, c: int, protected: int) -> dict[str, int]:
    return {"BLOCK_M": block(n - protected), "BLOCK_C": min(CHANNEL_TILE, block(c))}


def tome_merge(x, metric, size, mask, r: int, protected: int, out=None):
    """ToMeMerge on torch tensors: (x [B,N-r,C], size [B,N-r,1], mask [B,N-r] or None). r must be capped already.

    `out` = (x_out, size_out, mask_out) buffers to write into (a plugin's outputs); allocated when None."""
    import torch

    batch, n, c = x.shape
    if r == 0:
        results = (x, size, mask)
        if out is not None:
            for dst, src in zip(out, results):
                if dst is not None:
                    dst.copy_(src)
            return tuple(out)
        return results
    x_out, size_out, mask_out = out if out is not None else (
        torch.empty((batch, n - r, c), dtype=x.dtype, device=x.device),
        torch.empty((batch, n - r, 1), dtype=size.dtype, device=x.device),
        None if mask is None else torch.empty((batch, n - r), dtype=mask.dtype, device=x.device))
    blocks = tome_blocks(n, c, metric.shape[-1])
    has_mask = mask is not None
    tome_merge_kernel[(batch,)](x, metric, size, mask, n, c, metric.shape[-1], r, protected, x_out, size_out,
                                mask_out, HAS_MASK=has_mask, **blocks)
    return x_out, size_out, mask_out


def token_prune(x, score, size, mask, k: int, protected: int, fuse: bool, keep_order: bool, out=None):
    """TokenPrune on torch tensors: (x [B,N_out,C], size, mask or None), N_out = protected + k + fuse."""
    import torch

    batch, n, c = x.shape
    n_out = protected + k + int(fuse)
    x_out, size_out, mask_out = out if out is not None else (
        torch.empty((batch, n_out, c), dtype=x.dtype, device=x.device),
        torch.empty((batch, n_out, 1), dtype=size.dtype, device=x.device),
        None if mask is None else torch.empty((batch, n_out), dtype=mask.dtype, device=x.device))
    blocks = prune_blocks(n, c, protected)
    has_mask = mask is not None
    token_prune_kernel[(batch,)](x, score, size, mask, n, c, k, protected, x_out, size_out, mask_out,
                                 FUSE=bool(fuse), KEEP_ORDER=bool(keep_order), HAS_MASK=has_mask, **blocks)
    return x_out, size_out, mask_out
