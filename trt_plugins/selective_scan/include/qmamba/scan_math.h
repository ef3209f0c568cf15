// The SelectiveScan recurrence and the kernel's layout, written once for the CUDA kernel and the
// host harness.
//
// Contract: ../../../../shared/design/selective-scan-op.md (names in
// qmamba_deploy/ops/contract.py). For batch b, channel c (group k = c / (D / K)),
// state n and step t, with h[-1] = 0:
//
//     dt      = softplus(delta + delta_bias)        (or delta + delta_bias)
//     h[t, n] = exp(dt A[c, n]) h[t-1, n] + dt B[b, k, n, t] u[b, c, t]
//     y[t]    = sum_n C[b, k, n, t] h[t, n] + D_skip[c] u[b, c, t]
//
// One step is the affine map h -> a h + b with a = exp(dt A) = exp2(dt A log2(e)). Maps compose
// associatively, which is what lets lanes scan a sequence in parallel.
//
// Layout (src/selective_scan_kernel.cu): a block of kThreads = 128 threads works on kChannels = 8
// channels of one group, kLanes = 16 lanes (half a warp) per channel. Per tile of kTile = 256
// steps, lane j owns kItems = 16 consecutive steps t0 + 16 j .. t0 + 16 j + 15 of its channel:
//   * u and delta come in with 16-byte loads (a row is read with vector loads when its address
//     is 16-byte aligned and the lane's 16 steps are inside the sequence; scalar loads otherwise);
//   * the whole block stages the tile's B and C rows of the group (N rows each) into shared
//     memory as float32, so the 8 channels read B and C from shared memory instead of 8 times
//     from L2;
//   * decaying tiles (every step of the block decays: dt >= 0 and A <= 0, a vote per tile; always
//     with softplus on and A = -exp(A_log)): per state n the lane forms its 16 step maps once (one
//     exp2 each, A pre-scaled by log2(e); b = dt u B), composes them, a 16-lane Kogge-Stone scan
//     of the composed maps (the carried state folded into lane 0) gives every lane its start
//     state, and the lane replays its 16 steps from it with the kept maps, adding C h to y. The
//     last lane's inclusive state is carried to the next tile. Composed maps only ever hold
//     decays <= 1, and nothing divides by a cumulative product;
//   * other tiles (a step may grow: delta_softplus = 0 with dt < 0, A > 0, NaN): the lanes walk
//     their steps one after another (exact, slower), since composed maps could overflow where
//     the recurrence is finite.
//
// Modes (choose(), when a workspace is given and one pass would leave the GPU idle):
//   * two passes: each sequence is cut into S segments of whole tiles, one block each. Pass 1
//     runs segments 0 .. S-2 without output and writes each segment's map (decay
//     exp2(A2 * sum dt), state from a zero start) by reduction (no scan, no replay); a segment
//     with a tile that may grow writes an invalid map (a = -1). Pass 2 composes the maps of the
//     earlier segments (compose_parts() threads per channel and state, then a tree), or, when one
//     of them is invalid, runs the recurrence over them again, then scans its segment;
//   * fused: one launch of one-tile segments, all blocks resident (a cooperative launch): phase
//     1 composes and scans each tile's lanes and writes the tile's maps, a grid-wide barrier,
//     phase 2 composes the earlier tiles' maps and replays each lane from its prefix map.
//
// This header is plain C++ when not compiled by nvcc (QMAMBA_HD expands to `inline`), so
// tests/host_harness.cpp runs exactly this arithmetic and these index functions on a CPU.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define QMAMBA_HD __host__ __device__ __forceinline__
#else
#define QMAMBA_HD inline
#endif
// Loops over a lane's kItems steps are unrolled on the GPU so that their arrays stay in registers.
#if defined(__CUDA_ARCH__)
#define QMAMBA_UNROLL _Pragma("unroll")
#else
#define QMAMBA_UNROLL
#endif

namespace qmamba {
namespace scan {

//! softplus(x) = x for x > 20 (as torch.nn.functional.softplus).
constexpr float kSoftplusThreshold = 20.0f;
constexpr float kLog2e = 1.4426950408889634f;

//! Block shape of the CUDA kernel; the host harness replays the same layout.
constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kLanes = 16;                     //!< lanes per channel (half a warp)
constexpr int kChannels = kThreads / kLanes;   //!< channels of one group per block
constexpr int kItems = 16;                     //!< consecutive steps owned by one lane
constexpr int kTile = kLanes * kItems;         //!< steps of one channel per block iteration
constexpr int kVecBytes = 16;                  //!< one vector load or store
constexpr int kChunk = 4;                      //!< floats per 16-byte shared-memory chunk
constexpr int kChunksPerRow = kTile / kChunk;  //!< chunks of one staged B or C row
constexpr int kMaxState = 16;                  //!< largest N compiled (every released model: 8, 10, 16)
constexpr int kMinBlocksPerSm = 4;             //!< __launch_bounds__: at most 128 registers
constexpr int kMaxSegments = 128;              //!< most blocks sharing one (batch, channel) sequence
//! Segments are only cut to fill the GPU: never more blocks than this (16 blocks on 512 SMs).
constexpr int64_t kMaxBlocksInFlight = 8192;
//! The largest grid (gridDim.x).
constexpr int64_t kMaxGrid = 2147483647;

static_assert(kThreads % kLanes == 0 && kWarpSize % kLanes == 0, "a channel's lanes live in one warp");
static_assert(kMaxState <= kLanes, "pass 1 writes one state's map per lane");
static_assert(kItems % kChunk == 0 && kTile % kChunk == 0 && kChunk == 4, "whole chunks of 4 per lane and per row");

//! The shapes of one call (see the contract for the layouts).
struct Dims
{
    int32_t batch;   //!< B
    int32_t dim;     //!< D = K * Dk channels
    int32_t groups;  //!< K scan groups
    int32_t length;  //!< L = H * W
    int32_t state;   //!< N
};

//! h -> a * h + b (8-byte aligned: one 64-bit load or store on the GPU).
struct alignas(8) Affine
{
    float a;
    float b;
};

QMAMBA_HD Affine identity_map()
{
    return Affine{1.0f, 0.0f};
}

//! The map "first, then second".
QMAMBA_HD Affine then(Affine first, Affine second)
{
    return Affine{first.a * second.a, second.a * first.b + second.b};
}

//! 2^x: one MUFU.EX2 on the GPU (ex2.approx, relative error ~2^-22), exp2f on the host.
QMAMBA_HD float fast_exp2(float x)
{
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return std::exp2(x);
#endif
}

//! x / y, for y in [2, 3]: MUFU.RCP and a multiply on the GPU.
QMAMBA_HD float fast_divide(float x, float y)
{
#if defined(__CUDA_ARCH__)
    return __fdividef(x, y);
#else
    return x / y;
#endif
}

//! a * b + c with one rounding: FFMA on the GPU, std::fma on the host (so that the host harness
//! rounds as the kernel does).
QMAMBA_HD float madd(float a, float b, float c)
{
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}

//! softplus(z) = max(z, 0) + log1p(exp(-|z|)), with log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
//! and 2 atanh(s) / s a polynomial of degree 4 in s^2 (Chebyshev fit on [0, 1/9]: relative error
//! < 1e-8, below the float32 rounding of the result). One exp2 and one reciprocal per step.
//! z > kSoftplusThreshold needs no select: exp(-z) < 2.1e-9 is below half an ulp of z, so the sum
//! rounds to z exactly (torch returns z there). z = -inf gives exactly 0 (the fast path's padding).
QMAMBA_HD float softplus(float z)
{
    float const e = fast_exp2(-std::fabs(z) * kLog2e);
    float const s = fast_divide(e, 2.0f + e);
    float const s2 = s * s;
    float p = 0.281654507f;
    p = madd(p, s2, 0.279530019f);
    p = madd(p, s2, 0.400264502f);
    p = madd(p, s2, 0.666662395f);
    p = madd(p, s2, 2.0f);
    return madd(s, p, std::fmax(z, 0.0f));
}

// ---------------------------------------------------------------------------------------------
// One lane's share of a tile.

//! What a lane holds for its kItems steps: dt, dt * u and y (started at D_skip * u). Steps past
//! the end of the sequence get dt = 0 and u = 0, which makes their maps the identity
//! (a = exp2(0) = 1, b = 0): no step count is needed in the arithmetic below.
struct LaneSteps
{
    float dt[kItems];
    float dtu[kItems];
    float y[kItems];
};

//! delta of a step past the end of the sequence with softplus on: softplus(-inf) = 0 exactly, so
//! with u = 0 the step's map is the identity, without a select per step.
constexpr float kDeltaPad = -std::numeric_limits<float>::infinity();

//! delta_softplus = 1: dt = softplus(delta + bias), dt u and D_skip u of the lane's steps (u = 0
//! and delta = kDeltaPad past the end of the sequence).
QMAMBA_HD void prepare_softplus(float const* u, float const* delta, float bias, float d_skip, LaneSteps& s)
{
    QMAMBA_UNROLL
    for (int i = 0; i < kItems; ++i)
    {
        float const dt = softplus(delta[i] + bias);
        s.dt[i] = dt;
        s.dtu[i] = dt * u[i];
        s.y[i] = d_skip * u[i];
    }
}

//! delta_softplus = 0: dt = delta + bias for the `count` steps inside the sequence, 0 after
//! (u = 0 there).
QMAMBA_HD void prepare_plain(float const* u, float const* delta, int count, float bias, float d_skip, LaneSteps& s)
{
    QMAMBA_UNROLL
    for (int i = 0; i < kItems; ++i)
    {
        float const dt = i < count ? delta[i] + bias : 0.0f;
        s.dt[i] = dt;
        s.dtu[i] = dt * u[i];
        s.y[i] = d_skip * u[i];
    }
}

//! Sum of the lane's dt (its composed decay is exp2(A2 * sum)).
QMAMBA_HD float lane_dt_sum(LaneSteps const& s)
{
    float sum = 0.0f;
    QMAMBA_UNROLL
    for (int i = 0; i < kItems; ++i)
    {
        sum += s.dt[i];
    }
    return sum;
}

//! v[0] + ... + v[15] by a pairwise tree: ((v0 + v1) + (v2 + v3)) + ...
QMAMBA_HD float pairwise_sum(float const* v)
{
    static_assert(kLanes == 16, "a tree of four levels");
    float t[8];
    QMAMBA_UNROLL
    for (int i = 0; i < 8; ++i)
    {
        t[i] = v[2 * i] + v[2 * i + 1];
    }
    float const q0 = (t[0] + t[1]) + (t[2] + t[3]);
    float const q1 = (t[4] + t[5]) + (t[6] + t[7]);
    return q0 + q1;
}

//! Whether every dt of the lane is >= 0 (false for NaN). With A2 <= 0 in every state, each step
//! then decays: a = exp2(dt A2) <= 1.
QMAMBA_HD bool steps_decay(LaneSteps const& s)
{
    bool all = true;
    QMAMBA_UNROLL
    for (int i = 0; i < kItems; ++i)
    {
        all = all && s.dt[i] >= 0.0f;
    }
    return all;
}

// ---------------------------------------------------------------------------------------------
// Decaying tiles: every step of the tile decays (dt >= 0 and A2 <= 0), as in every exported model
// (softplus on, A = -exp(A_log)). The lanes' maps are then composed and scanned: composed maps
// only ever hold decays <= 1, so nothing overflows and nothing divides by a cumulative product.

//! One state's step maps of the lane, h -> a[i] h + b[i] with a = exp2(dt A2) (the one exp2 per
//! state and step) and b = dt u B: formed once, kept in registers from compose to replay.
struct StepMaps
{
    float a[kItems];
    float b[kItems];
};

//! f(i, b) for the lane's steps i = 0 .. kItems-1 in order, with b = dt u B: b_row is the lane's
//! part of a staged B row, dtu the lane's dt u, both read by chunks: chunk(part, out) gives values
//! 4 part .. 4 part + 3 (one 16-byte shared load on the GPU: the kernel keeps dt u in shared
//! memory through the state loop, so that the maps fit in registers).
template <typename DtuRow, typename BRow, typename F>
QMAMBA_HD void for_each_b(DtuRow const& dtu, BRow const& b_row, F&& f)
{
    QMAMBA_UNROLL
    for (int part = 0; part < kItems / kChunk; ++part)
    {
        float bv[kChunk];
        float uv[kChunk];
        b_row.chunk(part, bv);
        dtu.chunk(part, uv);
        QMAMBA_UNROLL
        for (int e = 0; e < kChunk; ++e)
        {
            f(kChunk * part + e, uv[e] * bv[e]);
        }
    }
}

template <typename DtuRow, typename BRow>
QMAMBA_HD void step_maps(float const* dt, DtuRow const& dtu, float a2, BRow const& b_row, StepMaps& m)
{
    for_each_b(dtu, b_row, [&](int i, float b) {
        m.a[i] = fast_exp2(dt[i] * a2);
        m.b[i] = b;
    });
}

//! A lane's kItems values in an array, read by chunks as a staged row is.
struct LaneArray
{
    float const* values;

    QMAMBA_HD void chunk(int part, float* out) const
    {
        QMAMBA_UNROLL
        for (int e = 0; e < kChunk; ++e)
        {
            out[e] = values[kChunk * part + e];
        }
    }
};

//! The state after the lane's steps from a zero state: the b-part of their composed map.
QMAMBA_HD float compose(StepMaps const& m)
{
    float h = m.b[0];
    QMAMBA_UNROLL
    for (int i = 1; i < kItems; ++i)
    {
        h = madd(m.a[i], h, m.b[i]);
    }
    return h;
}

//! Walks the lane's steps from its start state h, adding C h to y.
template <typename CRow>
QMAMBA_HD void replay_output(float h, StepMaps const& m, CRow const& c_row, float* y)
{
    QMAMBA_UNROLL
    for (int part = 0; part < kItems / kChunk; ++part)
    {
        float cv[kChunk];
        c_row.chunk(part, cv);
        QMAMBA_UNROLL
        for (int e = 0; e < kChunk; ++e)
        {
            int const i = kChunk * part + e;
            h = madd(m.a[i], h, m.b[i]);
            y[i] = madd(cv[e], h, y[i]);
        }
    }
}

//! Pass 1 and the fused mode's first phase: the state after the lane's steps from a zero state,
//! each decay formed where it is used (nothing kept for a replay).
template <typename DtuRow, typename BRow>
QMAMBA_HD float compose_steps(float const* dt, DtuRow const& dtu, float a2, BRow const& b_row)
{
    float h = 0.0f;
    for_each_b(dtu, b_row, [&](int i, float b) { h = i == 0 ? b : madd(fast_exp2(dt[i] * a2), h, b); });
    return h;
}

// ---------------------------------------------------------------------------------------------
// Other tiles (a step with dt A2 > 0 is possible: delta_softplus = 0 with dt < 0, A > 0, NaN): a
// step map can then grow (a > 1) and composed maps could overflow where the recurrence is
// finite, so the lanes walk their steps one after another (exact, slower), and pass 1 marks the
// segment's maps invalid.

//! Walks the lane's steps from h (decays formed on the way), adding C h to y; returns the state
//! after them.
template <typename DtuRow, typename BRow, typename CRow>
QMAMBA_HD float serial_steps(float h, float const* dt, DtuRow const& dtu, float a2, BRow const& b_row,
    CRow const& c_row, float* y)
{
    QMAMBA_UNROLL
    for (int part = 0; part < kItems / kChunk; ++part)
    {
        float bv[kChunk];
        float cv[kChunk];
        float uv[kChunk];
        b_row.chunk(part, bv);
        c_row.chunk(part, cv);
        dtu.chunk(part, uv);
        QMAMBA_UNROLL
        for (int e = 0; e < kChunk; ++e)
        {
            int const i = kChunk * part + e;
            h = madd(fast_exp2(dt[i] * a2), h, uv[e] * bv[e]);
            y[i] = madd(cv[e], h, y[i]);
        }
    }
    return h;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory staging of B and C: float32 rows [2 N][kTile] (B rows, then C rows). A row is
// stored "part-major": chunk (part p, lane l) = the lane's steps 4 p .. 4 p + 3 = tile steps
// 16 l + 4 p .. + 3, at floats 4 (p * kLanes + l). A lane's 16-byte load of part p then reads 16
// consecutive chunks across its 16 lanes (no bank conflict, one base address plus constant
// offsets per lane), and the staging threads are assigned so that consecutive threads store
// consecutive chunks (no bank conflict) while each warp's 16-byte global loads use whole 32-byte
// sectors.

//! Float offset in a staged row of the lane's part p.
QMAMBA_HD int stage_offset(int lane, int part)
{
    return kChunk * (part * kLanes + lane);
}

//! Float offset of row `row` (0 .. 2N-1: B rows then C rows) of the staged tile.
QMAMBA_HD int stage_row(int row)
{
    return row * kTile;
}

//! Staging work item `w` of one row (0 .. kTile / elems - 1, for 16-byte global chunks of
//! `elems` = 4 (fp32) or 8 (fp16) elements): the first tile step it loads, and the float offset
//! of its first float chunk (an fp16 chunk fills the lane's parts p and p + 1).
struct StageItem
{
    int step;
    int offset;
};

QMAMBA_HD StageItem stage_item(int w, int elems)
{
    int const parts_per_chunk = elems / kChunk;               // 1 (fp32) or 2 (fp16)
    int const lane = w % kLanes;
    int const part = (w / kLanes) * parts_per_chunk;
    return StageItem{kItems * lane + kChunk * part, stage_offset(lane, part)};
}

//! The vector width of one 16-byte global access, in elements of `elem_bytes`.
QMAMBA_HD int vector_elems(int elem_bytes)
{
    return kVecBytes / elem_bytes;
}

QMAMBA_HD bool aligned16(uint64_t address)
{
    return address % kVecBytes == 0;
}

//! How many of the kItems steps starting at `t` lie before `end`.
QMAMBA_HD int steps_before(int64_t t, int64_t end)
{
    int64_t const left = end - t;
    return left <= 0 ? 0 : (left < kItems ? static_cast<int>(left) : kItems);
}

// ---------------------------------------------------------------------------------------------
// Grid, segments and workspace.

QMAMBA_HD int64_t offset_bdl(Dims const& d, int32_t b, int32_t c)
{
    return (static_cast<int64_t>(b) * d.dim + c) * d.length;
}

QMAMBA_HD int64_t offset_bknl(Dims const& d, int32_t b, int32_t k, int32_t n)
{
    return ((static_cast<int64_t>(b) * d.groups + k) * d.state + n) * d.length;
}

QMAMBA_HD int64_t tiles_in(Dims const& d)
{
    return (static_cast<int64_t>(d.length) + kTile - 1) / kTile;
}

//! Blocks per group: ceil(Dk / kChannels).
QMAMBA_HD int32_t blocks_per_group(Dims const& d)
{
    int32_t const per_group = d.dim / d.groups;
    return (per_group + kChannels - 1) / kChannels;
}

//! Blocks of one segment of every sequence: B * K * ceil(Dk / kChannels).
QMAMBA_HD int64_t blocks_per_segment(Dims const& d)
{
    return static_cast<int64_t>(d.batch) * d.groups * blocks_per_group(d);
}

//! n / d for n < 2^31 by a multiply-high and a shift (Granlund-Montgomery): with
//! l = ceil(log2 d) >= 1, m = ceil(2^(31 + l) / d) < 2^32 and n / d = (n m / 2^32) >> (l - 1);
//! d = 1 keeps m = 0. Computed on the host once per call (Plan), used per block on the GPU.
struct FastDiv
{
    uint32_t m;
    uint32_t shift;
};

QMAMBA_HD FastDiv fast_div(uint32_t d)
{
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d)
    {
        ++l;
    }
    if (l == 0)
    {
        return FastDiv{0, 0};
    }
    uint64_t const m = ((uint64_t{1} << (31 + l)) + d - 1) / d;
    return FastDiv{static_cast<uint32_t>(m), l - 1};
}

QMAMBA_HD uint32_t divide(uint32_t n, FastDiv f)
{
#if defined(__CUDA_ARCH__)
    uint32_t const high = __umulhi(n, f.m);
#else
    uint32_t const high = static_cast<uint32_t>((static_cast<uint64_t>(n) * f.m) >> 32);
#endif
    return f.m == 0 ? n : high >> f.shift;
}

//! How a call is cut: `segments` segments of `segment_length` steps (whole tiles; the last may
//! be shorter), and what the blocks need to find their place (grids have fewer than 2^31 blocks:
//! check_dims, max_segments).
struct Plan
{
    int32_t segments;
    int64_t segment_length;
    uint32_t groups;        //!< K
    uint32_t per_group;     //!< channels per group, D / K
    uint32_t group_blocks;  //!< blocks per group, ceil(D / K / kChannels)
    FastDiv by_group_blocks;
    FastDiv by_groups;
    FastDiv by_segments[2]; //!< by S (pass 2, one pass) and by S - 1 (pass 1)
};

//! The plan for (at most) `segments` segments: whole tiles per segment, no empty segment.
QMAMBA_HD Plan plan_for(Dims const& d, int32_t segments)
{
    int64_t const tiles = tiles_in(d) < 1 ? 1 : tiles_in(d);
    int64_t const wanted = segments < 1 ? 1 : (segments > tiles ? tiles : segments);
    int64_t const per_segment = (tiles + wanted - 1) / wanted;
    Plan p{};
    p.segments = static_cast<int32_t>((tiles + per_segment - 1) / per_segment);
    p.segment_length = per_segment * kTile;
    p.groups = static_cast<uint32_t>(d.groups);
    p.per_group = static_cast<uint32_t>(d.dim / d.groups);
    p.group_blocks = static_cast<uint32_t>(blocks_per_group(d));
    p.by_group_blocks = fast_div(p.group_blocks);
    p.by_groups = fast_div(static_cast<uint32_t>(d.groups));
    p.by_segments[0] = fast_div(static_cast<uint32_t>(p.segments));
    p.by_segments[1] = fast_div(static_cast<uint32_t>(p.segments > 1 ? p.segments - 1 : 1));
    return p;
}

//! Where one block works: batch b, group k, its first channel, segment s.
struct BlockCoord
{
    int32_t b;
    int32_t k;
    int32_t first_channel;
    int32_t channels;  //!< channels of the group from first_channel on, at most kChannels
    int32_t segment;
};

//! Block `block` of pass 2 / one pass (pass1 = false: S segments) or of pass 1 (S - 1 segments)
//! -> coordinates: consecutive blocks are the blocks of one group at one segment (they share B
//! and C in L2), then groups, segments, batch.
QMAMBA_HD BlockCoord block_coord(Plan const& p, uint32_t block, bool pass1)
{
    uint32_t const segments = static_cast<uint32_t>(pass1 ? p.segments - 1 : p.segments);
    uint32_t const x = divide(block, p.by_group_blocks); // block = x * group_blocks + j
    uint32_t const y = divide(x, p.by_groups);             // x = y * groups + k
    uint32_t const b = divide(y, p.by_segments[pass1 ? 1 : 0]);
    uint32_t const j = block - x * p.group_blocks;
    BlockCoord at{};
    at.k = static_cast<int32_t>(x - y * p.groups);
    at.segment = static_cast<int32_t>(y - b * segments);
    at.b = static_cast<int32_t>(b);
    at.first_channel = static_cast<int32_t>(static_cast<uint32_t>(at.k) * p.per_group + j * kChannels);
    int32_t const left = static_cast<int32_t>(p.per_group - j * kChannels);
    at.channels = left < kChannels ? left : kChannels;
    return at;
}

//! Most segments the launcher may choose for these dims (what the workspace is sized for).
QMAMBA_HD int64_t max_segments(Dims const& d)
{
    int64_t const per = blocks_per_segment(d);
    int64_t s = kMaxBlocksInFlight / (per < 1 ? 1 : per);
    s = s < tiles_in(d) ? s : tiles_in(d);
    s = s < kMaxSegments ? s : kMaxSegments;
    return s < 1 ? 1 : s;
}

//! Relative costs for segments_for, in units of "one block scans one tile with output":
//! a tile of pass 1 (no C, no replay, no y: about 0.7 of the bytes, 0.63 of the instructions),
//! the second launch, and the composition of the earlier segments' maps per segment.
constexpr double kMapsTileCost = 0.7;
constexpr double kSecondLaunchCost = 1.0;
constexpr double kPrologueCostPerSegment = 1.0 / 512.0;

//! Estimated time of a plan on `slots` = SMs x resident blocks per SM: waves of equal blocks,
//! so a last, partly filled wave costs a whole one.
inline double plan_cost(Dims const& d, Plan const& p, int64_t slots)
{
    int64_t const per = blocks_per_segment(d);
    double const tiles = static_cast<double>(p.segment_length / kTile);
    double const waves2 = static_cast<double>((per * p.segments + slots - 1) / slots);
    double cost = waves2 * (tiles + kPrologueCostPerSegment * (p.segments - 1));
    if (p.segments > 1)
    {
        double const waves1 = static_cast<double>((per * (p.segments - 1) + slots - 1) / slots);
        cost += waves1 * tiles * kMapsTileCost + kSecondLaunchCost;
    }
    return cost;
}

//! Segments per sequence, from the GPU's SM count and the kernel's real occupancy (resident
//! blocks per SM): the cheapest plan by plan_cost, which counts the tail wave and pass 1.
inline int32_t segments_for(Dims const& d, int32_t sm_count, int32_t blocks_per_sm)
{
    int64_t const slots = static_cast<int64_t>(sm_count < 1 ? 1 : sm_count) * (blocks_per_sm < 1 ? 1 : blocks_per_sm);
    int32_t best = 1;
    double best_cost = plan_cost(d, plan_for(d, 1), slots);
    for (int32_t s = 2; s <= max_segments(d); ++s)
    {
        Plan const p = plan_for(d, s);
        if (p.segments != s)
        {
            continue; // the same cut as a smaller count
        }
        double const cost = plan_cost(d, p, slots);
        if (cost < best_cost * 0.999)
        {
            best = s;
            best_cost = cost;
        }
    }
    return best;
}

//! The fused mode (one launch of one-tile segments with a grid-wide barrier between the tiles'
//! maps and the output; needs every block resident, a cooperative launch, softplus on): its
//! largest N (its shared memory stays within 48 KB of static shared memory), and its cost per
//! block in plan_cost's units (phase 1 composes without output, phase 2 replays with the decays
//! formed again, and the block's setup comes with every tile: about 1.5 of a one-pass tile's
//! instructions by the SASS counts, 148 against 99 per step at N = 8).
constexpr int kMaxFusedState = 12;
constexpr double kFusedTileCost = 1.5;

//! What the launcher runs: a plan of one or two passes, or the fused mode (plan: one tile per
//! segment; `unfused`: the plan of one or two passes to run instead should the cooperative
//! launch find fewer resident blocks than the occupancy it was chosen with).
struct Choice
{
    Plan plan;
    bool fused;
    Plan unfused;
};

//! The cheapest of one pass, two passes (segments_for) and, when `fusable` (softplus on, the
//! caller allows it), the fused mode when all its blocks fit the GPU at `fused_blocks_per_sm`.
inline Choice choose(Dims const& d, bool fusable, int32_t sm_count, int32_t blocks_per_sm, int32_t fused_blocks_per_sm)
{
    Plan const plan = plan_for(d, segments_for(d, sm_count, blocks_per_sm));
    int64_t const tiles = tiles_in(d);
    int64_t const per = blocks_per_segment(d);
    bool const fits = static_cast<int64_t>(sm_count) * fused_blocks_per_sm >= per * tiles;
    if (fusable && d.state <= kMaxFusedState && fused_blocks_per_sm > 0 && tiles > 1 && tiles <= max_segments(d) && fits)
    {
        int64_t const slots = static_cast<int64_t>(sm_count < 1 ? 1 : sm_count) * (blocks_per_sm < 1 ? 1 : blocks_per_sm);
        double const fused = kFusedTileCost + kPrologueCostPerSegment * static_cast<double>(tiles - 1);
        if (fused < plan_cost(d, plan, slots) * 0.999)
        {
            return Choice{plan_for(d, static_cast<int32_t>(tiles)), true, plan};
        }
    }
    return Choice{plan, false, plan};
}

//! Pass 2's composition of the earlier segments' maps: the block's kChannels x N (channel, state)
//! pairs get `parts` consecutive threads each (a power of two, as many as fit in kThreads);
//! part p composes its run of maps in order, then a shuffle tree over the parts.
constexpr QMAMBA_HD int compose_parts(int state)
{
    int parts = 1;
    while (2 * parts * kChannels * state <= kThreads)
    {
        parts *= 2;
    }
    return parts;
}

//! Workspace offset of segment s's map for (b, c, n) when pass 1 writes `maps` = S - 1 segments:
//! [B, D, N, S - 1] Affine maps, the segments of one state contiguous.
QMAMBA_HD int64_t offset_map(Dims const& d, int32_t b, int32_t c, int32_t n, int32_t s, int32_t maps)
{
    return ((static_cast<int64_t>(b) * d.dim + c) * d.state + n) * maps + s;
}

//! Workspace bytes that the maps of any plan the launcher may choose, for these dims or smaller
//! B and L (the same D, K, N), fit in: B' * min(tiles, kMaxSegments, kMaxBlocksInFlight /
//! (B' * blocks per batch)) segment rows is at most the smaller of B * min(tiles, kMaxSegments)
//! and max(B, kMaxBlocksInFlight / blocks per batch).
inline size_t workspace_bytes(Dims const& d)
{
    int64_t const tiles = tiles_in(d) < kMaxSegments ? tiles_in(d) : kMaxSegments;
    int64_t const per_batch = static_cast<int64_t>(d.groups) * blocks_per_group(d);
    int64_t const by_length = static_cast<int64_t>(d.batch) * (tiles < 1 ? 1 : tiles);
    int64_t const by_blocks = d.batch > kMaxBlocksInFlight / per_batch ? d.batch : kMaxBlocksInFlight / per_batch;
    int64_t const rows = by_length < by_blocks ? by_length : by_blocks;
    return static_cast<size_t>(rows) * d.dim * d.state * sizeof(Affine);
}

//! Why these dims cannot be scanned, or nullptr when they can.
inline char const* check_dims(Dims const& d)
{
    if (d.batch < 1 || d.dim < 1 || d.groups < 1 || d.length < 0)
    {
        return "SelectiveScan: batch, channels (D) and groups (K) must be >= 1 and L >= 0";
    }
    if (d.dim % d.groups != 0)
    {
        return "SelectiveScan: the channels of u (D) must be a multiple of the groups of B/C (K)";
    }
    if (d.state < 1 || d.state > kMaxState)
    {
        return "SelectiveScan: state size N must be 1..16 (the kernel is compiled for N <= 16)";
    }
    if (blocks_per_segment(d) > kMaxGrid)
    {
        return "SelectiveScan: batch * K * ceil(D / K / 8) must be at most 2^31 - 1 (CUDA blocks of one launch)";
    }
    return nullptr;
}

} // namespace scan
} // namespace qmamba
