// Host harness: runs the kernel's arithmetic (scan_math.h) on the CPU, replaying the CUDA
// block's layout step for step, so that the Python tests can compare it with the reference scan
// (tests/test_trt_plugin.py): 8 channels x 16 lanes per block, 16 steps per lane, the vector or
// scalar path each row's (simulated) address takes, B and C staged into a shared-memory image
// with the kernel's index functions, the 16-lane scans in shuffle order, tiles that may grow run
// lane after lane, carried states, the two passes with their workspace maps, and the fused mode
// (phase 1 of every block, the grid-wide barrier, phase 2).
//
//   host_harness IN.bin OUT.bin
//   host_harness --check-layout
//   host_harness --plan B D K L N SM_COUNT BLOCKS_PER_SM [FUSED_BLOCKS_PER_SM]
//
// IN.bin: int32 B, D, K, L, N, delta_softplus, has_D_skip, has_delta_bias, segments (> 0: two
// passes with that many segments; 0: as the launcher chooses with sm_count, blocks_per_sm,
// fused_blocks_per_sm and strategy below; -1: the fused mode), elem_bytes (4: fp32 I/O, 2: fp16
// I/O; it decides vector widths and alignment, the values are float32 either way), the element
// offsets of the base pointers of u, delta, B, C and y from a 16-byte boundary (to replay
// misaligned tensors), sm_count, blocks_per_sm, fused_blocks_per_sm, strategy (0: auto, 1: two
// passes); then float32 u [B,D,L], delta [B,D,L], A [D,N], B [B,K,N,L], C [B,K,N,L], D_skip [D]
// and delta_bias [D] when present.
// OUT.bin: float32 y [B,D,L] (NaN where no block wrote).
//
// --check-layout: the staging and lane index functions are a bijection onto the staged tile,
// the kernel's 16-byte shared stores and loads are free of bank conflicts, and the block
// coordinates' fast division is exact.
// --plan: the launcher's choice for these dims on that GPU (segments, fused or not; softplus on),
// and the workspace, as JSON.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

#include "qmamba/scan_math.h"

namespace {

using namespace qmamba::scan;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

//! The inputs of one call, with the simulated layout of their memory.
struct Inputs
{
    Dims d;
    bool softplus;
    float const* u;
    float const* delta;
    float const* A;
    float const* B;
    float const* C;
    float const* D_skip;     // may be null
    float const* delta_bias; // may be null
    int elem_bytes;
    int64_t offset[5];       // u, delta, B, C, y: elements from a 16-byte boundary
};

enum Tensor
{
    kU = 0,
    kDelta = 1,
    kB = 2,
    kC = 3,
    kY = 4
};

//! Whether the kernel's row pointer `tensor + row_start` is 16-byte aligned.
bool row_aligned(Inputs const& in, Tensor tensor, int64_t row_start)
{
    return aligned16(static_cast<uint64_t>(in.offset[tensor] + row_start) * in.elem_bytes);
}

//! The kernel's Io<T>::load: a lane's kItems steps (16-byte loads when the row is aligned and all
//! steps are inside, element loads otherwise; the values are the same either way, the path is
//! counted so that tests can see which one a case takes).
struct PathCount
{
    int64_t vector = 0;
    int64_t scalar = 0;
    int64_t decaying_tiles = 0; //!< block tiles (both passes) whose steps all decay
    int64_t serial_tiles = 0;   //!< block tiles run lane after lane (a step may grow)
    int64_t catch_ups = 0;      //!< pass-2 blocks that reran earlier segments (invalid maps)
};

void load_lane(float const* row, int64_t t, int count, bool vec, float* out, PathCount& paths, float fill = 0.0f)
{
    if (vec && count == kItems)
    {
        ++paths.vector;
        for (int v = 0; v < kItems; v += kVecBytes / 4)
        {
            for (int i = v; i < v + kVecBytes / 4 && i < kItems; ++i)
            {
                out[i] = row[t + i];
            }
        }
        return;
    }
    ++paths.scalar;
    for (int i = 0; i < kItems; ++i)
    {
        out[i] = i < count ? row[t + i] : fill;
    }
}

//! The block's shared memory.
struct Shared
{
    std::vector<float> bc;
    float a2[kChannels][kMaxState];
    float carry[kChannels][kMaxState];
    float d_skip[kChannels];
    float bias[kChannels];
};

//! A lane's view of a staged row, as the kernel's StagedRow (one 16-byte chunk per part).
struct HostRow
{
    float const* base;
    int lane;
    void chunk(int part, float* out) const
    {
        std::memcpy(out, base + stage_offset(lane, part), sizeof(float) * kChunk);
    }
};

//! rows_vectorisable(): the group's first B (and C) rows aligned, rows whole 16-byte chunks long.
bool rows_vectorisable(Inputs const& in, int32_t b, int32_t k, bool with_c)
{
    int64_t const group = offset_bknl(in.d, b, k, 0);
    return static_cast<int64_t>(in.d.length) * in.elem_bytes % kVecBytes == 0 && row_aligned(in, kB, group)
        && (!with_c || row_aligned(in, kC, group));
}

//! stage_tile(): every thread's 16-byte chunks of the N B rows (and N C rows) of the group.
//! `whole_tile`: the decaying path's stage_tile_vector() (the same slots, every chunk a vector).
void stage_tile(Inputs const& in, int32_t b, int32_t k, int64_t t0, bool with_c, Shared& sm, PathCount& paths,
    bool whole_tile = false)
{
    Dims const& d = in.d;
    int const elems = vector_elems(in.elem_bytes);
    int const per_row = kTile / elems;
    int const rows = with_c ? 2 * d.state : d.state;
    std::fill(sm.bc.begin(), sm.bc.end(), kNaN); // a slot no thread writes poisons the result
    for (int thread = 0; thread < kThreads; ++thread)
    {
        for (int f = thread; f < rows * per_row; f += kThreads)
        {
            int const row = f / per_row;
            int const n = row % d.state;
            Tensor const which = row < d.state ? kB : kC;
            int64_t const row_start = offset_bknl(d, b, k, n);
            float const* src = (which == kB ? in.B : in.C) + row_start;
            bool const vec = row_aligned(in, which, row_start);
            StageItem const item = stage_item(f % per_row, elems);
            int64_t const t = t0 + item.step;
            float* dst = sm.bc.data() + stage_row(row) + item.offset;
            bool const whole = whole_tile || (vec && t + elems <= d.length);
            ++(whole ? paths.vector : paths.scalar);
            for (int e = 0; e < elems; ++e)
            {
                // fp16: the second float chunk lands at part + 1.
                float* slot = dst + (e / kChunk) * stage_offset(0, 1) + e % kChunk;
                *slot = t + e < d.length ? src[t + e] : 0.0f;
            }
        }
    }
}

//! One block of the kernel, its lanes replayed one after another.
struct Block
{
    Inputs const& in;
    BlockCoord at;
    Shared sm;
    PathCount& paths;
    bool a_nonpositive = true; //!< every A2 of the block <= 0 (__syncthreads_and)
    bool always = false;       //!< and softplus on: every tile decays

    Block(Inputs const& inputs, BlockCoord coord, PathCount& p)
        : in(inputs)
        , at(coord)
        , paths(p)
    {
        Dims const& d = in.d;
        sm.bc.assign(static_cast<size_t>(2 * d.state * kTile), 0.0f);
        for (int ch = 0; ch < kChannels; ++ch)
        {
            bool const valid = ch < at.channels;
            int32_t const c = at.first_channel + ch;
            for (int n = 0; n < d.state; ++n)
            {
                sm.a2[ch][n] = valid ? in.A[static_cast<int64_t>(c) * d.state + n] * kLog2e : 0.0f;
                sm.carry[ch][n] = 0.0f;
                a_nonpositive = a_nonpositive && sm.a2[ch][n] <= 0.0f;
            }
            sm.d_skip[ch] = valid && in.D_skip != nullptr ? in.D_skip[c] : 0.0f;
            sm.bias[ch] = valid && in.delta_bias != nullptr ? in.delta_bias[c] : 0.0f;
        }
        always = a_nonpositive && in.softplus;
    }

    //! load_steps(): the lanes' steps of tile t0 (u and delta; softplus: delta padded with
    //! kDeltaPad past `end`, plain: dt = 0 there); returns tile_decays(), the block's vote.
    bool load_steps(int64_t t0, int64_t end, LaneSteps* steps, int* count)
    {
        Dims const& d = in.d;
        bool all = true;
        for (int thread = 0; thread < kThreads; ++thread)
        {
            int const ch = thread / kLanes;
            int const lane = thread % kLanes;
            bool const active = ch < at.channels;
            int64_t const row_start = offset_bdl(d, at.b, active ? at.first_channel + ch : 0);
            int64_t const t = t0 + static_cast<int64_t>(lane) * kItems;
            count[thread] = active ? steps_before(t, end) : 0;
            float raw_u[kItems];
            float raw_delta[kItems];
            load_lane(in.u + row_start, t, count[thread], row_aligned(in, kU, row_start), raw_u, paths);
            bool const delta_vec = row_aligned(in, kDelta, row_start);
            if (in.softplus)
            {
                load_lane(in.delta + row_start, t, count[thread], delta_vec, raw_delta, paths, kDeltaPad);
                prepare_softplus(raw_u, raw_delta, sm.bias[ch], sm.d_skip[ch], steps[thread]);
            }
            else
            {
                load_lane(in.delta + row_start, t, count[thread], delta_vec, raw_delta, paths);
                prepare_plain(raw_u, raw_delta, count[thread], sm.bias[ch], sm.d_skip[ch], steps[thread]);
            }
            all = all && (always || steps_decay(steps[thread]));
        }
        bool const decays = all && a_nonpositive;
        ++(decays ? paths.decaying_tiles : paths.serial_tiles);
        return decays;
    }

    //! scan_tiles(): tiles [begin, end) from sm.carry; y into `y` when output.
    void scan_tiles(int64_t begin, int64_t end, bool output, float* y)
    {
        Dims const& d = in.d;
        bool const vec_rows = rows_vectorisable(in, at.b, at.k, true);
        for (int64_t t0 = begin; t0 < end; t0 += kTile)
        {
            static LaneSteps steps[kThreads];
            float dt_sum[kThreads];
            int count[kThreads];
            bool const decays = load_steps(t0, end, steps, count);
            for (int thread = 0; thread < kThreads; ++thread)
            {
                dt_sum[thread] = lane_dt_sum(steps[thread]);
            }
            stage_tile(in, at.b, at.k, t0, true, sm, paths, vec_rows && t0 + kTile <= d.length);
            for (int ch = 0; ch < at.channels; ++ch)
            {
                for (int n = 0; n < d.state; ++n)
                {
                    if (decays)
                    {
                        decaying_state(ch, n, steps + ch * kLanes, dt_sum + ch * kLanes);
                    }
                    else
                    {
                        serial_state(ch, n, steps + ch * kLanes);
                    }
                }
                if (output)
                {
                    store_y(t0, ch, steps, count, y);
                }
            }
        }
    }

    //! decaying_states()'s body for one state: step maps, compose, 16-lane scan, replay.
    void decaying_state(int ch, int n, LaneSteps* s, float const* dt_sum)
    {
        float const a2 = sm.a2[ch][n];
        float const carry = sm.carry[ch][n];
        static StepMaps m[kLanes];
        Affine f[kLanes];
        for (int lane = 0; lane < kLanes; ++lane)
        {
            step_maps(s[lane].dt, LaneArray{s[lane].dtu}, a2, HostRow{sm.bc.data() + stage_row(n), lane}, m[lane]);
            f[lane].a = fast_exp2(a2 * dt_sum[lane]);
            f[lane].b = madd(f[lane].a, lane == 0 ? carry : 0.0f, compose(m[lane]));
        }
        for (int off = 1; off < kLanes; off *= 2) // scan_round(): shuffles up, in-range lanes compose
        {
            Affine up[kLanes];
            std::copy(f, f + kLanes, up);
            for (int lane = off; lane < kLanes; ++lane)
            {
                f[lane].b = madd(f[lane].a, up[lane - off].b, f[lane].b);
                if (off < kLanes / 2)
                {
                    f[lane].a = f[lane].a * up[lane - off].a;
                }
            }
        }
        for (int lane = 0; lane < kLanes; ++lane)
        {
            replay_output(lane == 0 ? carry : f[lane - 1].b, m[lane],
                HostRow{sm.bc.data() + stage_row(in.d.state + n), lane}, s[lane].y);
        }
        sm.carry[ch][n] = f[kLanes - 1].b;
    }

    //! serial_states()'s body for one state: the lanes walk their steps one after another.
    void serial_state(int ch, int n, LaneSteps* s)
    {
        float const a2 = sm.a2[ch][n];
        float h = sm.carry[ch][n];
        for (int lane = 0; lane < kLanes; ++lane)
        {
            h = serial_steps(h, s[lane].dt, LaneArray{s[lane].dtu}, a2, HostRow{sm.bc.data() + stage_row(n), lane},
                HostRow{sm.bc.data() + stage_row(in.d.state + n), lane}, s[lane].y);
        }
        sm.carry[ch][n] = h;
    }

    //! segment_maps(): pass 1, the segment's maps by reduction (invalid when a tile may grow).
    void segment_maps(std::vector<Affine>& ws, Plan const& plan, int64_t begin, int64_t end)
    {
        Dims const& d = in.d;
        bool const vec_rows = rows_vectorisable(in, at.b, at.k, false);
        static float acc[kThreads][kMaxState];
        float total[kThreads] = {};
        bool valid = true;
        for (auto& row : acc)
        {
            std::fill(row, row + kMaxState, 0.0f);
        }
        for (int64_t t0 = begin; t0 < end; t0 += kTile)
        {
            static LaneSteps steps[kThreads];
            int count[kThreads];
            float after[kThreads];
            float tile[kThreads];
            if (!load_steps(t0, end, steps, count))
            {
                valid = false;
                break;
            }
            for (int ch = 0; ch < kChannels; ++ch)
            {
                float incl[kLanes];
                for (int lane = 0; lane < kLanes; ++lane)
                {
                    incl[lane] = lane_dt_sum(steps[ch * kLanes + lane]);
                    total[ch * kLanes + lane] += incl[lane];
                }
                for (int off = 1; off < kLanes; off *= 2) // __shfl_down_sync rounds: suffix sums
                {
                    float later[kLanes];
                    std::copy(incl, incl + kLanes, later);
                    for (int lane = 0; lane + off < kLanes; ++lane)
                    {
                        incl[lane] += later[lane + off];
                    }
                }
                for (int lane = 0; lane < kLanes; ++lane)
                {
                    after[ch * kLanes + lane] = lane == kLanes - 1 ? 0.0f : incl[lane + 1];
                    tile[ch * kLanes + lane] = incl[0];
                }
            }
            stage_tile(in, at.b, at.k, t0, false, sm, paths, vec_rows && t0 + kTile <= d.length);
            for (int thread = 0; thread < at.channels * kLanes; ++thread)
            {
                int const ch = thread / kLanes;
                for (int n = 0; n < d.state; ++n)
                {
                    float const a2 = sm.a2[ch][n];
                    float const h = compose_steps(steps[thread].dt, LaneArray{steps[thread].dtu}, a2,
                        HostRow{sm.bc.data() + stage_row(n), thread % kLanes});
                    acc[thread][n] = madd(acc[thread][n], fast_exp2(a2 * tile[thread]), h * fast_exp2(a2 * after[thread]));
                }
            }
        }
        for (int ch = 0; ch < at.channels; ++ch)
        {
            float* v = total + ch * kLanes;
            for (int off = 1; off < kLanes; off *= 2) // __shfl_xor_sync butterflies
            {
                float before[kLanes];
                std::copy(v, v + kLanes, before);
                for (int lane = 0; lane < kLanes; ++lane)
                {
                    v[lane] = before[lane] + before[lane ^ off];
                }
            }
            for (int n = 0; n < d.state; ++n) // lane n: its state's partial maps of the 16 lanes
            {
                float lanes[kLanes];
                for (int lane = 0; lane < kLanes; ++lane)
                {
                    lanes[lane] = acc[ch * kLanes + lane][n];
                }
                ws[offset_map(d, at.b, at.first_channel + ch, n, at.segment, plan.segments - 1)]
                    = Affine{valid ? fast_exp2(sm.a2[ch][n] * v[n]) : -1.0f, valid ? pairwise_sum(lanes) : 0.0f};
            }
        }
    }

    //! The y store of channel ch's lanes (16-byte stores where the row is aligned, all steps inside).
    void store_y(int64_t t0, int ch, LaneSteps const* steps, int const* count, float* y)
    {
        int64_t const row_start = offset_bdl(in.d, at.b, at.first_channel + ch);
        for (int lane = 0; lane < kLanes; ++lane)
        {
            int const thread = ch * kLanes + lane;
            int64_t const t = t0 + static_cast<int64_t>(lane) * kItems;
            bool const vec = row_aligned(in, kY, row_start) && count[thread] == kItems;
            ++(vec ? paths.vector : paths.scalar);
            for (int i = 0; i < count[thread]; ++i)
            {
                y[row_start + t + i] = steps[thread].y[i];
            }
        }
    }

    //! fused_segment()'s phase 1: the tile's steps (kept for phase 2), each lane's exclusive
    //! prefix map per state (kept), and the tile's maps into the workspace unless it is the last.
    std::vector<LaneSteps> fused_steps;
    std::vector<int> fused_count;
    std::vector<Affine> fused_prefix; // [n][thread]

    void fused_phase1(std::vector<Affine>& ws, Plan const& plan, int64_t begin, int64_t end)
    {
        Dims const& d = in.d;
        fused_steps.assign(kThreads, LaneSteps{});
        fused_count.assign(kThreads, 0);
        fused_prefix.assign(static_cast<size_t>(d.state) * kThreads, Affine{kNaN, kNaN});
        if (!always)
        {
            return; // nothing published: segment 0's block scans the whole sequence in phase 2
        }
        load_steps(begin, end, fused_steps.data(), fused_count.data());
        float dt_sum[kThreads];
        for (int thread = 0; thread < kThreads; ++thread)
        {
            dt_sum[thread] = lane_dt_sum(fused_steps[thread]);
        }
        stage_tile(in, at.b, at.k, begin, true, sm, paths, rows_vectorisable(in, at.b, at.k, true) && begin + kTile <= d.length);
        int32_t const maps = plan.segments - 1;
        for (int ch = 0; ch < at.channels; ++ch)
        {
            for (int n = 0; n < d.state; ++n)
            {
                float const a2 = sm.a2[ch][n];
                Affine f[kLanes];
                for (int lane = 0; lane < kLanes; ++lane)
                {
                    LaneSteps const& s = fused_steps[ch * kLanes + lane];
                    f[lane] = Affine{fast_exp2(a2 * dt_sum[ch * kLanes + lane]),
                        compose_steps(s.dt, LaneArray{s.dtu}, a2, HostRow{sm.bc.data() + stage_row(n), lane})};
                }
                for (int off = 1; off < kLanes; off *= 2) // scan_round() with the decays in every round
                {
                    Affine up[kLanes];
                    std::copy(f, f + kLanes, up);
                    for (int lane = off; lane < kLanes; ++lane)
                    {
                        f[lane].b = madd(f[lane].a, up[lane - off].b, f[lane].b);
                        f[lane].a = f[lane].a * up[lane - off].a;
                    }
                }
                for (int lane = 0; lane < kLanes; ++lane)
                {
                    fused_prefix[static_cast<size_t>(n) * kThreads + ch * kLanes + lane]
                        = lane == 0 ? Affine{1.0f, 0.0f} : f[lane - 1];
                }
                if (at.segment < maps)
                {
                    ws[offset_map(d, at.b, at.first_channel + ch, n, at.segment, maps)] = f[kLanes - 1];
                }
            }
        }
    }

    //! Phase 2, after the grid-wide barrier.
    void fused_phase2(std::vector<Affine> const& ws, Plan const& plan, int64_t begin, float* y)
    {
        Dims const& d = in.d;
        if (!always)
        {
            if (at.segment == 0)
            {
                scan_tiles(0, d.length, true, y);
            }
            return;
        }
        if (at.segment > 0 && compose_segments(ws, at.segment, plan.segments - 1))
        {
            std::fprintf(stderr, "host_harness: an invalid map in the fused mode\n");
            std::exit(3);
        }
        for (int ch = 0; ch < at.channels; ++ch)
        {
            for (int n = 0; n < d.state; ++n)
            {
                for (int lane = 0; lane < kLanes; ++lane)
                {
                    int const thread = ch * kLanes + lane;
                    LaneSteps& s = fused_steps[thread];
                    Affine const p = fused_prefix[static_cast<size_t>(n) * kThreads + thread];
                    serial_steps(madd(p.a, sm.carry[ch][n], p.b), s.dt, LaneArray{s.dtu}, sm.a2[ch][n],
                        HostRow{sm.bc.data() + stage_row(n), lane}, HostRow{sm.bc.data() + stage_row(d.state + n), lane}, s.y);
                }
            }
            store_y(begin, ch, fused_steps.data(), fused_count.data(), y);
        }
    }

    //! compose_segments(): the maps of segments 0 .. s-1 into sm.carry; whether one is invalid.
    bool compose_segments(std::vector<Affine> const& ws, int32_t s, int32_t maps)
    {
        int const parts = compose_parts(in.d.state);
        int32_t const run = (s + parts - 1) / parts;
        bool bad = false;
        for (int ch = 0; ch < at.channels; ++ch)
        {
            for (int n = 0; n < in.d.state; ++n)
            {
                std::vector<Affine> f(static_cast<size_t>(parts), identity_map());
                Affine const* m = ws.data() + offset_map(in.d, at.b, at.first_channel + ch, n, 0, maps);
                for (int part = 0; part < parts; ++part)
                {
                    int32_t const first = part * run;
                    int32_t const last = first + run < s ? first + run : s;
                    for (int32_t q = first; q < last; ++q)
                    {
                        bad |= m[q].a < 0.0f;
                        f[part] = then(f[part], m[q]);
                    }
                }
                for (int off = 1; off < parts; off *= 2) // __shfl_down_sync tree
                {
                    std::vector<Affine> const next = f;
                    for (int part = 0; part + off < parts; part += 2 * off)
                    {
                        f[part] = then(f[part], next[part + off]);
                    }
                }
                sm.carry[ch][n] = f[0].b;
            }
        }
        return bad;
    }
};

//! The fused mode: every block's phase 1, the grid-wide barrier, every block's phase 2.
void run_fused(Inputs const& in, Plan const& plan, float* y, PathCount& paths)
{
    Dims const& d = in.d;
    int64_t const per = blocks_per_segment(d);
    std::vector<Affine> ws(workspace_bytes(d) / sizeof(Affine), Affine{kNaN, kNaN});
    std::vector<Block> blocks;
    blocks.reserve(static_cast<size_t>(per * plan.segments));
    for (int64_t block = 0; block < per * plan.segments; ++block)
    {
        blocks.emplace_back(in, block_coord(plan, static_cast<uint32_t>(block), false), paths);
        Block& blk = blocks.back();
        int64_t const begin = blk.at.segment * plan.segment_length;
        blk.fused_phase1(ws, plan, begin, std::min<int64_t>(begin + plan.segment_length, d.length));
    }
    for (Block& blk : blocks)
    {
        blk.fused_phase2(ws, plan, blk.at.segment * plan.segment_length, y);
    }
}

//! The launcher: pass 1 (when segmented), then pass 2.
void run(Inputs const& in, Plan const& plan, float* y, PathCount& paths)
{
    Dims const& d = in.d;
    int64_t const per = blocks_per_segment(d);
    std::vector<Affine> ws(workspace_bytes(d) / sizeof(Affine), Affine{kNaN, kNaN});
    auto const bounds = [&](int32_t s, int64_t* begin, int64_t* end) {
        *begin = s * plan.segment_length;
        *end = *begin + plan.segment_length < d.length ? *begin + plan.segment_length : static_cast<int64_t>(d.length);
    };
    for (int64_t block = 0; plan.segments > 1 && block < per * (plan.segments - 1); ++block)
    {
        Block blk(in, block_coord(plan, static_cast<uint32_t>(block), true), paths);
        int64_t begin = 0;
        int64_t end = 0;
        bounds(blk.at.segment, &begin, &end);
        blk.segment_maps(ws, plan, begin, end);
    }
    for (int64_t block = 0; block < per * plan.segments; ++block)
    {
        Block blk(in, block_coord(plan, static_cast<uint32_t>(block), false), paths);
        int64_t begin = 0;
        int64_t end = 0;
        bounds(blk.at.segment, &begin, &end);
        if (blk.at.segment > 0 && blk.compose_segments(ws, blk.at.segment, plan.segments - 1))
        {
            // an earlier segment's map is invalid: the recurrence over [0, begin) first
            ++paths.catch_ups;
            for (int ch = 0; ch < kChannels; ++ch)
            {
                std::fill(blk.sm.carry[ch], blk.sm.carry[ch] + kMaxState, 0.0f);
            }
            blk.scan_tiles(0, begin, false, nullptr);
        }
        blk.scan_tiles(begin, end, true, y);
    }
}

//! --check-layout: bijection and bank-conflict freedom of the staging and lane index functions.
int check_layout()
{
    int failures = 0;
    auto const bank_group = [](int float_offset) { return (float_offset / kChunk) % 8; };
    for (int elems : {4, 8})
    {
        std::multiset<int> written;
        int const per_row = kTile / elems;
        for (int w = 0; w < per_row; ++w)
        {
            StageItem const item = stage_item(w, elems);
            for (int e = 0; e < elems; ++e)
            {
                int const slot = item.offset + (e / kChunk) * stage_offset(0, 1) + e % kChunk;
                written.insert(slot);
                // the float staged there is the one the lane owning that step reads
                int const step = item.step + e;
                int const lane = step / kItems;
                int const part = (step % kItems) / kChunk;
                if (slot != stage_offset(lane, part) + step % kChunk)
                {
                    std::printf("elems %d: step %d staged at %d, read at %d\n", elems, step, slot,
                        stage_offset(lane, part) + step % kChunk);
                    ++failures;
                }
            }
        }
        if (static_cast<int>(written.size()) != kTile || std::set<int>(written.begin(), written.end()).size() != kTile)
        {
            std::printf("elems %d: the staged row is not written exactly once per float\n", elems);
            ++failures;
        }
        // stores: 8 consecutive threads (a quarter warp) store to 8 different bank groups
        for (int first = 0; first < per_row; first += 8)
        {
            for (int chunk = 0; chunk < elems / kChunk; ++chunk)
            {
                std::set<int> groups;
                for (int w = first; w < first + 8; ++w)
                {
                    groups.insert(bank_group(stage_item(w, elems).offset + chunk * stage_offset(0, 1)));
                }
                if (groups.size() != 8)
                {
                    std::printf("elems %d: staging stores of threads %d..%d conflict\n", elems, first, first + 7);
                    ++failures;
                }
            }
        }
    }
    // loads: 8 consecutive lanes reading the same part hit 8 different bank groups
    for (int part = 0; part < kItems / kChunk; ++part)
    {
        for (int first = 0; first < kLanes; first += 8)
        {
            std::set<int> groups;
            for (int lane = first; lane < first + 8; ++lane)
            {
                groups.insert(bank_group(stage_offset(lane, part)));
            }
            if (groups.size() != 8)
            {
                std::printf("lane loads of part %d conflict\n", part);
                ++failures;
            }
        }
    }
    // fast_div / divide (block coordinates): exact for dividends below 2^31
    for (uint32_t d : {1u, 2u, 3u, 5u, 6u, 7u, 48u, 63u, 64u, 65u, 127u, 1000u, 65535u, 65536u, 1u << 20, 123456789u,
             (1u << 30) + 1u, (1u << 31) - 1u})
    {
        FastDiv const f = fast_div(d);
        for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 2 * d - 1, 1000003u, (1u << 30) - 1u, (1u << 31) - 2u, (1u << 31) - 1u})
        {
            if (n < (1u << 31) && divide(n, f) != n / d)
            {
                std::printf("divide(%u, %u) = %u, not %u\n", n, d, divide(n, f), n / d);
                ++failures;
            }
        }
        for (uint32_t n = 0; n < 100000; n += 7)
        {
            if (divide(n, f) != n / d)
            {
                std::printf("divide(%u, %u) = %u, not %u\n", n, d, divide(n, f), n / d);
                ++failures;
            }
        }
    }
    std::printf(failures == 0 ? "layout ok\n" : "layout: %d failures\n", failures);
    return failures == 0 ? 0 : 1;
}

bool read_floats(std::FILE* f, std::vector<float>& v, int64_t n)
{
    v.resize(static_cast<size_t>(n));
    return std::fread(v.data(), sizeof(float), v.size(), f) == v.size();
}

constexpr int kHeaderInts = 19;

} // namespace

int main(int argc, char** argv)
{
    if (argc == 2 && std::strcmp(argv[1], "--check-layout") == 0)
    {
        return check_layout();
    }
    if ((argc == 9 || argc == 10) && std::strcmp(argv[1], "--plan") == 0)
    {
        Dims const d{std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6])};
        if (char const* why = check_dims(d))
        {
            std::fprintf(stderr, "host_harness: %s\n", why);
            return 2;
        }
        int32_t const fused_blocks_per_sm = argc == 10 ? std::atoi(argv[9]) : 0;
        Choice const choice = choose(d, true, std::atoi(argv[7]), std::atoi(argv[8]), fused_blocks_per_sm);
        std::printf("{\"segments\": %d, \"segment_length\": %lld, \"fused\": %s, \"blocks_per_segment\": %lld, "
                    "\"max_segments\": %lld, \"workspace_bytes\": %llu}\n",
            choice.plan.segments, static_cast<long long>(choice.plan.segment_length), choice.fused ? "true" : "false",
            static_cast<long long>(blocks_per_segment(d)), static_cast<long long>(max_segments(d)),
            static_cast<unsigned long long>(workspace_bytes(d)));
        return 0;
    }
    if (argc != 3)
    {
        std::fprintf(stderr, "usage: host_harness IN.bin OUT.bin | --check-layout | --plan B D K L N SM_COUNT "
                             "BLOCKS_PER_SM [FUSED_BLOCKS_PER_SM]\n");
        return 2;
    }
    std::FILE* in = std::fopen(argv[1], "rb");
    if (in == nullptr)
    {
        std::fprintf(stderr, "host_harness: cannot open %s\n", argv[1]);
        return 2;
    }
    int32_t header[kHeaderInts];
    if (std::fread(header, sizeof(int32_t), kHeaderInts, in) != kHeaderInts)
    {
        std::fprintf(stderr, "host_harness: %s is shorter than its %d-int header\n", argv[1], kHeaderInts);
        return 2;
    }
    Dims const d{header[0], header[1], header[2], header[3], header[4]};
    if (char const* why = check_dims(d))
    {
        std::fprintf(stderr, "host_harness: %s\n", why);
        return 2;
    }
    if (header[9] != 4 && header[9] != 2)
    {
        std::fprintf(stderr, "host_harness: elem_bytes must be 4 (fp32) or 2 (fp16)\n");
        return 2;
    }
    int64_t const bdl = static_cast<int64_t>(d.batch) * d.dim * d.length;
    int64_t const bknl = static_cast<int64_t>(d.batch) * d.groups * d.state * d.length;
    std::vector<float> u, delta, A, B, C, D_skip, delta_bias;
    bool ok = read_floats(in, u, bdl) && read_floats(in, delta, bdl)
        && read_floats(in, A, static_cast<int64_t>(d.dim) * d.state) && read_floats(in, B, bknl)
        && read_floats(in, C, bknl);
    if (ok && header[6] != 0)
    {
        ok = read_floats(in, D_skip, d.dim);
    }
    if (ok && header[7] != 0)
    {
        ok = read_floats(in, delta_bias, d.dim);
    }
    std::fclose(in);
    if (!ok)
    {
        std::fprintf(stderr, "host_harness: %s is shorter than its header says\n", argv[1]);
        return 2;
    }
    Inputs const inputs{d, header[5] != 0, u.data(), delta.data(), A.data(), B.data(), C.data(),
        D_skip.empty() ? nullptr : D_skip.data(), delta_bias.empty() ? nullptr : delta_bias.data(), header[9],
        {header[10], header[11], header[12], header[13], header[14]}};
    // segments > 0: two passes with that many; 0: as the launcher chooses; -1: the fused mode
    Choice choice{};
    if (header[8] > 0)
    {
        choice = Choice{plan_for(d, header[8]), false, plan_for(d, header[8])};
    }
    else if (header[8] == 0)
    {
        choice = choose(d, inputs.softplus && header[18] == 0, header[15], header[16], header[17]);
    }
    else
    {
        choice = Choice{plan_for(d, static_cast<int32_t>(tiles_in(d))), true, plan_for(d, 1)};
    }
    if (header[8] > max_segments(d))
    {
        std::fprintf(stderr, "host_harness: at most %lld segments for these dims\n", static_cast<long long>(max_segments(d)));
        return 2;
    }
    if (choice.fused && (!inputs.softplus || d.state > kMaxFusedState || tiles_in(d) > max_segments(d)))
    {
        std::fprintf(stderr, "host_harness: the fused mode needs softplus, N <= %d and at most %lld tiles\n",
            kMaxFusedState, static_cast<long long>(max_segments(d)));
        return 2;
    }
    Plan const plan = choice.plan;
    std::vector<float> y(static_cast<size_t>(bdl), kNaN);
    PathCount paths;
    if (choice.fused)
    {
        run_fused(inputs, plan, y.data(), paths);
    }
    else
    {
        run(inputs, plan, y.data(), paths);
    }
    std::FILE* out = std::fopen(argv[2], "wb");
    if (out == nullptr || std::fwrite(y.data(), sizeof(float), y.size(), out) != y.size())
    {
        std::fprintf(stderr, "host_harness: cannot write %s\n", argv[2]);
        return 2;
    }
    std::fclose(out);
    // For the tests: the plan and how many lane loads, stores and staging chunks took each path.
    std::printf("{\"segments\": %d, \"segment_length\": %lld, \"fused\": %s, \"vector\": %lld, \"scalar\": %lld, "
                "\"decaying_tiles\": %lld, \"serial_tiles\": %lld, \"catch_ups\": %lld}\n",
        plan.segments, static_cast<long long>(plan.segment_length), choice.fused ? "true" : "false",
        static_cast<long long>(paths.vector),
        static_cast<long long>(paths.scalar), static_cast<long long>(paths.decaying_tiles),
        static_cast<long long>(paths.serial_tiles), static_cast<long long>(paths.catch_ups));
    return 0;
}
