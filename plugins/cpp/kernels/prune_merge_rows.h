// TokenPruneMerge per batch row (keep K dominant tokens by CLS attention, merge the rest into M contextual
// tokens): plain __host__ __device__ code in the style of tome_rows.h and prune_rows.h, so a CUDA kernel can run
// it one thread block per row with a barrier between phases, and the host runs every thread index in turn.
//
// Semantics: tcexport/methods/prune_merge.py (its docstring is the spec, PruneMerge.reference the ground truth).
// Each phase writes only the slots its thread index owns and reads only what earlier phases wrote.
#pragma once

#include "hd.h"
#include "tome_rows.h" // kToMePadBonus, kToMeProtectedScore, kToMeNormEps: the constants prune_merge.py shares

namespace tc
{

struct PruneMergeShape
{
    int n;        // tokens in
    int c;        // channels of x
    int ck;       // channels of the metric
    int k;        // dominant tokens kept (>= 1)
    int m;        // contextual tokens (>= 1)
    int protect;  // leading tokens copied first, never pruned or merged

    TC_HD int u() const // unprotected tokens
    {
        return n - protect;
    }
    TC_HD bool active() const // spec step 1: U <= K + M is a no-op
    {
        return u() > k + m;
    }
    TC_HD int rem() const // tokens left after the dominant ones (R)
    {
        return u() - k;
    }
    TC_HD int joiners() const // remaining tokens that are not targets (R - M)
    {
        return rem() - m;
    }
    TC_HD int n_out() const
    {
        return active() ? protect + k + m : n;
    }
};

// Scratch words per row, in the order prune_merge_scratch lays them out.
TC_HD long long prune_merge_scratch_words(int n, int ck)
{
    return 8LL * n + 1 + (long long) n * ck; // rank, dom, list, tgt, ntg, assign, member, start, unit
}

struct PruneMergeScratch
{
    int* rank;    // [u]  position of each unprotected token in the stable descending score order
    int* dom;     // [k]  dominant tokens (token index), original order
    int* list;    // [R]  the remaining tokens, real first, each group in original order
    int* tgt;     // [m]  target tokens (token index), target order j
    int* ntg;     // [R - m] joiner tokens (token index), list order
    int* assign;  // [R - m] the target each joiner joins
    int* member;  // [R - m] joiners grouped by target, list order within a group
    int* start;   // [m + 1] first member of each target
    float* unit;  // [n, ck] metric rows divided by their norm
};

TC_HD PruneMergeScratch prune_merge_scratch(int* words, int n)
{
    PruneMergeScratch s;
    s.rank = words;
    s.dom = s.rank + n;
    s.list = s.dom + n;
    s.tgt = s.list + n;
    s.ntg = s.tgt + n;
    s.assign = s.ntg + n;
    s.member = s.assign + n;
    s.start = s.member + n;
    s.unit = words_as_floats(s.start + n + 1);
    return s;
}

template <typename TX, typename TM, typename TS>
struct PruneMergeRow
{
    TX const* x;       // [n, c]
    TM const* metric;  // [n, ck]
    TS const* score;   // [n] CLS attention
    float const* size; // [n]
    float const* mask; // [n] or null
    TX* x_out;         // [n_out, c]
    float* size_out;   // [n_out]
    float* mask_out;   // [n_out] or null (without a mask input: all ones)
    PruneMergeScratch s;
};

// Batch row b of the whole tensors (scratch: prune_merge_scratch_words(n, ck) words per row).
template <typename TX, typename TM, typename TS>
TC_HD PruneMergeRow<TX, TM, TS> prune_merge_row_at(PruneMergeShape const& sh, int b, TX const* x, TM const* metric,
    TS const* score, float const* size, float const* mask, TX* x_out, float* size_out, float* mask_out, int* scratch)
{
    long long n = sh.n, n_out = sh.n_out();
    PruneMergeRow<TX, TM, TS> row;
    row.x = x + b * n * sh.c;
    row.metric = metric + b * n * sh.ck;
    row.score = score + b * n;
    row.size = size + b * n;
    row.mask = mask != nullptr ? mask + b * n : nullptr;
    row.x_out = x_out + b * n_out * sh.c;
    row.size_out = size_out + b * n_out;
    row.mask_out = mask_out != nullptr ? mask_out + b * n_out : nullptr;
    row.s = prune_merge_scratch(scratch + b * prune_merge_scratch_words(sh.n, sh.ck), sh.n);
    return row;
}

template <typename TX, typename TM, typename TS>
TC_HD bool pm_padding(PruneMergeRow<TX, TM, TS> const& row, int token)
{
    return row.mask != nullptr && row.mask[token] == 0.0f;
}

// Spec step 2: the dominance score of unprotected token i (token protect + i); protected tokens rank last and
// are never among the unprotected, so they need no score here.
template <typename TX, typename TM, typename TS>
TC_HD float pm_dominance(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int i)
{
    int token = sh.protect + i;
    float score = to_float(row.score[token]);
    if (row.mask != nullptr)
    {
        score = score - (1.0f - row.mask[token]) * kToMePadBonus;
    }
    return score;
}

// Spec step 5: list position of target j.
TC_HD int pm_target_position(PruneMergeShape const& sh, int j)
{
    if (sh.m == 1)
    {
        return 0;
    }
    long long r1 = sh.rem() - 1, m1 = sh.m - 1;
    return (int) ((j * r1 * 2 + m1) / (2 * m1));
}

// Phase 0: unit-norm metric rows (as tome_phase_norms) and the rank of every unprotected token (step 3).
template <typename TX, typename TM, typename TS>
TC_HD void pm_phase_norms_rank(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int t, int nt)
{
    for (int token = t; token < sh.n; token += nt)
    {
        TM const* mrow = row.metric + (long long) token * sh.ck;
        float sum = 0.0f;
        for (int q = 0; q < sh.ck; ++q)
        {
            float v = to_float(mrow[q]);
            sum += v * v;
        }
        float norm = sqrt_f(sum);
        norm = norm > kToMeNormEps ? norm : kToMeNormEps;
        float* unit = row.s.unit + (long long) token * sh.ck;
        for (int q = 0; q < sh.ck; ++q)
        {
            unit[q] = to_float(mrow[q]) / norm;
        }
        int i = token - sh.protect;
        if (i < 0)
        {
            continue;
        }
        float mine = pm_dominance(sh, row, i);
        int ahead = 0;
        for (int q = 0; q < sh.u(); ++q)
        {
            float other = pm_dominance(sh, row, q);
            ahead += (other > mine || (other == mine && q < i)) ? 1 : 0;
        }
        row.s.rank[i] = ahead;
    }
}

// Phase 1 (steps 3-4): dominant tokens in original order; the others listed real first (key index + N * pad).
template <typename TX, typename TM, typename TS>
TC_HD void pm_phase_split(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int t, int nt)
{
    PruneMergeScratch const& s = row.s;
    for (int i = t; i < sh.u(); i += nt)
    {
        int token = sh.protect + i;
        if (s.rank[i] < sh.k)
        {
            int slot = 0;
            for (int q = 0; q < i; ++q)
            {
                slot += s.rank[q] < sh.k ? 1 : 0;
            }
            s.dom[slot] = token;
            continue;
        }
        long long key = token + (long long) sh.n * (pm_padding(row, token) ? 1 : 0);
        int slot = 0;
        for (int q = 0; q < sh.u(); ++q)
        {
            int other = sh.protect + q;
            long long other_key = other + (long long) sh.n * (pm_padding(row, other) ? 1 : 0);
            slot += (s.rank[q] >= sh.k && other_key < key) ? 1 : 0;
        }
        s.list[slot] = token;
    }
}

// Phase 2 (step 5): targets at the spread positions, joiners at the others (list order).
template <typename TX, typename TM, typename TS>
TC_HD void pm_phase_targets(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int t, int nt)
{
    PruneMergeScratch const& s = row.s;
    for (int p = t; p < sh.rem(); p += nt)
    {
        int before = 0, target = -1;
        for (int j = 0; j < sh.m; ++j)
        {
            int position = pm_target_position(sh, j);
            before += position < p ? 1 : 0;
            target = position == p ? j : target;
        }
        if (target >= 0)
        {
            s.tgt[target] = s.list[p];
        }
        else
        {
            s.ntg[p - before] = s.list[p];
        }
    }
}

// Spec step 6: the score of joiner token a against target token b.
template <typename TX, typename TM, typename TS>
TC_HD float pm_join_score(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int a, int b)
{
    float const* ua = row.s.unit + (long long) a * sh.ck;
    float const* ub = row.s.unit + (long long) b * sh.ck;
    float dot = 0.0f;
    for (int q = 0; q < sh.ck; ++q)
    {
        dot += ua[q] * ub[q];
    }
    if (row.mask != nullptr)
    {
        bool pad_a = pm_padding(row, a), pad_b = pm_padding(row, b);
        if (pad_a && pad_b)
        {
            dot = dot + kToMePadBonus;
        }
        else if (pad_a != pad_b)
        {
            dot = dot - kToMePadBonus;
        }
    }
    return dot;
}

// Phase 3 (step 6): each joiner's target: first argmax over the targets (strict >).
template <typename TX, typename TM, typename TS>
TC_HD void pm_phase_assign(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int t, int nt)
{
    PruneMergeScratch const& s = row.s;
    for (int q = t; q < sh.joiners(); q += nt)
    {
        float best = 0.0f;
        int best_j = 0;
        for (int j = 0; j < sh.m; ++j)
        {
            float score = pm_join_score(sh, row, s.ntg[q], s.tgt[j]);
            if (j == 0 || score > best)
            {
                best = score;
                best_j = j;
            }
        }
        s.assign[q] = best_j;
    }
}

// Phase 4: the joiners grouped by target (member, start), by counting.
template <typename TX, typename TM, typename TS>
TC_HD void pm_phase_groups(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int t, int nt)
{
    PruneMergeScratch const& s = row.s;
    int joiners = sh.joiners();
    for (int job = t; job < joiners + sh.m + 1; job += nt)
    {
        if (job < joiners)
        {
            int a = s.assign[job], slot = 0;
            for (int q = 0; q < joiners; ++q)
            {
                slot += (s.assign[q] < a || (s.assign[q] == a && q < job)) ? 1 : 0;
            }
            s.member[slot] = s.ntg[job];
        }
        else
        {
            int j = job - joiners, before = 0;
            for (int q = 0; q < joiners; ++q)
            {
                before += s.assign[q] < j ? 1 : 0;
            }
            s.start[j] = before;
        }
    }
}

constexpr int kPruneMergeDecidePhases = 5;

template <typename TX, typename TM, typename TS>
TC_HD void prune_merge_decide_phase(int phase, PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, int t,
    int nt)
{
    switch (phase)
    {
    case 0: pm_phase_norms_rank(sh, row, t, nt); break;
    case 1: pm_phase_split(sh, row, t, nt); break;
    case 2: pm_phase_targets(sh, row, t, nt); break;
    case 3: pm_phase_assign(sh, row, t, nt); break;
    default: pm_phase_groups(sh, row, t, nt); break;
    }
}

// Output element e = o * c + channel (after the decide phases; an inactive shape copies its input, no phases
// needed): protected and dominant tokens are copied; contextual token j is the size-weighted mean of its target
// and the joiners: x' = (size_t x_t + sum(size_i x_i)) / (size_t + sum(size_i)), mask' = max.
template <typename TX, typename TM, typename TS>
TC_HD void prune_merge_gather_element(PruneMergeShape const& sh, PruneMergeRow<TX, TM, TS> const& row, long long e)
{
    PruneMergeScratch const& s = row.s;
    int o = (int) (e / sh.c), channel = (int) (e % sh.c);
    if (!sh.active() || o < sh.protect + sh.k)
    {
        int token = (!sh.active() || o < sh.protect) ? o : s.dom[o - sh.protect];
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
    int j = o - sh.protect - sh.k;
    int target = s.tgt[j];
    float joined = 0.0f, joined_size = 0.0f, any = 0.0f;
    for (int q = s.start[j]; q < s.start[j + 1]; ++q)
    {
        int token = s.member[q];
        float w = row.size[token];
        joined += to_float(row.x[(long long) token * sh.c + channel]) * w;
        joined_size += w;
        any += row.mask != nullptr ? row.mask[token] : 1.0f;
    }
    float st = row.size[target];
    float total = st + joined_size;
    row.x_out[e] = from_float<TX>((to_float(row.x[(long long) target * sh.c + channel]) * st + joined) / total);
    if (channel == 0)
    {
        row.size_out[o] = total;
        if (row.mask_out != nullptr)
        {
            float mine = row.mask != nullptr ? row.mask[target] : 1.0f;
            row.mask_out[o] = (mine + any) > 0.0f ? 1.0f : 0.0f;
        }
    }
}

} // namespace tc
