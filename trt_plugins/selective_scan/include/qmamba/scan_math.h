// The SelectiveScan recurrence, written once for the CUDA kernel and the host harness.
//
// Contract: ../../../../shared/design/selective-scan-op.md (names in
// qmamba_deploy/ops/contract.py). For batch b, channel c (group k = c / (D / K)),
// state n and step t, with h[-1] = 0:
//
//     dt      = softplus(delta + delta_bias)        (or delta + delta_bias)
//     h[t, n] = exp(dt A[c, n]) h[t-1, n] + dt B[b, k, n, t] u[b, c, t]
//     y[t]    = sum_n C[b, k, n, t] h[t, n] + D_skip[c] u[b, c, t]
//
// One step is the affine map h -> a h + b with a = exp(dt A) <= 1. Maps compose
// associatively, which is what lets a CUDA block scan a tile of the sequence in
// parallel: every thread composes the maps of its own few steps, a block-wide scan
// of those composed maps gives each thread the state it starts from, and the
// thread replays its steps from there to write y. The state left at the end of a
// tile is carried into the next tile, so any length L is handled with a fixed
// block size. When B * D blocks alone cannot fill the GPU (MambaIRv2-light scans
// D = 48 channels), the sequence is also cut into S segments of whole tiles, one block
// each: a first pass composes each segment's map (its state from a zero start and its
// total decay) into a small workspace, and the second pass starts each segment from
// the state the maps of the segments before it give. Only decays <= 1 are ever multiplied together; nothing divides by a
// cumulative product, so nothing overflows for long sequences or large dt.
//
// This header is plain C++ when not compiled by nvcc (QMAMBA_HD expands to
// `inline`), so tests/host_harness.cpp runs exactly this arithmetic on a CPU.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define QMAMBA_HD __host__ __device__ __forceinline__
#else
#define QMAMBA_HD inline
#endif

namespace qmamba {
namespace scan {

//! softplus(x) = x for x > 20 (as torch.nn.functional.softplus).
constexpr float kSoftplusThreshold = 20.0f;

//! Block shape of the CUDA kernel; the host harness replays the same tiling.
constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kItems = 8;                     //!< consecutive steps owned by one thread
constexpr int kTile = kThreads * kItems;      //!< steps scanned per block iteration
constexpr int kMaxState = 16;                 //!< largest N compiled (every released model: 8, 10, 16)
constexpr int kMaxSegments = 64;              //!< most blocks sharing one (batch, channel) sequence

//! The shapes of one call (see the contract for the layouts).
struct Dims
{
    int32_t batch;   //!< B
    int32_t dim;     //!< D = K * Dk channels
    int32_t groups;  //!< K scan groups
    int32_t length;  //!< L = H * W
    int32_t state;   //!< N
};

//! h -> a * h + b.
struct Affine
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

QMAMBA_HD float apply(Affine f, float h)
{
    return f.a * h + f.b;
}

//! dt = softplus(delta + bias) or delta + bias.
QMAMBA_HD float step_size(float delta, float bias, bool softplus)
{
    float const z = delta + bias;
    if (!softplus || z > kSoftplusThreshold)
    {
        return z;
    }
    return log1pf(expf(z));
}

//! One step of the recurrence for one state: h -> exp(dt A) h + dt B u.
QMAMBA_HD Affine step_map(float dt, float a_cn, float b_t, float u_t)
{
    return Affine{expf(dt * a_cn), dt * b_t * u_t};
}

//! Offsets into the [B, D, L] and [B, K, N, L] tensors.
QMAMBA_HD int64_t offset_bdl(Dims const& d, int32_t b, int32_t c)
{
    return (static_cast<int64_t>(b) * d.dim + c) * d.length;
}

QMAMBA_HD int64_t offset_bknl(Dims const& d, int32_t b, int32_t k, int32_t n)
{
    return ((static_cast<int64_t>(b) * d.groups + k) * d.state + n) * d.length;
}

//! The composed map of the first `count` of kItems consecutive steps (one thread's share
//! of a tile, one state). The loops run over the compile-time kItems so that the arrays
//! stay in registers on the GPU.
QMAMBA_HD Affine segment_map(float const* dt, float const* u, float const* b, float a_cn, int count)
{
    Affine f = identity_map();
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < kItems; ++i)
    {
        if (i < count)
        {
            f = then(f, step_map(dt[i], a_cn, b[i], u[i]));
        }
    }
    return f;
}

//! Replays the first `count` steps from state h, adding C h to y; returns the state after them.
QMAMBA_HD float replay_segment(float h, float const* dt, float const* u, float const* b, float const* c, float a_cn,
    int count, float* y)
{
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < kItems; ++i)
    {
        if (i < count)
        {
            h = apply(step_map(dt[i], a_cn, b[i], u[i]), h);
            y[i] += c[i] * h;
        }
    }
    return h;
}

//! How many steps of the tile starting at `tile_start` thread `thread` owns (0 at or past
//! `end`), and where they start.
QMAMBA_HD int steps_owned(int64_t tile_start, int thread, int64_t end, int64_t* first)
{
    int64_t const t0 = tile_start + static_cast<int64_t>(thread) * kItems;
    *first = t0;
    int64_t const left = end - t0;
    return left <= 0 ? 0 : (left < kItems ? static_cast<int>(left) : kItems);
}

QMAMBA_HD int64_t tiles_in(Dims const& d)
{
    return (static_cast<int64_t>(d.length) + kTile - 1) / kTile;
}

//! Segments per (batch, channel) sequence: enough blocks for two per SM when B * D blocks are
//! fewer, at most one per tile and kMaxSegments.
QMAMBA_HD int32_t segments_for(Dims const& d, int32_t sm_count)
{
    int64_t const blocks = static_cast<int64_t>(d.batch) * d.dim;
    int64_t const wanted = 2 * static_cast<int64_t>(sm_count);
    int64_t s = blocks >= wanted ? 1 : (wanted + blocks - 1) / blocks;
    s = s < tiles_in(d) ? s : tiles_in(d);
    s = s < kMaxSegments ? s : kMaxSegments;
    return static_cast<int32_t>(s < 1 ? 1 : s);
}

//! Steps per segment (whole tiles) when a sequence is cut into `segments`.
QMAMBA_HD int64_t segment_length(Dims const& d, int32_t segments)
{
    int64_t const tiles_per_segment = (tiles_in(d) + segments - 1) / segments;
    return tiles_per_segment * kTile;
}

//! Offset of segment `s`'s map for state 0 in the workspace [B, D, S, N] of Affine maps.
QMAMBA_HD int64_t offset_segment(Dims const& d, int32_t b, int32_t c, int32_t s, int32_t segments)
{
    return ((static_cast<int64_t>(b) * d.dim + c) * segments + s) * d.state;
}

//! Workspace bytes that any number of segments the launcher may choose fits in.
inline size_t workspace_bytes(Dims const& d)
{
    int64_t const s = tiles_in(d) < kMaxSegments ? tiles_in(d) : kMaxSegments;
    return static_cast<size_t>(d.batch) * d.dim * (s < 1 ? 1 : s) * d.state * sizeof(Affine);
}

} // namespace scan
} // namespace qmamba

namespace qmamba {
namespace scan {

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
    return nullptr;
}

} // namespace scan
} // namespace qmamba
