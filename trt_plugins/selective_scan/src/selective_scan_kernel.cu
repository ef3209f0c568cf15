// The SelectiveScan forward kernel: one block per (batch, channel[, segment]), a chunked
// parallel scan over the sequence with the state carried from tile to tile (scan_math.h).
//
// Per tile of kTile = kThreads * kItems steps:
//   1. each thread loads its kItems steps of u and delta (float32 math whatever the
//      I/O type), computes dt, and for every state n composes its steps into one
//      affine map (segment_map);
//   2. a warp-level inclusive scan of those maps (shuffles), warp totals through
//      shared memory: each thread now knows the state it starts from, given the
//      state carried in from the previous tile;
//   3. each thread replays its steps from that state, accumulating y = sum_n C h + D u
//      (replay_segment), and writes y;
//   4. the tile's composed map advances the carried map.
// With a workspace and fewer than two blocks per SM, each sequence is cut into segments
// (whole tiles): pass 1 (kTotalsOnly) writes each segment's composed map, pass 2 starts
// each segment from the state the earlier segments' maps give, then runs steps 1-4.
// B and C of a group are read by the Dk blocks of its channels (they stay in L2).
#include <cuda_fp16.h>

#include "qmamba/selective_scan.h"

namespace qmamba {
namespace {

using scan::Affine;

template <typename T>
struct Io;

template <>
struct Io<float>
{
    static __device__ __forceinline__ float load(float const* p)
    {
        return __ldg(p);
    }
    static __device__ __forceinline__ void store(float* p, float v)
    {
        *p = v;
    }
};

template <>
struct Io<__half>
{
    static __device__ __forceinline__ float load(__half const* p)
    {
        return __half2float(__ldg(p));
    }
    static __device__ __forceinline__ void store(__half* p, float v)
    {
        *p = __float2half_rn(v);
    }
};

__device__ __forceinline__ Affine shuffle_up(Affine f, unsigned delta)
{
    return Affine{__shfl_up_sync(0xffffffffu, f.a, delta), __shfl_up_sync(0xffffffffu, f.b, delta)};
}

template <typename T>
__device__ __forceinline__ void load_steps(T const* src, int64_t t0, int count, float* dst)
{
#pragma unroll
    for (int i = 0; i < scan::kItems; ++i)
    {
        dst[i] = i < count ? Io<T>::load(src + t0 + i) : 0.0f;
    }
}

//! kTotalsOnly: the first pass of a segmented scan (each segment's composed maps into the
//! workspace, no y). Otherwise: the scan of one segment (all of L when gridDim.z == 1),
//! starting from the state the maps of the earlier segments give.
template <typename T, int N, bool kTotalsOnly>
__global__ void __launch_bounds__(scan::kThreads) selective_scan_kernel(ScanArgs args)
{
    using namespace scan;
    Dims const d = args.dims;
    int32_t const c = static_cast<int32_t>(blockIdx.x);
    int32_t const b = static_cast<int32_t>(blockIdx.y);
    int32_t const segment = static_cast<int32_t>(blockIdx.z);
    int32_t const segments = static_cast<int32_t>(gridDim.z);
    int32_t const k = c / (d.dim / d.groups);
    int const thread = static_cast<int>(threadIdx.x);
    int const lane = thread % kWarpSize;
    int const warp = thread / kWarpSize;
    int64_t const seg_len = segment_length(d, segments);
    int64_t const begin = segment * seg_len;
    int64_t const end = begin + seg_len < d.length ? begin + seg_len : static_cast<int64_t>(d.length);

    T const* u = static_cast<T const*>(args.u) + offset_bdl(d, b, c);
    T const* delta = static_cast<T const*>(args.delta) + offset_bdl(d, b, c);
    T* y = static_cast<T*>(args.y) + offset_bdl(d, b, c);
    T const* Bg = static_cast<T const*>(args.B) + offset_bknl(d, b, k, 0);
    T const* Cg = static_cast<T const*>(args.C) + offset_bknl(d, b, k, 0);
    Affine* totals = static_cast<Affine*>(args.workspace);

    float a[N];
#pragma unroll
    for (int n = 0; n < N; ++n)
    {
        a[n] = __ldg(args.A + static_cast<int64_t>(c) * N + n);
    }
    float const d_skip = args.D_skip != nullptr ? __ldg(args.D_skip + c) : 0.0f;
    float const bias = args.delta_bias != nullptr ? __ldg(args.delta_bias + c) : 0.0f;

    __shared__ Affine warp_totals[kWarps][N];
    __shared__ Affine carry[N]; // segment start state -> state before the current tile
    __shared__ float h0[N];     // the state the segment starts from
    if (thread < N)
    {
        carry[thread] = identity_map();
        float h = 0.0f;
        if (!kTotalsOnly)
        {
            for (int32_t s = 0; s < segment; ++s)
            {
                h = apply(totals[offset_segment(d, b, c, s, segments) + thread], h);
            }
        }
        h0[thread] = h;
    }
    __syncthreads();

    for (int64_t tile = begin; tile < end; tile += kTile)
    {
        int64_t t0 = 0;
        int const count = steps_owned(tile, thread, end, &t0);
        float uu[kItems];
        float dt[kItems];
        float yy[kItems];
        float bc[kItems];
        load_steps(u, t0, count, uu);
        load_steps(delta, t0, count, dt);
#pragma unroll
        for (int i = 0; i < kItems; ++i)
        {
            dt[i] = step_size(dt[i], bias, args.delta_softplus);
            yy[i] = d_skip * uu[i];
        }

        // 1-2. compose this thread's steps, scan the composed maps across the block.
        Affine before_me[N];
#pragma unroll
        for (int n = 0; n < N; ++n)
        {
            load_steps(Bg + static_cast<int64_t>(n) * d.length, t0, count, bc);
            Affine f = segment_map(dt, uu, bc, a[n], count);
#pragma unroll
            for (unsigned offset = 1; offset < kWarpSize; offset *= 2)
            {
                Affine const earlier = shuffle_up(f, offset);
                if (lane >= static_cast<int>(offset))
                {
                    f = then(earlier, f);
                }
            }
            if (lane == kWarpSize - 1)
            {
                warp_totals[warp][n] = f;
            }
            Affine const exclusive = shuffle_up(f, 1);
            before_me[n] = lane == 0 ? identity_map() : exclusive;
        }
        __syncthreads();

        // 3. replay from the state this thread starts from.
        if (!kTotalsOnly)
        {
#pragma unroll
            for (int n = 0; n < N; ++n)
            {
                Affine prefix = carry[n];
                for (int w = 0; w < warp; ++w)
                {
                    prefix = then(prefix, warp_totals[w][n]);
                }
                float const h = apply(then(prefix, before_me[n]), h0[n]);
                float bv[kItems];
                load_steps(Bg + static_cast<int64_t>(n) * d.length, t0, count, bv);
                load_steps(Cg + static_cast<int64_t>(n) * d.length, t0, count, bc);
                replay_segment(h, dt, uu, bv, bc, a[n], count, yy);
            }
#pragma unroll
            for (int i = 0; i < kItems; ++i)
            {
                if (i < count)
                {
                    Io<T>::store(y + t0 + i, yy[i]);
                }
            }
        }
        __syncthreads();

        // 4. carry the tile's map into the next tile.
        if (thread < N)
        {
            Affine f = carry[thread];
#pragma unroll
            for (int w = 0; w < kWarps; ++w)
            {
                f = then(f, warp_totals[w][thread]);
            }
            carry[thread] = f;
        }
        __syncthreads();
    }
    if (kTotalsOnly && thread < N)
    {
        totals[offset_segment(d, b, c, segment, segments) + thread] = carry[thread];
    }
}

template <typename T, int N>
cudaError_t launch_with_state(ScanArgs const& args, int32_t segments, cudaStream_t stream)
{
    dim3 const grid(static_cast<unsigned>(args.dims.dim), static_cast<unsigned>(args.dims.batch),
        static_cast<unsigned>(segments));
    if (segments > 1)
    {
        selective_scan_kernel<T, N, true><<<grid, scan::kThreads, 0, stream>>>(args);
    }
    selective_scan_kernel<T, N, false><<<grid, scan::kThreads, 0, stream>>>(args);
    return cudaGetLastError();
}

//! Picks the instantiation for the runtime state size (N = 1 .. kMaxState).
template <typename T, int N = 1>
cudaError_t dispatch_state(ScanArgs const& args, int32_t segments, cudaStream_t stream)
{
    if constexpr (N > scan::kMaxState)
    {
        return cudaErrorInvalidValue;
    }
    else
    {
        if (args.dims.state == N)
        {
            return launch_with_state<T, N>(args, segments, stream);
        }
        return dispatch_state<T, N + 1>(args, segments, stream);
    }
}

} // namespace

cudaError_t launch_selective_scan(ScanArgs const& args, cudaStream_t stream)
{
    if (scan::check_dims(args.dims) != nullptr || args.u == nullptr || args.delta == nullptr || args.A == nullptr
        || args.B == nullptr || args.C == nullptr || args.y == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (args.dims.length == 0)
    {
        return cudaSuccess;
    }
    if (args.dims.batch > 65535) // gridDim.y
    {
        return cudaErrorInvalidConfiguration;
    }
    int32_t segments = 1;
    if (args.workspace != nullptr)
    {
        int device = 0;
        int sm_count = 0;
        cudaError_t const e = cudaGetDevice(&device);
        if (e != cudaSuccess || cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        {
            return cudaGetLastError();
        }
        segments = scan::segments_for(args.dims, sm_count);
    }
    return args.io == IOType::kFLOAT16 ? dispatch_state<__half>(args, segments, stream)
                                       : dispatch_state<float>(args, segments, stream);
}

} // namespace qmamba
