// TokenPrune per batch row (EViT top-k pruning, optional fusion of the dropped tokens): plain __host__ __device__
// code, run by the CUDA kernels (one thread block per row, a barrier between phases) and by the host harness.
//
// Semantics: tcexport/methods/topk.py (its docstring is the spec, TopK.reference the ground truth). As in
// tome_rows.h, each phase writes only slots owned by its thread index and reads only earlier phases' results.
#pragma once

#include "hd.h"

namespace tc
{

struct PruneShape
{
    int n;           // tokens in
    int c;           // channels of x
    int k;           // unprotected tokens kept (1 <= k < n - protect)
    int protect;     // leading tokens copied first, never pruned
    bool fuse;       // append one token fusing the dropped ones
    bool keep_order; // kept tokens in original order instead of descending score

    TC_HD int m() const // unprotected tokens
    {
        return n - protect;
    }
    TC_HD int n_out() const
    {
        return protect + k + (fuse ? 1 : 0);
    }
};

TC_HD long long prune_scratch_words(int n)
{
    return 3LL * n + 1; // rank, order, source, fused total
}

struct PruneScratch
{
    int* rank;    // [m]   position of each unprotected token in the stable descending score order
    int* order;   // [m]   the inverse: unprotected token at each rank
    int* source;  // [protect + k] input token of each copied output token
    float* total; // [1]   sum of the dropped scores (fuse)
};

TC_HD PruneScratch prune_scratch(int* words, int n)
{
    PruneScratch s;
    s.rank = words;
    s.order = words + n;
    s.source = words + 2 * n;
    s.total = words_as_floats(words + 3 * n);
    return s;
}

template <typename TX, typename TS>
struct PruneRow
{
    TX const* x;       // [n, c]
    TS const* score;   // [n] CLS attention
    float const* size; // [n]
    float const* mask; // [n] or null
    TX* x_out;         // [n_out, c]
    float* size_out;   // [n_out]
    float* mask_out;   // [n_out] or null (without a mask input: all ones)
    PruneScratch s;
};

// Batch row b of the whole tensors (scratch: prune_scratch_words(n) words per row).
template <typename TX, typename TS>
TC_HD PruneRow<TX, TS> prune_row_at(PruneShape const& sh, int b, TX const* x, TS const* score, float const* size,
    float const* mask, TX* x_out, float* size_out, float* mask_out, int* scratch)
{
    long long n = sh.n, n_out = sh.n_out();
    PruneRow<TX, TS> row;
    row.x = x + b * n * sh.c;
    row.score = score + b * n;
    row.size = size + b * n;
    row.mask = mask != nullptr ? mask + b * n : nullptr;
    row.x_out = x_out + b * n_out * sh.c;
    row.size_out = size_out + b * n_out;
    row.mask_out = mask_out != nullptr ? mask_out + b * n_out : nullptr;
    row.s = prune_scratch(scratch + b * prune_scratch_words(sh.n), sh.n);
    return row;
}

template <typename TX, typename TS>
TC_HD float prune_score(PruneShape const& sh, PruneRow<TX, TS> const& row, int i)
{
    return to_float(row.score[sh.protect + i]);
}

// Phase 0 (step 3): rank = how many unprotected tokens come first (higher score, or equal score and lower
// index: ONNX TopK sorted=1 / a stable descending sort), and its inverse.
template <typename TX, typename TS>
TC_HD void prune_phase_rank(PruneShape const& sh, PruneRow<TX, TS> const& row, int t, int nt)
{
    for (int i = t; i < sh.m(); i += nt)
    {
        float mine = prune_score(sh, row, i);
        int ahead = 0;
        for (int k = 0; k < sh.m(); ++k)
        {
            float other = prune_score(sh, row, k);
            ahead += (other > mine || (other == mine && k < i)) ? 1 : 0;
        }
        row.s.rank[i] = ahead;
        row.s.order[ahead] = i;
    }
}

// Phase 1 (steps 4-5): the input token of every copied output token, and the dropped scores' sum (one
// thread, in rank order).
template <typename TX, typename TS>
TC_HD void prune_phase_sources(PruneShape const& sh, PruneRow<TX, TS> const& row, int t, int nt)
{
    PruneScratch const& s = row.s;
    for (int job = t; job < sh.protect + sh.m() + 1; job += nt)
    {
        if (job < sh.protect)
        {
            s.source[job] = job;
        }
        else if (job < sh.protect + sh.m())
        {
            int i = job - sh.protect;
            if (s.rank[i] >= sh.k)
            {
                continue; // dropped
            }
            int slot = s.rank[i];
            if (sh.keep_order)
            {
                slot = 0;
                for (int q = 0; q < i; ++q)
                {
                    slot += s.rank[q] < sh.k ? 1 : 0;
                }
            }
            s.source[sh.protect + slot] = sh.protect + i;
        }
        else if (sh.fuse)
        {
            float total = 0.0f;
            for (int q = sh.k; q < sh.m(); ++q)
            {
                total += prune_score(sh, row, s.order[q]);
            }
            *s.total = total;
        }
    }
}

constexpr int kPruneDecidePhases = 2;

template <typename TX, typename TS>
TC_HD void prune_decide_phase(int phase, PruneShape const& sh, PruneRow<TX, TS> const& row, int t, int nt)
{
    if (phase == 0)
    {
        prune_phase_rank(sh, row, t, nt);
    }
    else
    {
        prune_phase_sources(sh, row, t, nt);
    }
}

// Output element e = o * c + channel (any thread, any order, after the decide phases). Copied tokens are copied
// unchanged; the fused token is sum(w_i x_i) with w_i = score_i / S (S > 0) or 1 / D, size = sum, mask = max.
template <typename TX, typename TS>
TC_HD void prune_gather_element(PruneShape const& sh, PruneRow<TX, TS> const& row, long long e)
{
    PruneScratch const& s = row.s;
    int o = (int) (e / sh.c), channel = (int) (e % sh.c);
    if (o < sh.protect + sh.k)
    {
        int token = s.source[o];
        row.x_out[e] = row.x[(long long) token * sh.c + channel];
        if (channel == 0)
        {
            row.size_out[o] = row.size[token];
            if (row.mask_out != nullptr)
            {
                row.mask_out[o] = row.mask != nullptr ? row.mask[token] : 1.0f;
            }
        }
        return;
    }
    int dropped = sh.m() - sh.k;
    float total = *s.total;
    float uniform = 1.0f / (float) dropped;
    float acc = 0.0f, size = 0.0f, any = 1.0f; // no mask: every token is real
    for (int q = sh.k; q < sh.m(); ++q)
    {
        int i = s.order[q];
        int token = sh.protect + i;
        float w = total > 0.0f ? prune_score(sh, row, i) / total : uniform;
        acc += w * to_float(row.x[(long long) token * sh.c + channel]);
        size += row.size[token];
        if (row.mask != nullptr && (q == sh.k || row.mask[token] > any))
        {
            any = row.mask[token];
        }
    }
    row.x_out[e] = from_float<TX>(acc);
    if (channel == 0)
    {
        row.size_out[o] = size;
        if (row.mask_out != nullptr)
        {
            row.mask_out[o] = any;
        }
    }
}

} // namespace tc
