// The SelectiveScan forward kernel (layout and arithmetic: include/qmamba/scan_math.h).
//
// One block = 8 channels of one group x 16 lanes, per tile of 256 steps:
//   1. each lane loads its 16 consecutive steps of u and delta (16-byte loads where the row is
//      aligned), computes dt (softplus), dt * u and D_skip * u;
//   2. the block stages the tile's B and C rows (N each, float32, swizzled 16-byte chunks) in
//      shared memory;
//   3. per state n (a runtime loop, so registers do not grow with N): the lane's 16 step maps
//      (one exp2 each) stay in registers through compose -> 16-lane scan -> replay; the carried
//      state lives in shared memory. A (tile, state) with growing maps runs lane after lane;
//   4. y is stored with 16-byte stores.
// Pass 1 of the segmented mode is the same loop without C, replay and y (kOutput = false).
#include <cuda_fp16.h>

#include "qmamba/selective_scan.h"

namespace qmamba {
namespace {

using scan::Affine;
using scan::kChannels;
using scan::kChunk;
using scan::kItems;
using scan::kLanes;
using scan::kThreads;
using scan::kTile;

//! One 16-byte global store (st.global.v4: the compiler otherwise splits a store whose four
//! values do not sit in consecutive registers into 4-byte stores).
__device__ __forceinline__ void store16(void* p, unsigned x, unsigned y, unsigned z, unsigned w)
{
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(x), "r"(y), "r"(z), "r"(w) : "memory");
}

template <typename T>
struct Io;

template <>
struct Io<float>
{
    //! The lane's kItems steps from row + t (count valid, `fill` after).
    static __device__ __forceinline__ void load(float const* row, int64_t t, int count, bool vec, float* out,
        float fill = 0.0f)
    {
        if (vec && count == kItems)
        {
            float4 const* p = reinterpret_cast<float4 const*>(row + t);
#pragma unroll
            for (int v = 0; v < kItems / 4; ++v)
            {
                float4 const x = __ldg(p + v);
                out[4 * v] = x.x;
                out[4 * v + 1] = x.y;
                out[4 * v + 2] = x.z;
                out[4 * v + 3] = x.w;
            }
            return;
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i)
        {
            out[i] = i < count ? __ldg(row + t + i) : fill;
        }
    }

    static __device__ __forceinline__ void store(float* row, int64_t t, int count, bool vec, float const* in)
    {
        if (vec && count == kItems)
        {
#pragma unroll
            for (int v = 0; v < kItems / 4; ++v)
            {
                store16(row + t + 4 * v, __float_as_uint(in[4 * v]), __float_as_uint(in[4 * v + 1]),
                    __float_as_uint(in[4 * v + 2]), __float_as_uint(in[4 * v + 3]));
            }
            return;
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i)
        {
            if (i < count)
            {
                row[t + i] = in[i];
            }
        }
    }

    //! One 16-byte chunk (4 elements) of a B/C row into shared memory, inside the row and aligned.
    static __device__ __forceinline__ void stage_vector(float const* src, float* dst)
    {
        *reinterpret_cast<float4*>(dst) = __ldg(reinterpret_cast<float4 const*>(src));
    }

    //! One 16-byte chunk (4 elements) of a B/C row into shared memory.
    static __device__ __forceinline__ void stage(float const* row, int64_t t, int64_t end, bool vec, float* dst)
    {
        float4 x;
        if (vec && t + 4 <= end)
        {
            x = __ldg(reinterpret_cast<float4 const*>(row + t));
        }
        else
        {
            x.x = t < end ? __ldg(row + t) : 0.0f;
            x.y = t + 1 < end ? __ldg(row + t + 1) : 0.0f;
            x.z = t + 2 < end ? __ldg(row + t + 2) : 0.0f;
            x.w = t + 3 < end ? __ldg(row + t + 3) : 0.0f;
        }
        *reinterpret_cast<float4*>(dst) = x;
    }
};

template <>
struct Io<__half>
{
    static __device__ __forceinline__ void unpack(uint4 v, float* out)
    {
        __half2 const* h = reinterpret_cast<__half2 const*>(&v);
#pragma unroll
        for (int p = 0; p < 4; ++p)
        {
            float2 const f = __half22float2(h[p]);
            out[2 * p] = f.x;
            out[2 * p + 1] = f.y;
        }
    }

    static __device__ __forceinline__ void load(__half const* row, int64_t t, int count, bool vec, float* out,
        float fill = 0.0f)
    {
        if (vec && count == kItems)
        {
            uint4 const* p = reinterpret_cast<uint4 const*>(row + t);
#pragma unroll
            for (int v = 0; v < kItems / 8; ++v)
            {
                unpack(__ldg(p + v), out + 8 * v);
            }
            return;
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i)
        {
            out[i] = i < count ? __half2float(__ldg(row + t + i)) : fill;
        }
    }

    static __device__ __forceinline__ void store(__half* row, int64_t t, int count, bool vec, float const* in)
    {
        if (vec && count == kItems)
        {
#pragma unroll
            for (int v = 0; v < kItems / 8; ++v)
            {
                unsigned w[4];
#pragma unroll
                for (int q = 0; q < 4; ++q)
                {
                    __half2 const h = __floats2half2_rn(in[8 * v + 2 * q], in[8 * v + 2 * q + 1]);
                    w[q] = *reinterpret_cast<unsigned const*>(&h);
                }
                store16(row + t + 8 * v, w[0], w[1], w[2], w[3]);
            }
            return;
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i)
        {
            if (i < count)
            {
                row[t + i] = __float2half_rn(in[i]);
            }
        }
    }

    //! One 16-byte chunk (8 elements) of a B/C row, inside the row and aligned: two float chunks,
    //! at dst and dst + scan::stage_offset(0, 1).
    static __device__ __forceinline__ void stage_vector(__half const* src, float* dst)
    {
        float f[8];
        unpack(__ldg(reinterpret_cast<uint4 const*>(src)), f);
        *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);
        *reinterpret_cast<float4*>(dst + scan::stage_offset(0, 1)) = make_float4(f[4], f[5], f[6], f[7]);
    }

    //! One 16-byte chunk (8 elements) of a B/C row: two float chunks, at dst0 and dst1.
    static __device__ __forceinline__ void stage(__half const* row, int64_t t, int64_t end, bool vec, float* dst0,
        float* dst1)
    {
        float f[8];
        if (vec && t + 8 <= end)
        {
            unpack(__ldg(reinterpret_cast<uint4 const*>(row + t)), f);
        }
        else
        {
#pragma unroll
            for (int i = 0; i < 8; ++i)
            {
                f[i] = t + i < end ? __half2float(__ldg(row + t + i)) : 0.0f;
            }
        }
        *reinterpret_cast<float4*>(dst0) = make_float4(f[0], f[1], f[2], f[3]);
        *reinterpret_cast<float4*>(dst1) = make_float4(f[4], f[5], f[6], f[7]);
    }
};

//! `x`, opaque to the optimiser: what is computed from it is computed where it is used, not
//! hoisted out of a loop and kept in registers across the state loop.
__device__ __forceinline__ int32_t opaque(int32_t x)
{
    asm volatile("" : "+r"(x));
    return x;
}

__device__ __forceinline__ bool aligned_row(void const* p)
{
    return scan::aligned16(reinterpret_cast<uintptr_t>(p));
}

//! Shared memory of one block: the staged B and C rows (only B in pass 1: kMaps), A * log2(e) and
//! the carried states.
template <int N, bool kMaps>
struct alignas(16) Shared
{
    static constexpr int kState = N;
    float bc[(kMaps ? 1 : 2) * N * kTile];
    float a2[kChannels][N];
    float carry[kChannels][N];
    float d_skip[kChannels];
    float bias[kChannels];
    float dt_sum[kThreads]; //!< each lane's sum of dt in the current tile (read once per state)
};

//! The block's B (and C when kOutput) rows for steps [t0, t0 + kTile) into shared memory.
template <typename T, int N, bool kOutput, typename Sm>
__device__ __forceinline__ void stage_tile(ScanArgs const& args, int32_t b, int32_t k, int64_t t0, Sm& sm)
{
    constexpr int kElems = 16 / sizeof(T);           // elements per 16-byte global chunk
    constexpr int kPerRow = kTile / kElems;           // global chunks per row
    constexpr int kRows = kOutput ? 2 * N : N;
    scan::Dims const& d = args.dims;
    int64_t const end = d.length;
    int64_t const group = scan::offset_bknl(d, b, k, 0);
    T const* const b_rows = static_cast<T const*>(args.B) + group;
    T const* const c_rows = static_cast<T const*>(args.C) + group;
    // Thread f of the block stages chunk f % kPerRow of rows f / kPerRow, + kThreads / kPerRow, ...
    // (the f = thread + kThreads r assignment of the host harness): the chunk, its step and its
    // place in a staged row are the same for all of the thread's rows.
    static_assert(kThreads % kPerRow == 0, "a thread stages the same chunk of every row it stages");
    scan::StageItem const item = scan::stage_item(static_cast<int>(threadIdx.x) % kPerRow, kElems);
    int64_t const t = t0 + item.step;
    for (int row = static_cast<int>(threadIdx.x) / kPerRow; row < kRows; row += kThreads / kPerRow)
    {
        // rows 0 .. N-1: B, N .. 2N-1: C
        T const* src = (row < N ? b_rows : c_rows) + static_cast<int64_t>(row < N ? row : row - N) * end;
        float* dst = sm.bc + scan::stage_row(row) + item.offset;
        if constexpr (kElems == 4)
        {
            Io<T>::stage(src, t, end, aligned_row(src), dst);
        }
        else
        {
            Io<T>::stage(src, t, end, aligned_row(src), dst, dst + scan::stage_offset(0, 1));
        }
    }
}

//! A lane's view of one staged row: chunk(part) = its values 4 part .. 4 part + 3 (one 16-byte
//! shared load).
struct StagedRow
{
    float const* base;
    int lane;

    __device__ __forceinline__ void chunk(int part, float* out) const
    {
        float4 const x = *reinterpret_cast<float4 const*>(base + scan::stage_offset(lane, part));
        out[0] = x.x;
        out[1] = x.y;
        out[2] = x.z;
        out[3] = x.w;
    }
};

template <typename Sm>
__device__ __forceinline__ StagedRow staged_row(Sm const& sm, int row, int lane)
{
    return StagedRow{sm.bc + scan::stage_row(row), lane};
}

//! What a block knows about its channel lanes.
struct LaneCtx
{
    int32_t b;
    int32_t k;
    int32_t c;         //!< this lane's channel
    int ch;            //!< its index in the block
    int lane;          //!< 0 .. kLanes - 1 within the channel
    unsigned mask;     //!< the channel's lanes in the warp
    bool active;       //!< c is a channel of the group
};

//! Scans tiles [begin, end) of every channel of the block from the states in sm.carry, leaving
//! the states at `end` there. kOutput: writes y. `signs_seen` collects dt signs per state that
//! grew (bit n). `dt_total` accumulates the lane's dt.
template <typename T, int N, bool kOutput, typename Sm>
__device__ void scan_tiles(ScanArgs const& args, Sm& sm, LaneCtx const& at, uint32_t begin, uint32_t end,
    unsigned* grew, float* dt_total)
{
    scan::Dims const& d = args.dims;
    // Positions in a row fit 32 bits (L < 2^31, so t0 + kTile < 2^32): fewer registers through
    // the state loop than 64-bit ones.
    for (uint32_t t0 = begin; t0 < end; t0 += kTile)
    {
        // Row pointers per tile (cheap) rather than kept across the state loop (registers).
        int64_t const row_off = scan::offset_bdl(d, opaque(at.b), opaque(at.active ? at.c : 0));
        uint32_t const t = t0 + static_cast<uint32_t>(at.lane) * kItems;
        int const count = at.active ? scan::steps_before(t, end) : 0;
        scan::LaneSteps s;
        {
            T const* u_row = static_cast<T const*>(args.u) + row_off;
            T const* delta_row = static_cast<T const*>(args.delta) + row_off;
            float raw_u[kItems];
            float raw_delta[kItems];
            Io<T>::load(u_row, t, count, aligned_row(u_row), raw_u);
            Io<T>::load(delta_row, t, count, aligned_row(delta_row), raw_delta);
            scan::prepare_steps(raw_u, raw_delta, count, sm.bias[at.ch], sm.d_skip[at.ch], args.delta_softplus, s);
        }
        {
            float const dt_sum = scan::lane_dt_sum(s);
            sm.dt_sum[threadIdx.x] = dt_sum; // not kept in a register through the state loop
            if (!kOutput)
            {
                *dt_total += dt_sum;
            }
        }
        unsigned const signs = scan::dt_signs(s);
        unsigned const neg = __ballot_sync(0xffffffffu, (signs & 1u) != 0) & at.mask;
        unsigned const pos = __ballot_sync(0xffffffffu, (signs & 2u) != 0) & at.mask;
        unsigned const channel_signs = (neg != 0 ? 1u : 0u) | (pos != 0 ? 2u : 0u);

        __syncthreads(); // the previous tile's rows are read
        stage_tile<T, N, kOutput>(args, at.b, at.k, t0, sm);
        __syncthreads();

        // Every lane runs the state loop, also those of a channel past the group's end (they
        // scan zeros and store nothing), so that the shuffles below involve the whole warp.
        {
#pragma unroll 1
            for (int n = 0; n < N; ++n)
            {
                float const a2 = sm.a2[at.ch][n];
                float const carry = at.lane == 0 ? sm.carry[at.ch][n] : 0.0f; // lane 0 starts from it
                float a[kItems];
                scan::step_decays(s, a2, a);
                StagedRow const b_row = staged_row(sm, n, at.lane);
                StagedRow const c_row = staged_row(sm, N + n, at.lane);
                float h_start; // the state before the lane's first step
                float h_end;   // lane kLanes - 1: the state after the tile
                // Both channels of the warp take the same path (the plain recurrence when either
                // one's maps grow), so that the shuffles are warp-wide.
                if (__any_sync(0xffffffffu, scan::grows(a2, channel_signs)))
                {
                    // The plain recurrence, lane after lane (every lane walks its steps from
                    // the state broadcast so far; lane src's result goes on): no composed map.
                    if (!kOutput && scan::grows(a2, channel_signs))
                    {
                        *grew |= 1u << n; // this channel's segment map would not be safe to compose
                    }
                    float h = __shfl_sync(0xffffffffu, carry, 0, kLanes);
                    h_start = h;
#pragma unroll 1
                    for (int src = 0; src < kLanes; ++src)
                    {
                        if (at.lane == src)
                        {
                            h_start = h;
                        }
                        h = __shfl_sync(0xffffffffu, scan::replay(h, a, s.dtu, b_row, scan::NoRow{}, nullptr), src, kLanes);
                    }
                    h_end = h;
                }
                else
                {
                    Affine f = scan::lane_map(a, s.dtu, b_row, a2, sm.dt_sum[threadIdx.x]);
                    if (at.lane == 0)
                    {
                        f.b = f.a * carry + f.b; // the carried state enters as lane 0's start
                    }
#pragma unroll
                    for (int off = 1; off < kLanes; off *= 2)
                    {
                        float const up_b = __shfl_up_sync(0xffffffffu, f.b, off, kLanes);
                        float const up_a = off < kLanes / 2 ? __shfl_up_sync(0xffffffffu, f.a, off, kLanes) : 1.0f;
                        if (at.lane >= off)
                        {
                            f.b = f.a * up_b + f.b;
                            f.a = f.a * up_a; // dead after the last round
                        }
                    }
                    float const before = __shfl_up_sync(0xffffffffu, f.b, 1, kLanes);
                    h_start = at.lane == 0 ? carry : before;
                    h_end = f.b;
                }
                if (kOutput)
                {
                    scan::replay(h_start, a, s.dtu, b_row, c_row, s.y);
                }
                __syncwarp(); // lane 0 has read sm.carry[ch][n]
                if (at.lane == kLanes - 1)
                {
                    sm.carry[at.ch][n] = h_end;
                }
            }
            if (kOutput && at.active)
            {
                T* y_row = static_cast<T*>(args.y) + scan::offset_bdl(d, opaque(at.b), opaque(at.c));
                // t and count again rather than kept in registers through the state loop
                uint32_t const t_out = t0 + static_cast<uint32_t>(at.lane) * kItems;
                Io<T>::store(y_row, t_out, scan::steps_before(t_out, end), aligned_row(y_row), s.y);
            }
        }
    }
}

//! The composition of the maps of segments 0 .. s-1 (pass 1's output) for each channel and
//! state, into sm.carry. Lanes compose runs of segments, then a tree over the 16 lanes.
//! Returns whether one of the maps is invalid (growing steps in that segment).
template <typename Sm>
__device__ bool compose_segments(ScanArgs const& args, Sm& sm, LaneCtx const& at, int32_t s, int32_t maps)
{
    constexpr int N = Sm::kState;
    if (!at.active)
    {
        return false;
    }
    Affine const* ws = static_cast<Affine const*>(args.workspace);
    int32_t const run = (s + kLanes - 1) / kLanes;
    int32_t const first = at.lane * run;
    int32_t const last = first + run < s ? first + run : s;
    bool bad = false;
#pragma unroll 1
    for (int n = 0; n < N; ++n)
    {
        Affine f = scan::identity_map();
        Affine const* m = ws + scan::offset_map(args.dims, at.b, at.c, n, 0, maps);
        for (int32_t q = first; q < last; ++q)
        {
            Affine const g = m[q];
            bad |= g.a < 0.0f;
            f = scan::then(f, g);
        }
#pragma unroll
        for (int off = 1; off < kLanes; off *= 2)
        {
            float const next_a = __shfl_down_sync(at.mask, f.a, off, kLanes);
            float const next_b = __shfl_down_sync(at.mask, f.b, off, kLanes);
            if (at.lane % (2 * off) == 0)
            {
                f = scan::then(f, Affine{next_a, next_b});
            }
        }
        if (at.lane == 0)
        {
            sm.carry[at.ch][n] = f.b; // the state at the segment's start (from h = 0 at t = 0)
        }
    }
    return bad;
}

//! The general path of one block (any signs of dt and A): growing (tile, state)s run as the plain
//! recurrence, pass 1 marks their segment maps invalid, pass 2 then reruns the recurrence over
//! the earlier segments.
template <typename T, int N, bool kMaps, typename Sm>
__device__ void general_segment(ScanArgs const& args, scan::Plan const& plan, Sm& sm, LaneCtx const& at,
    scan::BlockCoord const& bc, uint32_t begin, uint32_t end)
{
    scan::Dims const& d = args.dims;
    int const tid = static_cast<int>(threadIdx.x);
    unsigned grew = 0;
    float dt_total = 0.0f;
    if constexpr (kMaps)
    {
        scan_tiles<T, N, false>(args, sm, at, begin, end, &grew, &dt_total);
        __syncthreads();
#pragma unroll
        for (int off = 1; off < kLanes; off *= 2)
        {
            dt_total += __shfl_xor_sync(0xffffffffu, dt_total, off, kLanes);
        }
        if (at.active && at.lane < N)
        {
            int const n = at.lane;
            bool const invalid = ((grew >> n) & 1u) != 0; // the same on every lane of the channel
            Affine* ws = static_cast<Affine*>(args.workspace);
            ws[scan::offset_map(d, at.b, at.c, n, bc.segment, plan.segments - 1)]
                = Affine{invalid ? -1.0f : scan::fast_exp2(sm.a2[at.ch][n] * dt_total), sm.carry[at.ch][n]};
        }
    }
    else
    {
        if (bc.segment > 0)
        {
            bool const bad = compose_segments(args, sm, at, bc.segment, plan.segments - 1);
            if (__syncthreads_or(bad))
            {
                // An earlier segment had growing maps: run the recurrence over [0, begin) instead.
                for (int i = tid; i < kChannels * N; i += kThreads)
                {
                    sm.carry[i / N][i % N] = 0.0f;
                }
                __syncthreads();
                scan_tiles<T, N, false>(args, sm, at, 0u, begin, &grew, &dt_total);
            }
            __syncthreads();
        }
        scan_tiles<T, N, true>(args, sm, at, begin, end, &grew, &dt_total);
    }
}

// ---------------------------------------------------------------------------------------------
// The decaying path (scan_math.h): softplus on and A <= 0 in every channel of the block.

//! Whether every B (and C) row of the block's group can be staged with 16-byte loads: aligned
//! first rows and rows a whole number of 16-byte chunks long.
template <typename T, bool kWithC>
__device__ __forceinline__ bool rows_vectorisable(ScanArgs const& args, int32_t b, int32_t k)
{
    int64_t const group = scan::offset_bknl(args.dims, b, k, 0);
    bool const rows = static_cast<int64_t>(args.dims.length) * static_cast<int64_t>(sizeof(T)) % scan::kVecBytes == 0;
    return rows && aligned_row(static_cast<T const*>(args.B) + group)
        && (!kWithC || aligned_row(static_cast<T const*>(args.C) + group));
}

//! stage_tile() for a tile inside the sequence whose rows are all vectorisable: every thread
//! stages its chunk of kRows / (kThreads / chunks per row) rows, unrolled, without checks.
template <typename T, int N, int kRows, typename Sm>
__device__ __forceinline__ void stage_tile_vector(ScanArgs const& args, int32_t b, int32_t k, uint32_t t0, Sm& sm)
{
    constexpr int kElems = 16 / sizeof(T);
    constexpr int kPerRow = kTile / kElems;
    constexpr int kStride = kThreads / kPerRow; // rows staged by the block per round
    int64_t const length = args.dims.length;
    int64_t const group = scan::offset_bknl(args.dims, b, k, 0);
    int const first = static_cast<int>(threadIdx.x) / kPerRow;
    scan::StageItem const item = scan::stage_item(static_cast<int>(threadIdx.x) % kPerRow, kElems);
    int64_t const at = group + first * length + t0 + item.step;
    T const* const b_src = static_cast<T const*>(args.B) + at;
    T const* const c_src = static_cast<T const*>(args.C) + at;
    float* const dst = sm.bc + scan::stage_row(first) + item.offset;
#pragma unroll
    for (int r = 0; r < kRows; r += kStride)
    {
        // rows first + r: B rows 0 .. N-1, then C rows (known at compile time unless the round
        // straddles N)
        int const row = first + r;
        if (kRows % kStride == 0 || row < kRows)
        {
            bool const is_b = r + kStride <= N || (r < N && row < N);
            T const* src = is_b ? b_src + r * length : c_src + (r - N) * length;
            Io<T>::stage_vector(src, dst + scan::stage_row(r));
        }
    }
}

//! Stages the tile's B (and C when kWithC) rows: vector path or stage_tile().
template <typename T, int N, bool kWithC, typename Sm>
__device__ __forceinline__ void stage_decaying(ScanArgs const& args, LaneCtx const& at, uint32_t t0, bool vec_rows, Sm& sm)
{
    if (vec_rows && t0 + kTile <= static_cast<uint32_t>(args.dims.length))
    {
        stage_tile_vector<T, N, kWithC ? 2 * N : N>(args, at.b, at.k, t0, sm);
    }
    else
    {
        stage_tile<T, N, kWithC>(args, at.b, at.k, t0, sm);
    }
}

//! The lane's steps of tile t0 (u and delta, padded past `end`) -> dt, dt u, D_skip u.
template <typename T, typename Sm>
__device__ __forceinline__ void load_decaying(ScanArgs const& args, Sm const& sm, LaneCtx const& at, uint32_t t0,
    uint32_t end, scan::LaneSteps& s)
{
    int64_t const row_off = scan::offset_bdl(args.dims, opaque(at.b), opaque(at.active ? at.c : 0));
    uint32_t const t = t0 + static_cast<uint32_t>(at.lane) * kItems;
    int const count = at.active ? scan::steps_before(t, end) : 0;
    T const* u_row = static_cast<T const*>(args.u) + row_off;
    T const* delta_row = static_cast<T const*>(args.delta) + row_off;
    float raw_u[kItems];
    float raw_delta[kItems];
    Io<T>::load(u_row, t, count, aligned_row(u_row), raw_u);
    Io<T>::load(delta_row, t, count, aligned_row(delta_row), raw_delta, scan::kDeltaPad);
    scan::prepare_decaying(raw_u, raw_delta, sm.bias[at.ch], sm.d_skip[at.ch], s);
}

//! One pass (or pass 2): tiles [begin, end) with output from the states in sm.carry. Per state,
//! the lane's step maps stay in registers through compose -> 16-lane scan -> replay.
template <typename T, int N, typename Sm>
__device__ void decaying_tiles(ScanArgs const& args, Sm& sm, LaneCtx const& at, uint32_t begin, uint32_t end)
{
    bool const vec_rows = rows_vectorisable<T, true>(args, at.b, at.k);
    for (uint32_t t0 = begin; t0 < end; t0 += kTile)
    {
        scan::LaneSteps s;
        load_decaying<T>(args, sm, at, t0, end, s);
        sm.dt_sum[threadIdx.x] = scan::lane_dt_sum(s); // read once per state (not kept in a register)
        __syncthreads(); // the previous tile's rows are read
        stage_decaying<T, N, true>(args, at, t0, vec_rows, sm);
        __syncthreads();
#pragma unroll 1
        for (int n = 0; n < N; ++n)
        {
            float const a2 = sm.a2[at.ch][n];
            float const carry = at.lane == 0 ? sm.carry[at.ch][n] : 0.0f; // lane 0 starts from it
            scan::StepMaps m;
            scan::step_maps(s, a2, staged_row(sm, n, at.lane), m);
            // the lane's composed map, with the carried state entering at lane 0 (0 elsewhere)
            Affine f{scan::fast_exp2(a2 * sm.dt_sum[threadIdx.x]), 0.0f};
            f.b = scan::madd(f.a, carry, scan::compose(m));
#pragma unroll
            for (int off = 1; off < kLanes; off *= 2)
            {
                float const up_b = __shfl_up_sync(0xffffffffu, f.b, off, kLanes);
                float const up_a = off < kLanes / 2 ? __shfl_up_sync(0xffffffffu, f.a, off, kLanes) : 1.0f;
                if (at.lane >= off)
                {
                    f.b = scan::madd(f.a, up_b, f.b);
                    f.a = f.a * up_a; // dead after the last round
                }
            }
            float const before = __shfl_up_sync(0xffffffffu, f.b, 1, kLanes);
            scan::replay_output(at.lane == 0 ? carry : before, m, staged_row(sm, N + n, at.lane), s.y);
            __syncwarp(); // lane 0 has read sm.carry[ch][n]
            if (at.lane == kLanes - 1)
            {
                sm.carry[at.ch][n] = f.b;
            }
        }
        if (at.active)
        {
            T* y_row = static_cast<T*>(args.y) + scan::offset_bdl(args.dims, opaque(at.b), opaque(at.c));
            uint32_t const t = t0 + static_cast<uint32_t>(at.lane) * kItems;
            Io<T>::store(y_row, t, scan::steps_before(t, end), aligned_row(y_row), s.y);
        }
    }
}

//! Pass 1: the map of segment `segment` (tiles [begin, end)) into the workspace, by reduction:
//! each lane keeps, per state, acc = the sum of its steps' contributions to the state at the
//! end of the current tile; per tile acc <- acc exp2(A2 tile_dt) + h exp2(A2 after_dt), with h the
//! lane's state from 0 and after_dt the dt of the channel's later lanes in the tile. No scan, no
//! replay, no C; the states are unrolled (acc and A2 in registers).
template <typename T, int N, typename Sm>
__device__ void decaying_maps(ScanArgs const& args, Sm& sm, LaneCtx const& at, uint32_t begin, uint32_t end,
    int32_t segment, int32_t maps)
{
    bool const vec_rows = rows_vectorisable<T, false>(args, at.b, at.k);
    float a2[N];
    float acc[N];
#pragma unroll
    for (int n = 0; n < N; ++n)
    {
        a2[n] = sm.a2[at.ch][n];
        acc[n] = 0.0f;
    }
    float dt_total = 0.0f;
    for (uint32_t t0 = begin; t0 < end; t0 += kTile)
    {
        scan::LaneSteps s;
        load_decaying<T>(args, sm, at, t0, end, s);
        float const lane_sum = scan::lane_dt_sum(s);
        dt_total += lane_sum;
        // suffix sums over the channel's lanes: incl = this lane's and later lanes' dt
        float incl = lane_sum;
#pragma unroll
        for (int off = 1; off < kLanes; off *= 2)
        {
            float const later = __shfl_down_sync(0xffffffffu, incl, off, kLanes);
            if (at.lane + off < kLanes)
            {
                incl += later;
            }
        }
        float const next = __shfl_down_sync(0xffffffffu, incl, 1, kLanes);
        float const after = at.lane == kLanes - 1 ? 0.0f : next;
        float const tile = __shfl_sync(0xffffffffu, incl, 0, kLanes);
        __syncthreads(); // the previous tile's rows are read
        stage_decaying<T, N, false>(args, at, t0, vec_rows, sm);
        __syncthreads();
#pragma unroll
        for (int n = 0; n < N; ++n)
        {
            float const h = scan::compose_steps(s, a2[n], staged_row(sm, n, at.lane));
            acc[n] = scan::madd(acc[n], scan::fast_exp2(a2[n] * tile), h * scan::fast_exp2(a2[n] * after));
        }
    }
#pragma unroll
    for (int off = 1; off < kLanes; off *= 2)
    {
        dt_total += __shfl_xor_sync(0xffffffffu, dt_total, off, kLanes);
#pragma unroll
        for (int n = 0; n < N; ++n)
        {
            acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off, kLanes);
        }
    }
    if (at.active)
    {
        Affine* ws = static_cast<Affine*>(args.workspace) + scan::offset_map(args.dims, at.b, at.c, 0, segment, maps);
#pragma unroll
        for (int n = 0; n < N; ++n)
        {
            if (at.lane == n)
            {
                ws[static_cast<int64_t>(n) * maps] = Affine{scan::fast_exp2(a2[n] * dt_total), acc[n]};
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

//! kMaps = false: scans segment blockIdx's segment with output (all of L when there is one
//! segment). kMaps = true: pass 1, the segment's map into the workspace. A block whose channels
//! all decay (softplus on, A <= 0) takes the decaying path; others the general one.
template <typename T, int N, bool kMaps>
__global__ void __launch_bounds__(kThreads, scan::kMinBlocksPerSm) selective_scan_kernel(ScanArgs args, scan::Plan plan)
{
    __shared__ Shared<N, kMaps> sm;
    scan::Dims const& d = args.dims;
    int32_t const grid_segments = kMaps ? plan.segments - 1 : plan.segments;
    scan::BlockCoord const bc = scan::block_coord(d, blockIdx.x, grid_segments);
    int const tid = static_cast<int>(threadIdx.x);
    LaneCtx at{};
    at.b = bc.b;
    at.k = bc.k;
    at.ch = tid / kLanes;
    at.lane = tid % kLanes;
    at.c = bc.first_channel + at.ch;
    at.active = at.ch < bc.channels;
    at.mask = 0xffffu << (tid & 16);

    bool decays = true; // A2 <= 0 (false for NaN)
    for (int i = tid; i < kChannels * N; i += kThreads)
    {
        int const ch = i / N;
        int const n = i % N;
        float const a2 = ch < bc.channels ? __ldg(args.A + static_cast<int64_t>(bc.first_channel + ch) * N + n) * scan::kLog2e : 0.0f;
        sm.a2[ch][n] = a2;
        sm.carry[ch][n] = 0.0f;
        decays = decays && a2 <= 0.0f;
    }
    if (tid < kChannels)
    {
        bool const valid = tid < bc.channels;
        int32_t const c = bc.first_channel + tid;
        sm.d_skip[tid] = valid && args.D_skip != nullptr ? __ldg(args.D_skip + c) : 0.0f;
        sm.bias[tid] = valid && args.delta_bias != nullptr ? __ldg(args.delta_bias + c) : 0.0f;
    }
    bool const decaying = __syncthreads_and(decays) != 0 && args.delta_softplus;

    // [begin, end) of the row; 32 bits suffice (L < 2^31)
    uint32_t const begin = static_cast<uint32_t>(static_cast<int64_t>(bc.segment) * plan.segment_length);
    uint32_t const end = static_cast<uint32_t>(
        begin + plan.segment_length < d.length ? begin + plan.segment_length : static_cast<int64_t>(d.length));
    if (decaying)
    {
        if constexpr (kMaps)
        {
            decaying_maps<T, N>(args, sm, at, begin, end, bc.segment, plan.segments - 1);
        }
        else
        {
            if (bc.segment > 0)
            {
                compose_segments(args, sm, at, bc.segment, plan.segments - 1); // never invalid here
            }
            decaying_tiles<T, N>(args, sm, at, begin, end);
        }
        return;
    }
    general_segment<T, N, kMaps>(args, plan, sm, at, bc, begin, end);
}

template <typename T, int N>
cudaError_t launch_with_state(ScanArgs const& args, scan::Plan const& plan, cudaStream_t stream)
{
    int64_t const per = scan::blocks_per_segment(args.dims);
    if (plan.segments > 1)
    {
        selective_scan_kernel<T, N, true>
            <<<static_cast<unsigned>(per * (plan.segments - 1)), kThreads, 0, stream>>>(args, plan);
    }
    selective_scan_kernel<T, N, false><<<static_cast<unsigned>(per * plan.segments), kThreads, 0, stream>>>(args, plan);
    return cudaGetLastError();
}

template <typename T, int N>
struct Occupancy
{
    static int run()
    {
        int blocks = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, selective_scan_kernel<T, N, false>, kThreads, 0)
            != cudaSuccess)
        {
            cudaGetLastError();
            return 0;
        }
        return blocks;
    }
    static int invalid()
    {
        return 0;
    }
};

template <typename T, int N>
struct Launch
{
    static cudaError_t run(ScanArgs const& args, scan::Plan const& plan, cudaStream_t stream)
    {
        return launch_with_state<T, N>(args, plan, stream);
    }
    static cudaError_t invalid(ScanArgs const&, scan::Plan const&, cudaStream_t)
    {
        return cudaErrorInvalidValue;
    }
};

//! Op<T, N>::run(args...) for the runtime state size (1 .. kMaxState).
template <template <typename, int> class Op, typename T, int N = 1, typename... Args>
auto with_state(int32_t state, Args const&... args)
{
    if constexpr (N > scan::kMaxState)
    {
        return Op<T, 1>::invalid(args...);
    }
    else
    {
        if (state == N)
        {
            return Op<T, N>::run(args...);
        }
        return with_state<Op, T, N + 1>(state, args...);
    }
}

template <template <typename, int> class Op, typename... Args>
auto with_types(IOType io, int32_t state, Args const&... args)
{
    return io == IOType::kFLOAT16 ? with_state<Op, __half>(state, args...) : with_state<Op, float>(state, args...);
}

} // namespace

cudaError_t describe_device(DeviceInfo* info)
{
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess)
    {
        e = cudaDeviceGetAttribute(&info->sm_count, cudaDevAttrMultiProcessorCount, device);
    }
    if (e != cudaSuccess)
    {
        return e;
    }
    for (int io = 0; io < 2; ++io)
    {
        for (int32_t n = 1; n <= scan::kMaxState; ++n)
        {
            info->blocks_per_sm[io][n - 1] = with_types<Occupancy>(static_cast<IOType>(io), n);
        }
    }
    return cudaSuccess;
}

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
    int32_t segments = 1;
    if (args.workspace != nullptr)
    {
        int32_t sm_count = args.sm_count;
        int32_t blocks_per_sm = args.blocks_per_sm;
        if (sm_count <= 0 || blocks_per_sm <= 0)
        {
            // Not cached by the caller (the plugin caches it in attachToContext): ask the runtime.
            DeviceInfo info{};
            cudaError_t const e = describe_device(&info);
            if (e != cudaSuccess)
            {
                return e;
            }
            sm_count = info.sm_count;
            blocks_per_sm = info.blocks_per_sm[static_cast<int>(args.io)][args.dims.state - 1];
        }
        segments = scan::segments_for(args.dims, sm_count, blocks_per_sm);
    }
    scan::Plan const plan = scan::plan_for(args.dims, segments);
    return with_types<Launch>(args.io, args.dims.state, args, plan, stream);
}

} // namespace qmamba
