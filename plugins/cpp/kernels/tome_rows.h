// ToMeMerge per batch row: plain __host__ __device__ code, run by the CUDA kernels (one thread block per row,
// a barrier between phases) and by the host harness (every thread index in turn, phase after phase).
//
// Semantics: tcexport/methods/tome.py (its docstring is the spec, ToMe.reference the ground truth).
// Each phase only writes slots owned by its thread index and only reads what earlier phases wrote, so running
// the thread indices one after another on the host computes exactly what the threads compute in parallel.
#pragma once

#include "hd.h"

namespace tc
{

// The constants of methods/tome.py.
constexpr float kToMePadBonus = 4.0f;
constexpr float kToMeProtectedScore = -1.0e4f;
constexpr float kToMeNormEps = 1e-6f;

struct ToMeShape
{
    int n;         // tokens in
    int c;         // channels of x
    int ck;        // channels of the metric
    int r;         // tokens removed (0 <= r <= (n - protected) / 2; 0 is the identity)
    int protect;   // leading tokens never merged

    TC_HD int n_a() const
    {
        return (n + 1) / 2;
    }
    TC_HD int n_b() const
    {
        return n / 2;
    }
    TC_HD int n_out() const
    {
        return n - r;
    }
    TC_HD int keep_a() const // protected A tokens (even indices below protect)
    {
        return (protect + 1) / 2;
    }
    TC_HD int keep_b() const // protected B tokens (odd indices below protect)
    {
        return protect / 2;
    }
    TC_HD int n_unmerged() const // unprotected A tokens that stay
    {
        return n_a() - keep_a() - r;
    }
};

// Scratch words per row, in the order tome_scratch lays them out.
TC_HD long long tome_scratch_words(int n, int ck)
{
    int n_a = (n + 1) / 2;
    return 2LL * n          // dest, primary
        + 3LL * n_a         // node_max, node_idx, rank
        + n_a               // member (merged A tokens grouped by destination)
        + (n + 1)           // start (first member of each output token)
        + (long long) n * ck; // unit (the metric scaled to unit norm)
}

struct ToMeScratch
{
    float* node_max; // [n_a] best score of each A token
    int* node_idx;   // [n_a] its B partner (first argmax)
    int* rank;       // [n_a] position in the stable descending order of node_max
    int* dest;       // [n]   output token each input token goes to
    int* primary;    // [n_out] the one input token each output token starts from
    int* member;     // [r]   merged A tokens (token index), grouped by destination, A order within a group
    int* start;      // [n_out + 1] first member of each output token
    float* unit;     // [n, ck] metric rows divided by their norm (once, not once per pair)
};

TC_HD ToMeScratch tome_scratch(int* words, int n)
{
    int n_a = (n + 1) / 2;
    ToMeScratch s;
    s.node_max = words_as_floats(words);
    s.node_idx = words + n_a;
    s.rank = s.node_idx + n_a;
    s.dest = s.rank + n_a;
    s.primary = s.dest + n;
    s.member = s.primary + n;
    s.start = s.member + n_a;
    s.unit = words_as_floats(s.start + n + 1); // last: the only part whose length depends on ck
    return s;
}

// One batch row's tensors.
template <typename TX, typename TM>
struct ToMeRow
{
    TX const* x;        // [n, c]
    TM const* metric;   // [n, ck]
    float const* size;  // [n]
    float const* mask;  // [n] or null
    TX* x_out;          // [n_out, c]
    float* size_out;    // [n_out]
    float* mask_out;    // [n_out] or null (without a mask input: all ones)
    ToMeScratch s;
};

// Batch row b of the whole tensors (scratch: tome_scratch_words(n, ck) words per row).
template <typename TX, typename TM>
TC_HD ToMeRow<TX, TM> tome_row_at(ToMeShape const& sh, int b, TX const* x, TM const* metric, float const* size,
    float const* mask, TX* x_out, float* size_out, float* mask_out, int* scratch)
{
    long long n = sh.n, n_out = sh.n_out();
    ToMeRow<TX, TM> row;
    row.x = x + b * n * sh.c;
    row.metric = metric + b * n * sh.ck;
    row.size = size + b * n;
    row.mask = mask != nullptr ? mask + b * n : nullptr;
    row.x_out = x_out + b * n_out * sh.c;
    row.size_out = size_out + b * n_out;
    row.mask_out = mask_out != nullptr ? mask_out + b * n_out : nullptr;
    row.s = tome_scratch(scratch + b * tome_scratch_words(sh.n, sh.ck), sh.n);
    return row;
}

template <typename TX, typename TM>
TC_HD bool tome_is_padding(ToMeRow<TX, TM> const& row, int token)
{
    return row.mask != nullptr && row.mask[token] == 0.0f;
}

// Spec steps 2-5: the score of A token i against B token j.
template <typename TX, typename TM>
TC_HD float tome_score(ToMeShape const& sh, ToMeRow<TX, TM> const& row, int i, int j)
{
    int ta = 2 * i, tb = 2 * j + 1;
    if (ta < sh.protect || tb < sh.protect)
    {
        return kToMeProtectedScore;
    }
    float const* ua = row.s.unit + (long long) ta * sh.ck;
    float const* ub = row.s.unit + (long long) tb * sh.ck;
    float dot = 0.0f;
    for (int k = 0; k < sh.ck; ++k)
    {
        dot += ua[k] * ub[k];
    }
    if (row.mask != nullptr)
    {
        bool pad_a = tome_is_padding(row, ta), pad_b = tome_is_padding(row, tb);
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

// Output index of B token j (unprotected B tokens come last, in order).
TC_HD int tome_b_destination(ToMeShape const& sh, int j)
{
    int token = 2 * j + 1;
    if (token < sh.protect)
    {
        return token;
    }
    return sh.protect + sh.n_unmerged() + (j - sh.keep_b());
}

TC_HD bool tome_merged(ToMeShape const& sh, ToMeScratch const& s, int i)
{
    return sh.r > 0 && 2 * i >= sh.protect && s.rank[i] < sh.r;
}

// Phase 0: metric rows scaled to unit norm (norm clamped like the reference, which also divides before the
// product, so the scores are products of the same rounded unit values).
template <typename TX, typename TM>
TC_HD void tome_phase_norms(ToMeShape const& sh, ToMeRow<TX, TM> const& row, int t, int nt)
{
    for (int token = t; token < sh.n; token += nt)
    {
        TM const* m = row.metric + (long long) token * sh.ck;
        float sum = 0.0f;
        for (int k = 0; k < sh.ck; ++k)
        {
            float v = to_float(m[k]);
            sum += v * v;
        }
        float norm = sqrt_f(sum);
        norm = norm > kToMeNormEps ? norm : kToMeNormEps;
        float* unit = row.s.unit + (long long) token * sh.ck;
        for (int k = 0; k < sh.ck; ++k)
        {
            unit[k] = to_float(m[k]) / norm;
        }
    }
}

// Phase 1 (step 6): best B partner of each A token; ties go to the lowest B index (strict >).
template <typename TX, typename TM>
TC_HD void tome_phase_match(ToMeShape const& sh, ToMeRow<TX, TM> const& row, int t, int nt)
{
    for (int i = t; i < sh.n_a(); i += nt)
    {
        float best = 0.0f;
        int best_j = 0;
        for (int j = 0; j < sh.n_b(); ++j)
        {
            float score = tome_score(sh, row, i, j);
            if (j == 0 || score > best)
            {
                best = score;
                best_j = j;
            }
        }
        row.s.node_max[i] = best;
        row.s.node_idx[i] = best_j;
    }
}

// Phase 2 (step 7): rank of each A token in the stable descending order of node_max (equal values: the lower
// A index first), counted directly instead of sorted, so every thread decides alone and identically.
template <typename TX, typename TM>
TC_HD void tome_phase_rank(ToMeShape const& sh, ToMeRow<TX, TM> const& row, int t, int nt)
{
    for (int i = t; i < sh.n_a(); i += nt)
    {
        float mine = row.s.node_max[i];
        int ahead = 0;
        for (int k = 0; k < sh.n_a(); ++k)
        {
            float other = row.s.node_max[k];
            ahead += (other > mine || (other == mine && k < i)) ? 1 : 0;
        }
        row.s.rank[i] = ahead;
    }
}

// Phase 3 (step 8): where every input token goes: [protected, unmerged A, unprotected B]; merged A tokens go
// to their B partner's slot. r == 0 is the identity.
template <typename TX, typename TM>
TC_HD void tome_phase_destinations(ToMeShape const& sh, ToMeRow<TX, TM> const& row, int t, int nt)
{
    ToMeScratch const& s = row.s;
    for (int token = t; token < sh.n; token += nt)
    {
        int out;
        if (sh.r == 0 || token < sh.protect)
        {
            out = token;
        }
        else if (token % 2 == 1)
        {
            out = tome_b_destination(sh, token / 2);
        }
        else if (tome_merged(sh, s, token / 2))
        {
            s.dest[token] = tome_b_destination(sh, s.node_idx[token / 2]);
            continue; // not a primary: it joins its partner's output token
        }
        else
        {
            int before = 0; // unmerged unprotected A tokens before this one
            for (int k = sh.keep_a(); k < token / 2; ++k)
            {
                before += tome_merged(sh, s, k) ? 0 : 1;
            }
            out = sh.protect + before;
        }
        s.dest[token] = out;
        s.primary[out] = token;
    }
}

// Phase 4: the merged A tokens grouped by destination (member, start), by counting, without atomics.
template <typename TX, typename TM>
TC_HD void tome_phase_groups(ToMeShape const& sh, ToMeRow<TX, TM> const& row, int t, int nt)
{
    ToMeScratch const& s = row.s;
    int n_a = sh.n_a(), n_out = sh.n_out();
    for (int job = t; job < n_a + n_out + 1; job += nt)
    {
        if (job < n_a)
        {
            int i = job;
            if (!tome_merged(sh, s, i))
            {
                continue;
            }
            int d = s.dest[2 * i], slot = 0;
            for (int k = 0; k < n_a; ++k)
            {
                if (tome_merged(sh, s, k))
                {
                    int dk = s.dest[2 * k];
                    slot += (dk < d || (dk == d && k < i)) ? 1 : 0;
                }
            }
            s.member[slot] = 2 * i;
        }
        else
        {
            int o = job - n_a, before = 0;
            for (int k = 0; k < n_a; ++k)
            {
                before += (tome_merged(sh, s, k) && s.dest[2 * k] < o) ? 1 : 0;
            }
            s.start[o] = before;
        }
    }
}

constexpr int kToMeDecidePhases = 5;

template <typename TX, typename TM>
TC_HD void tome_decide_phase(int phase, ToMeShape const& sh, ToMeRow<TX, TM> const& row, int t, int nt)
{
    switch (phase)
    {
    case 0: tome_phase_norms(sh, row, t, nt); break;
    case 1: tome_phase_match(sh, row, t, nt); break;
    case 2: tome_phase_rank(sh, row, t, nt); break;
    case 3: tome_phase_destinations(sh, row, t, nt); break;
    default: tome_phase_groups(sh, row, t, nt); break;
    }
}

// Step 9, for element e = o * c + channel of the output (any thread, any order, after the decide phases):
// x' = sum(size * x) / sum(size) over the output token's inputs, size' = sum(size), mask' = max(mask).
// Protected tokens and r == 0 copy their input unchanged, as the reference does.
template <typename TX, typename TM>
TC_HD void tome_gather_element(ToMeShape const& sh, ToMeRow<TX, TM> const& row, long long e)
{
    ToMeScratch const& s = row.s;
    int o = (int) (e / sh.c), channel = (int) (e % sh.c);
    int first = s.primary[o];
    if (sh.r == 0 || o < sh.protect)
    {
        row.x_out[e] = row.x[(long long) first * sh.c + channel];
        if (channel == 0)
        {
            row.size_out[o] = row.size[first];
            if (row.mask_out != nullptr)
            {
                row.mask_out[o] = row.mask != nullptr ? row.mask[first] : 1.0f;
            }
        }
        return;
    }
    float total = row.size[first];
    float acc = total * to_float(row.x[(long long) first * sh.c + channel]);
    float any = row.mask != nullptr ? row.mask[first] : 1.0f; // no mask: every token is real
    for (int k = s.start[o]; k < s.start[o + 1]; ++k)
    {
        int token = s.member[k];
        float w = row.size[token];
        acc += w * to_float(row.x[(long long) token * sh.c + channel]);
        total += w;
        if (row.mask != nullptr && row.mask[token] > any)
        {
            any = row.mask[token];
        }
    }
    row.x_out[e] = from_float<TX>(acc / total);
    if (channel == 0)
    {
        row.size_out[o] = total;
        if (row.mask_out != nullptr)
        {
            row.mask_out[o] = any;
        }
    }
}

} // namespace tc
