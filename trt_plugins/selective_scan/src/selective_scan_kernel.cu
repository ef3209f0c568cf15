// The SelectiveScan forward kernel (layout, arithmetic and modes: include/qmamba/scan_math.h).
//
// One block = 8 channels of one group x 16 lanes, per tile of 256 steps:
//   1. each lane loads its 16 consecutive steps of u and delta (16-byte loads where the row is
//      aligned), computes dt (softplus), dt * u (to shared memory) and D_skip * u;
//   2. the block stages the tile's B and C rows (N each, float32, swizzled 16-byte chunks; fp32
//      with cp.async) in shared memory, and votes whether every step of the tile decays;
//   3. per state n (a runtime loop, so registers do not grow with N): in a decaying tile the
//      lane's 16 step maps (one exp2 each) stay in registers through compose -> 16-lane scan ->
//      replay, the carried state in shared memory; any other tile runs lane after lane;
//   4. y is stored with 16-byte stores.
// Pass 1 of the two-pass mode reduces each segment to its map (no scan, no C, no y); the fused
// mode does both passes' work in one launch with a grid-wide barrier between them.
#include <cooperative_groups.h>
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

    //! One 16-byte chunk (4 elements) of a B/C row into shared memory, inside the row and aligned:
    //! an asynchronous copy (cp.async, LDGSTS: no registers hold the data); wait_staged() waits.
    static __device__ __forceinline__ void stage_vector(float const* src, float* dst)
    {
        unsigned const to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(src) : "memory");
    }

    static __device__ __forceinline__ void wait_staged()
    {
        asm volatile("cp.async.wait_all;" ::: "memory");
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

    static __device__ __forceinline__ void wait_staged()
    {
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

//! A lane's part of one staged row, from the address of its first chunk: chunk(part) = its values
//! 4 part .. 4 part + 3 (one 16-byte shared load at a constant offset).
struct LaneRow
{
    float const* at;

    __device__ __forceinline__ void chunk(int part, float* out) const
    {
        float4 const x = *reinterpret_cast<float4 const*>(at + scan::stage_offset(0, part));
        out[0] = x.x;
        out[1] = x.y;
        out[2] = x.z;
        out[3] = x.w;
    }
};

//! A lane's dt u in shared memory (Shared::dtu): chunk(part) = its values 4 part .. 4 part + 3.
struct LaneArray
{
    float4 const* at; //!< &dtu[0][thread]

    __device__ __forceinline__ void chunk(int part, float* out) const
    {
        float4 const x = at[part * kThreads];
        out[0] = x.x;
        out[1] = x.y;
        out[2] = x.z;
        out[3] = x.w;
    }
};

//! One round of the 16-lane Kogge-Stone scan of the lanes' maps: a lane `kOff` or more lanes
//! into its channel composes the map kOff lanes below before its own (b <- a b_below + b, and
//! a <- a a_below when kWithA); the others keep theirs. The shuffle's in-range predicate selects
//! the lanes, so no lane index is compared.
template <int kOff, bool kWithA>
__device__ __forceinline__ void scan_round(Affine& f)
{
    static_assert(kLanes == 16, "the shuffles' segment mask 0x1000 is for 16-lane segments");
    if constexpr (kWithA)
    {
        asm("{\n\t.reg .pred p;\n\t.reg .f32 ub, ua;\n\t"
            "shfl.sync.up.b32 ub|p, %0, %2, 0x1000, 0xffffffff;\n\t"
            "shfl.sync.up.b32 ua, %1, %2, 0x1000, 0xffffffff;\n\t"
            "@p fma.rn.f32 %0, %1, ub, %0;\n\t"
            "@p mul.rn.f32 %1, %1, ua;\n\t}"
            : "+f"(f.b), "+f"(f.a)
            : "n"(kOff));
    }
    else
    {
        asm("{\n\t.reg .pred p;\n\t.reg .f32 ub;\n\t"
            "shfl.sync.up.b32 ub|p, %0, %2, 0x1000, 0xffffffff;\n\t"
            "@p fma.rn.f32 %0, %1, ub, %0;\n\t}"
            : "+f"(f.b)
            : "f"(f.a), "n"(kOff));
    }
}

//! The kernel's passes: one pass or pass 2 (kScanPass), pass 1 (kMapsPass), and the fused
//! mode (kFusedPass: one launch, one tile per block, a grid-wide barrier between the segment maps
//! and the output).
constexpr int kScanPass = 0;
constexpr int kMapsPass = 1;
constexpr int kFusedPass = 2;
using scan::kMaxFusedState;

//! Shared memory of one block: the staged B and C rows (only B in pass 1), a per-lane area (pass
//! 1: each lane's partial segment maps by state; otherwise each lane's dt u by chunks, kept there
//! through the state loop), the fused mode's lane prefix maps, A * log2(e), the carried states,
//! and each lane's dt sum of the tile (read once per state, not kept in a register through the
//! state loop).
template <int N, int kPass>
struct alignas(16) Shared
{
    static constexpr bool kMaps = kPass == kMapsPass;
    float bc[(kMaps ? 1 : 2) * N * kTile];
    float4 lanes[(kMaps ? N : kItems) / kChunk * kThreads + (kMaps && N % kChunk != 0 ? kThreads : 0)];
    float2 prefix[kPass == kFusedPass ? N * kThreads : 1];
    float a2[kChannels][N];
    float carry[kChannels][N];
    float d_skip[kChannels];
    float bias[kChannels];
    float dt_sum[kThreads];

    //! Pass 1: lane `thread`'s partial map of state n.
    __device__ __forceinline__ float& acc(int n, int thread)
    {
        return reinterpret_cast<float*>(lanes)[n * kThreads + thread];
    }
    //! One pass / pass 2 / fused: lane `thread`'s dt u, steps 4 part .. 4 part + 3.
    __device__ __forceinline__ float4& dtu(int part, int thread)
    {
        return lanes[part * kThreads + thread];
    }
};

//! What a block knows about its channel lanes.
struct LaneCtx
{
    int32_t b;
    int32_t k;
    int32_t c;         //!< this lane's channel
    int ch;            //!< its index in the block
    int lane;          //!< 0 .. kLanes - 1 within the channel
    bool active;       //!< c is a channel of the group
};

//! What a block knows of its channels' decays: all A2 <= 0 (then every tile whose dt are all >= 0
//! decays), and with softplus on (dt >= 0 always) every tile decays.
struct BlockDecay
{
    bool a_nonpositive;
    bool always;
};

//! The block's B (and C when kWithC) rows for steps [t0, t0 + kTile) into shared memory, each
//! chunk checked (alignment, end of the row).
template <typename T, int N, bool kWithC, typename Sm>
__device__ __forceinline__ void stage_tile(ScanArgs const& args, int32_t b, int32_t k, int64_t t0, Sm& sm)
{
    constexpr int kElems = 16 / sizeof(T);           // elements per 16-byte global chunk
    constexpr int kPerRow = kTile / kElems;           // global chunks per row
    constexpr int kRows = kWithC ? 2 * N : N;
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
    // not unrolled, each row's address computed in the loop from an opaque row: this fallback
    // (misaligned rows, the last tile) is not worth keeping precomputed addresses in registers
#pragma unroll 1
    for (int first = static_cast<int>(threadIdx.x) / kPerRow; first < kRows; first += kThreads / kPerRow)
    {
        int const row = opaque(first);
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

//! Stages the tile's B (and C when kWithC) rows: the unchecked vector path, or stage_tile().
template <typename T, int N, bool kWithC, typename Sm>
__device__ __forceinline__ void stage(ScanArgs const& args, LaneCtx const& at, uint32_t t0, bool vec_rows, Sm& sm)
{
    if (vec_rows && t0 + kTile <= static_cast<uint32_t>(args.dims.length))
    {
        stage_tile_vector<T, N, kWithC ? 2 * N : N>(args, at.b, at.k, t0, sm);
        Io<T>::wait_staged(); // before the barrier that follows
    }
    else
    {
        stage_tile<T, N, kWithC>(args, at.b, at.k, t0, sm);
    }
}

//! Where the lane's steps of tile t0 are in a [B, D, L] tensor (element index) and how many of
//! them lie before `end`; recomputed per tile from opaque indices rather than kept in registers
//! across the state loop. 16-byte accesses when that address is aligned (then the row is: t is a
//! multiple of 16 elements) and all kItems steps are inside.
struct LaneSpan
{
    int64_t at;
    int count;
};

__device__ __forceinline__ LaneSpan lane_span(ScanArgs const& args, LaneCtx const& at, uint32_t t0, uint32_t end)
{
    uint32_t const t = t0 + static_cast<uint32_t>(at.lane) * kItems;
    uint32_t const left = end > t ? end - t : 0u;
    int64_t const row = static_cast<int64_t>(opaque(at.b)) * args.dims.dim + opaque(at.active ? at.c : 0);
    return LaneSpan{row * args.dims.length + t, at.active ? static_cast<int>(left < kItems ? left : kItems) : 0};
}

//! The lane's steps of tile t0: u and delta -> dt, dt u, D_skip u.
template <typename T, typename Sm>
__device__ __forceinline__ void load_steps(ScanArgs const& args, Sm const& sm, LaneCtx const& at, uint32_t t0,
    uint32_t end, scan::LaneSteps& s)
{
    LaneSpan const span = lane_span(args, at, t0, end);
    T const* u = static_cast<T const*>(args.u) + span.at;
    T const* delta = static_cast<T const*>(args.delta) + span.at;
    float raw_u[kItems];
    float raw_delta[kItems];
    Io<T>::load(u, 0, span.count, aligned_row(u), raw_u);
    if (args.delta_softplus)
    {
        Io<T>::load(delta, 0, span.count, aligned_row(delta), raw_delta, scan::kDeltaPad);
        scan::prepare_softplus(raw_u, raw_delta, sm.bias[at.ch], sm.d_skip[at.ch], s);
    }
    else
    {
        Io<T>::load(delta, 0, span.count, aligned_row(delta), raw_delta);
        scan::prepare_plain(raw_u, raw_delta, span.count, sm.bias[at.ch], sm.d_skip[at.ch], s);
    }
}

//! load_steps(), then the lane's dt sum and dt u into shared memory for the state loop.
template <typename T, typename Sm>
__device__ __forceinline__ void load_tile(ScanArgs const& args, Sm& sm, LaneCtx const& at, uint32_t t0, uint32_t end,
    scan::LaneSteps& s)
{
    load_steps<T>(args, sm, at, t0, end, s);
    sm.dt_sum[threadIdx.x] = scan::lane_dt_sum(s);
#pragma unroll
    for (int part = 0; part < kItems / kChunk; ++part)
    {
        float const* v = s.dtu + kChunk * part;
        sm.dtu(part, threadIdx.x) = make_float4(v[0], v[1], v[2], v[3]);
    }
}

//! Whether every step of the block's tile decays (a block-wide vote; also the barrier after
//! which the previous tile's staged rows may be overwritten). The result goes through a warp
//! vote so that the compiler knows it is the same on every lane (the shuffles after it need no
//! divergence check).
__device__ __forceinline__ bool tile_decays(BlockDecay const& decay, scan::LaneSteps const& s)
{
    bool const mine = decay.always || scan::steps_decay(s);
    bool const all = __syncthreads_and(mine) != 0 && decay.a_nonpositive;
    return __all_sync(0xffffffffu, all);
}

//! One tile's state loop when every step decays: per state, the lane's step maps stay in
//! registers through compose -> 16-lane scan -> replay; the carried state enters at lane 0 and
//! the last lane's state is carried to the next tile.
template <int N, typename Sm>
__device__ __forceinline__ void decaying_states(Sm& sm, LaneCtx const& at, scan::LaneSteps& s)
{
    // per state: its A2 and carried state, and the lane's part of its staged B row (the C row N
    // rows further); pointers stepped, not recomputed from n
    float* a2_at = &sm.a2[at.ch][0];
    float* carry_at = &sm.carry[at.ch][0];
    float const* dt_sum_at = &sm.dt_sum[threadIdx.x];
    LaneRow b_row{sm.bc + scan::stage_offset(at.lane, 0)};
    LaneArray const dtu{&sm.dtu(0, threadIdx.x)};
#pragma unroll 1
    for (int n = 0; n < N; ++n, ++a2_at, ++carry_at, b_row.at += kTile)
    {
        float const a2 = *a2_at;
        float const carry = at.lane == 0 ? *carry_at : 0.0f; // lane 0 starts from it
        scan::StepMaps m;
        scan::step_maps(s.dt, dtu, a2, b_row, m);
        // the lane's composed map, with the carried state entering at lane 0 (0 elsewhere)
        Affine f{scan::fast_exp2(a2 * *dt_sum_at), 0.0f};
        f.b = scan::madd(f.a, carry, scan::compose(m));
        scan_round<1, true>(f);
        scan_round<2, true>(f);
        scan_round<4, true>(f);
        scan_round<8, false>(f);
        float const before = __shfl_up_sync(0xffffffffu, f.b, 1, kLanes);
        scan::replay_output(at.lane == 0 ? carry : before, m, LaneRow{b_row.at + N * kTile}, s.y);
        __syncwarp(); // lane 0 has read the carried state
        if (at.lane == kLanes - 1)
        {
            *carry_at = f.b;
        }
    }
}

//! One tile's state loop when a step may grow: per state, the channel's lanes walk their steps
//! one after another from the carried state (exact, about 10x slower; no exported model gets
//! here).
template <int N, typename Sm>
__device__ __forceinline__ void serial_states(Sm& sm, LaneCtx const& at, scan::LaneSteps& s)
{
#pragma unroll 1
    for (int n = 0; n < N; ++n)
    {
        float const a2 = sm.a2[at.ch][n];
        LaneRow const b_row{sm.bc + scan::stage_row(n) + scan::stage_offset(at.lane, 0)};
        LaneRow const c_row{b_row.at + N * kTile};
        LaneArray const dtu{&sm.dtu(0, threadIdx.x)};
        float h = sm.carry[at.ch][n];
#pragma unroll 1
        for (int src = 0; src < kLanes; ++src)
        {
            if (at.lane == src)
            {
                h = scan::serial_steps(h, s.dt, dtu, a2, b_row, c_row, s.y);
            }
            h = __shfl_sync(0xffffffffu, h, src, kLanes);
        }
        __syncwarp(); // every lane has read the carried state
        if (at.lane == 0)
        {
            sm.carry[at.ch][n] = h;
        }
    }
}

//! Scans tiles [from, end) of the block's channels from the states in sm.carry; writes y from
//! `begin` on (from < begin: pass 2's catch-up over earlier segments, whole tiles).
template <typename T, int N, bool kSerialOnly = false, typename Sm>
__device__ void scan_tiles(ScanArgs const& args, Sm& sm, LaneCtx const& at, BlockDecay const& decay, uint32_t from,
    uint32_t begin, uint32_t end)
{
    bool const vec_rows = rows_vectorisable<T, true>(args, at.b, at.k);
    for (uint32_t t0 = from; t0 < end; t0 += kTile)
    {
        scan::LaneSteps s;
        load_tile<T>(args, sm, at, t0, end, s);
        bool const decays = tile_decays(decay, s); // and the previous tile's rows are read
        stage<T, N, true>(args, at, t0, vec_rows, sm);
        __syncthreads();
        if (!kSerialOnly && decays)
        {
            decaying_states<N>(sm, at, s);
        }
        else
        {
            serial_states<N>(sm, at, s);
        }
        if (t0 >= begin && at.active)
        {
            LaneSpan const span = lane_span(args, at, t0, end);
            T* y = static_cast<T*>(args.y) + span.at;
            Io<T>::store(y, 0, span.count, aligned_row(y), s.y);
        }
    }
}

//! Pass 1: the map of segment `segment` (tiles [begin, end)) into the workspace, by reduction:
//! each lane keeps, per state, acc = the sum of its steps' contributions to the state at the
//! end of the current tile (in shared memory); per tile acc <- acc exp2(A2 tile_dt) +
//! h exp2(A2 after_dt), with h the lane's state from 0 and after_dt the dt of the channel's later
//! lanes in the tile. No scan, no replay, no C. A tile with a step that may grow makes the block's
//! maps invalid (a = -1): pass 2 then reruns the recurrence over them.
template <typename T, int N, typename Sm>
__device__ void segment_maps(ScanArgs const& args, Sm& sm, LaneCtx const& at, BlockDecay const& decay,
    uint32_t begin, uint32_t end, int32_t segment, int32_t maps)
{
    bool const vec_rows = rows_vectorisable<T, false>(args, at.b, at.k);
    float dt_total = 0.0f;
    bool valid = true;
    for (uint32_t t0 = begin; t0 < end; t0 += kTile)
    {
        scan::LaneSteps s;
        load_steps<T>(args, sm, at, t0, end, s);
        if (!tile_decays(decay, s)) // block-wide, and the previous tile's rows are read
        {
            valid = false;
            break;
        }
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
        bool const first = t0 == begin;
        stage<T, N, false>(args, at, t0, vec_rows, sm);
        __syncthreads();
        float const* a2_at = &sm.a2[at.ch][0];
        float* acc_at = &sm.acc(0, threadIdx.x);
        LaneRow b_row{sm.bc + scan::stage_offset(at.lane, 0)};
#pragma unroll 1
        for (int n = 0; n < N; ++n, ++a2_at, acc_at += kThreads, b_row.at += kTile)
        {
            float const a2 = *a2_at;
            float const h = scan::compose_steps(s.dt, scan::LaneArray{s.dtu}, a2, b_row);
            float const acc = first ? 0.0f : *acc_at;
            *acc_at = scan::madd(acc, scan::fast_exp2(a2 * tile), h * scan::fast_exp2(a2 * after));
        }
    }
#pragma unroll
    for (int off = 1; off < kLanes; off *= 2)
    {
        dt_total += __shfl_xor_sync(0xffffffffu, dt_total, off, kLanes);
    }
    __syncthreads(); // every lane's partial maps are in shared memory
    // lane n < N of each channel: state n's map, its lanes' partial maps summed by a pairwise tree
    if (at.active && at.lane < N)
    {
        int const n = at.lane;
        float b = 0.0f;
        if (valid)
        {
            float v[kLanes];
#pragma unroll
            for (int q = 0; q < kLanes / kChunk; ++q)
            {
                float4 const x = *reinterpret_cast<float4 const*>(&sm.acc(n, at.ch * kLanes + kChunk * q));
                v[kChunk * q] = x.x;
                v[kChunk * q + 1] = x.y;
                v[kChunk * q + 2] = x.z;
                v[kChunk * q + 3] = x.w;
            }
            b = scan::pairwise_sum(v);
        }
        Affine* ws = static_cast<Affine*>(args.workspace);
        ws[scan::offset_map(args.dims, at.b, at.c, n, segment, maps)]
            = Affine{valid ? scan::fast_exp2(sm.a2[at.ch][n] * dt_total) : -1.0f, b};
    }
}

//! The composition of the maps of segments 0 .. s-1 (pass 1's output) for each channel and
//! state of the block, into sm.carry: scan::compose_parts() threads per (channel, state) compose
//! runs of maps, then a shuffle tree. Returns whether one of the maps is invalid.
template <int N, typename Sm>
__device__ bool compose_segments(ScanArgs const& args, Sm& sm, scan::BlockCoord const& bc, int32_t s, int32_t maps)
{
    constexpr int kParts = scan::compose_parts(N);
    int const pair = static_cast<int>(threadIdx.x) / kParts;
    int const part = static_cast<int>(threadIdx.x) % kParts;
    int const ch = pair / N;
    int const n = pair % N;
    bool const mine = pair < kChannels * N && ch < bc.channels;
    int32_t const run = (s + kParts - 1) / kParts;
    int32_t const first = part * run;
    int32_t const last = first + run < s ? first + run : s;
    Affine f = scan::identity_map();
    bool bad = false;
    if (mine)
    {
        Affine const* m = static_cast<Affine const*>(args.workspace) + scan::offset_map(args.dims, bc.b, bc.first_channel + ch, n, 0, maps);
#pragma unroll 4
        for (int32_t q = first; q < last; ++q)
        {
            Affine const g = m[q];
            bad |= g.a < 0.0f;
            f = scan::then(f, g);
        }
    }
#pragma unroll
    for (int off = 1; off < kParts; off *= 2)
    {
        float const next_a = __shfl_down_sync(0xffffffffu, f.a, off, kParts);
        float const next_b = __shfl_down_sync(0xffffffffu, f.b, off, kParts);
        if (part % (2 * off) == 0)
        {
            f = scan::then(f, Affine{next_a, next_b});
        }
    }
    if (mine && part == 0)
    {
        sm.carry[ch][n] = f.b; // the state at the segment's start (from h = 0 at t = 0)
    }
    return bad;
}

// ---------------------------------------------------------------------------------------------
// The fused mode: one launch of one-tile segments, all blocks resident (a cooperative launch).
// Phase 1 composes each lane's steps (decays formed on the way), scans the 16 lanes' maps and
// keeps each lane's exclusive prefix map in shared memory; the tile's map goes to the workspace.
// After a grid-wide barrier, phase 2 composes the earlier tiles' maps into the state at the
// tile's start and replays each lane's steps from its prefix (the decays formed again): no second
// launch, no second load of u, delta, B and C, no second softplus.

//! Phase 1 for every state; `publish`: the block's maps of state 0 in the workspace (null for
//! the last segment, whose map nobody reads), states `maps` apart.
template <int N, typename Sm>
__device__ __forceinline__ void fused_maps(Sm& sm, LaneCtx const& at, scan::LaneSteps const& s, Affine* publish,
    int32_t maps)
{
    float const* a2_at = &sm.a2[at.ch][0];
    float2* prefix_at = &sm.prefix[threadIdx.x];
    LaneRow b_row{sm.bc + scan::stage_offset(at.lane, 0)};
    LaneArray const dtu{&sm.dtu(0, threadIdx.x)};
    float const* dt_sum_at = &sm.dt_sum[threadIdx.x];
#pragma unroll 1
    for (int n = 0; n < N; ++n, ++a2_at, prefix_at += kThreads, b_row.at += kTile)
    {
        float const a2 = *a2_at;
        Affine f{scan::fast_exp2(a2 * *dt_sum_at), scan::compose_steps(s.dt, dtu, a2, b_row)};
        scan_round<1, true>(f);
        scan_round<2, true>(f);
        scan_round<4, true>(f);
        scan_round<8, true>(f);
        float const below_a = __shfl_up_sync(0xffffffffu, f.a, 1, kLanes);
        float const below_b = __shfl_up_sync(0xffffffffu, f.b, 1, kLanes);
        *prefix_at = at.lane == 0 ? make_float2(1.0f, 0.0f) : make_float2(below_a, below_b);
        if (publish != nullptr && at.lane == kLanes - 1 && at.active)
        {
            publish[static_cast<int64_t>(n) * maps] = f;
        }
    }
}

//! Phase 2 for every state: each lane's start state from its prefix map and the state at the
//! tile's start (sm.carry), then its steps with output.
template <int N, typename Sm>
__device__ __forceinline__ void fused_output(Sm& sm, LaneCtx const& at, scan::LaneSteps& s)
{
    float const* a2_at = &sm.a2[at.ch][0];
    float const* carry_at = &sm.carry[at.ch][0];
    float2 const* prefix_at = &sm.prefix[threadIdx.x];
    LaneRow b_row{sm.bc + scan::stage_offset(at.lane, 0)};
    LaneArray const dtu{&sm.dtu(0, threadIdx.x)};
#pragma unroll 1
    for (int n = 0; n < N; ++n, ++a2_at, ++carry_at, prefix_at += kThreads, b_row.at += kTile)
    {
        float2 const p = *prefix_at;
        scan::serial_steps(scan::madd(p.x, *carry_at, p.y), s.dt, dtu, *a2_at, b_row, LaneRow{b_row.at + N * kTile}, s.y);
    }
}

//! One block of the fused mode: tile `bc.segment` of its channels. A block whose channels do not
//! all decay (A > 0 or NaN; the launcher fuses only with softplus on) publishes nothing; the
//! segment-0 block of its group then scans the whole sequence lane after lane, the others stop.
template <typename T, int N, typename Sm>
__device__ void fused_segment(ScanArgs const& args, scan::Plan const& plan, Sm& sm, LaneCtx const& at,
    scan::BlockCoord const& bc, BlockDecay const& decay, uint32_t begin, uint32_t end)
{
    int32_t const maps = plan.segments - 1;
    scan::LaneSteps s;
    if (decay.always)
    {
        load_tile<T>(args, sm, at, begin, end, s);
        stage<T, N, true>(args, at, begin, rows_vectorisable<T, true>(args, at.b, at.k), sm);
        __syncthreads();
        Affine* publish = bc.segment < maps
            ? static_cast<Affine*>(args.workspace) + scan::offset_map(args.dims, at.b, at.c, 0, bc.segment, maps)
            : nullptr;
        fused_maps<N>(sm, at, s, publish, maps);
    }
    cooperative_groups::this_grid().sync(); // every block's maps are in the workspace
    if (!decay.always)
    {
        if (bc.segment == 0)
        {
            scan_tiles<T, N, true>(args, sm, at, decay, 0u, 0u, static_cast<uint32_t>(args.dims.length));
        }
        return;
    }
    if (bc.segment > 0)
    {
        compose_segments<N>(args, sm, bc, bc.segment, maps); // valid: the group decays
        __syncthreads();
    }
    fused_output<N>(sm, at, s);
    if (at.active)
    {
        LaneSpan const span = lane_span(args, at, begin, end);
        T* y = static_cast<T*>(args.y) + span.at;
        Io<T>::store(y, 0, span.count, aligned_row(y), s.y);
    }
}

//! kScanPass: scans segment blockIdx's segment with output (all of L when there is one
//! segment). kMapsPass: pass 1, the segment's map into the workspace. kFusedPass: the fused mode.
template <typename T, int N, int kPass>
__global__ void __launch_bounds__(kThreads, scan::kMinBlocksPerSm) selective_scan_kernel(ScanArgs args, scan::Plan plan)
{
    __shared__ Shared<N, kPass> sm;
    scan::Dims const& d = args.dims;
    scan::BlockCoord const bc = scan::block_coord(plan, blockIdx.x, kPass == kMapsPass);
    int const tid = static_cast<int>(threadIdx.x);
    LaneCtx at{};
    at.b = bc.b;
    at.k = bc.k;
    at.ch = tid / kLanes;
    at.lane = tid % kLanes;
    at.c = bc.first_channel + at.ch;
    at.active = at.ch < bc.channels;

    bool nonpositive = true; // A2 <= 0 (false for NaN)
    static_assert(kChannels * N <= kThreads, "one (channel, state) per thread");
    if (tid < kChannels * N)
    {
        int const ch = tid / N;
        int const n = tid % N;
        float const a2 = ch < bc.channels ? __ldg(args.A + static_cast<int64_t>(bc.first_channel + ch) * N + n) * scan::kLog2e : 0.0f;
        sm.a2[ch][n] = a2;
        sm.carry[ch][n] = 0.0f;
        nonpositive = a2 <= 0.0f;
    }
    if (tid < kChannels)
    {
        bool const valid = tid < bc.channels;
        int32_t const c = bc.first_channel + tid;
        sm.d_skip[tid] = valid && args.D_skip != nullptr ? __ldg(args.D_skip + c) : 0.0f;
        sm.bias[tid] = valid && args.delta_bias != nullptr ? __ldg(args.delta_bias + c) : 0.0f;
    }
    // block-wide votes, made warp-uniform for the compiler (the shuffles under them need no
    // divergence check)
    BlockDecay decay{};
    decay.a_nonpositive = __all_sync(0xffffffffu, __syncthreads_and(nonpositive) != 0);
    decay.always = decay.a_nonpositive && args.delta_softplus;

    // [begin, end) of the row; 32 bits suffice (L < 2^31)
    uint32_t const begin = static_cast<uint32_t>(static_cast<int64_t>(bc.segment) * plan.segment_length);
    uint32_t const end = static_cast<uint32_t>(
        begin + plan.segment_length < d.length ? begin + plan.segment_length : static_cast<int64_t>(d.length));
    if constexpr (kPass == kMapsPass)
    {
        segment_maps<T, N>(args, sm, at, decay, begin, end, bc.segment, plan.segments - 1);
    }
    else if constexpr (kPass == kFusedPass)
    {
        fused_segment<T, N>(args, plan, sm, at, bc, decay, begin, end);
    }
    else
    {
        // An earlier segment with an invalid map: the recurrence over [0, begin) first, without
        // output (the same loop), instead of composing the maps.
        bool catch_up = false;
        if (bc.segment > 0)
        {
            catch_up = __syncthreads_or(compose_segments<N>(args, sm, bc, bc.segment, plan.segments - 1)) != 0;
            if (catch_up && tid < kChannels * N)
            {
                sm.carry[tid / N][tid % N] = 0.0f;
            }
        }
        scan_tiles<T, N>(args, sm, at, decay, catch_up ? 0u : begin, begin, end);
    }
}

template <typename T, int N>
cudaError_t launch_with_state(ScanArgs const& args, scan::Choice const& choice, cudaStream_t stream)
{
    int64_t const per = scan::blocks_per_segment(args.dims);
    scan::Plan plan = choice.plan;
    if (choice.fused)
    {
        if constexpr (N > kMaxFusedState)
        {
            return cudaErrorInvalidValue;
        }
        else
        {
            ScanArgs a = args;
            void* params[] = {&a, &plan};
            cudaError_t const e = cudaLaunchCooperativeKernel(
                reinterpret_cast<void const*>(&selective_scan_kernel<T, N, kFusedPass>),
                dim3(static_cast<unsigned>(per * plan.segments)), dim3(kThreads), params, 0, stream);
            if (e != cudaErrorCooperativeLaunchTooLarge)
            {
                return e;
            }
            // Fewer blocks resident than the cached occupancy said (another context, MPS, a
            // shared-memory carveout): nothing was launched; two passes instead.
            cudaGetLastError();
            plan = choice.unfused;
        }
    }
    if (plan.segments > 1)
    {
        selective_scan_kernel<T, N, kMapsPass>
            <<<static_cast<unsigned>(per * (plan.segments - 1)), kThreads, 0, stream>>>(args, plan);
    }
    selective_scan_kernel<T, N, kScanPass><<<static_cast<unsigned>(per * plan.segments), kThreads, 0, stream>>>(args, plan);
    return cudaGetLastError();
}

//! Resident blocks per SM of the one-pass / pass-2 kernel, and of the fused kernel (0 where there
//! is none: N > kMaxFusedState, or the device has no cooperative launch).
template <typename T, int N>
struct Occupancy
{
    static int blocks(void const* kernel)
    {
        int blocks = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess)
        {
            cudaGetLastError();
            return 0;
        }
        return blocks;
    }
    static int run(bool fused)
    {
        if (!fused)
        {
            return blocks(reinterpret_cast<void const*>(&selective_scan_kernel<T, N, kScanPass>));
        }
        if constexpr (N > kMaxFusedState)
        {
            return 0;
        }
        else
        {
            return blocks(reinterpret_cast<void const*>(&selective_scan_kernel<T, N, kFusedPass>));
        }
    }
    static int invalid(bool)
    {
        return 0;
    }
};

template <typename T, int N>
struct Launch
{
    static cudaError_t run(ScanArgs const& args, scan::Choice const& choice, cudaStream_t stream)
    {
        return launch_with_state<T, N>(args, choice, stream);
    }
    static cudaError_t invalid(ScanArgs const&, scan::Choice const&, cudaStream_t)
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
    int cooperative = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess)
    {
        e = cudaDeviceGetAttribute(&info->sm_count, cudaDevAttrMultiProcessorCount, device);
    }
    if (e == cudaSuccess)
    {
        e = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
    }
    if (e != cudaSuccess)
    {
        return e;
    }
    for (int io = 0; io < 2; ++io)
    {
        for (int32_t n = 1; n <= scan::kMaxState; ++n)
        {
            info->blocks_per_sm[io][n - 1] = with_types<Occupancy>(static_cast<IOType>(io), n, false);
            info->fused_blocks_per_sm[io][n - 1]
                = cooperative != 0 ? with_types<Occupancy>(static_cast<IOType>(io), n, true) : 0;
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
    scan::Choice choice{scan::plan_for(args.dims, 1), false, scan::plan_for(args.dims, 1)};
    if (args.workspace != nullptr)
    {
        int32_t sm_count = args.sm_count;
        int32_t blocks_per_sm = args.blocks_per_sm;
        int32_t fused_blocks_per_sm = args.fused_blocks_per_sm;
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
            fused_blocks_per_sm = info.fused_blocks_per_sm[static_cast<int>(args.io)][args.dims.state - 1];
        }
        choice = scan::choose(args.dims, args.delta_softplus && args.strategy == Strategy::kAuto, sm_count,
            blocks_per_sm, fused_blocks_per_sm);
    }
    return with_types<Launch>(args.io, args.dims.state, args, choice, stream);
}

} // namespace qmamba
