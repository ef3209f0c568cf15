// Host harness: runs the kernel's arithmetic (scan_math.h) on the CPU, replaying the
// CUDA block's tiling, warp scans and carried state step for step, so that the Python
// tests can compare it with the reference scan (tests/test_trt_plugin.py).
//
//   host_harness IN.bin OUT.bin
//
// IN.bin: int32 B, D, K, L, N, delta_softplus, has_D_skip, has_delta_bias, segments (0: as
// the launcher would choose for a GPU with `sm_count` = 132 SMs, an H100); then float32
// u [B,D,L], delta [B,D,L], A [D,N], B [B,K,N,L], C [B,K,N,L], D_skip [D] and
// delta_bias [D] when present. OUT.bin: float32 y [B,D,L].
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "qmamba/scan_math.h"

namespace {

using namespace qmamba::scan;

//! What one CUDA thread holds for one tile.
struct ThreadTile
{
    int count = 0;
    int64_t t0 = 0;
    float u[kItems] = {};
    float dt[kItems] = {};
    float y[kItems] = {};
};

void load_steps(float const* src, int64_t t0, int count, float* dst)
{
    for (int i = 0; i < kItems; ++i)
    {
        dst[i] = i < count ? src[t0 + i] : 0.0f;
    }
}

//! __shfl_up_sync inclusive scan of one warp's maps, as the kernel does it.
void warp_inclusive_scan(Affine* lanes)
{
    for (int offset = 1; offset < kWarpSize; offset *= 2)
    {
        Affine before[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane)
        {
            before[lane] = lanes[lane];
        }
        for (int lane = offset; lane < kWarpSize; ++lane)
        {
            lanes[lane] = then(before[lane - offset], before[lane]);
        }
    }
}

//! The inputs of one call.
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
};

//! One block of the kernel: steps [begin, end) of (b, c) from state h0, one map per state.
//! Writes y unless totals_only; returns the segment's composed maps (the carry at the end).
std::vector<Affine> scan_segment(Inputs const& in, int32_t b, int32_t c, int64_t begin, int64_t end,
    std::vector<float> const& h0, bool totals_only, float* y_all)
{
    Dims const& d = in.d;
    int32_t const k = c / (d.dim / d.groups);
    float const* u = in.u + offset_bdl(d, b, c);
    float const* delta = in.delta + offset_bdl(d, b, c);
    float* y = y_all + offset_bdl(d, b, c);
    float const d_skip = in.D_skip != nullptr ? in.D_skip[c] : 0.0f;
    float const bias = in.delta_bias != nullptr ? in.delta_bias[c] : 0.0f;
    std::vector<Affine> carry(d.state, identity_map());

    for (int64_t tile = begin; tile < end; tile += kTile)
    {
        ThreadTile threads[kThreads];
        for (int t = 0; t < kThreads; ++t)
        {
            ThreadTile& th = threads[t];
            th.count = steps_owned(tile, t, end, &th.t0);
            load_steps(u, th.t0, th.count, th.u);
            load_steps(delta, th.t0, th.count, th.dt);
            for (int i = 0; i < kItems; ++i)
            {
                th.dt[i] = step_size(th.dt[i], bias, in.softplus);
                th.y[i] = d_skip * th.u[i];
            }
        }
        for (int32_t n = 0; n < d.state; ++n)
        {
            float const* Bn = in.B + offset_bknl(d, b, k, n);
            float const* Cn = in.C + offset_bknl(d, b, k, n);
            float const a = in.A[static_cast<int64_t>(c) * d.state + n];
            Affine maps[kThreads];
            for (int t = 0; t < kThreads; ++t)
            {
                float bv[kItems];
                load_steps(Bn, threads[t].t0, threads[t].count, bv);
                maps[t] = segment_map(threads[t].dt, threads[t].u, bv, a, threads[t].count);
            }
            Affine warp_totals[kWarps];
            Affine before_me[kThreads];
            for (int w = 0; w < kWarps; ++w)
            {
                Affine* lanes = maps + w * kWarpSize;
                warp_inclusive_scan(lanes);
                warp_totals[w] = lanes[kWarpSize - 1];
                for (int lane = 0; lane < kWarpSize; ++lane)
                {
                    before_me[w * kWarpSize + lane] = lane == 0 ? identity_map() : lanes[lane - 1];
                }
            }
            if (!totals_only)
            {
                for (int t = 0; t < kThreads; ++t)
                {
                    Affine prefix = carry[n];
                    for (int w = 0; w < t / kWarpSize; ++w)
                    {
                        prefix = then(prefix, warp_totals[w]);
                    }
                    float const h = apply(then(prefix, before_me[t]), h0[n]);
                    float bv[kItems];
                    float cv[kItems];
                    load_steps(Bn, threads[t].t0, threads[t].count, bv);
                    load_steps(Cn, threads[t].t0, threads[t].count, cv);
                    replay_segment(h, threads[t].dt, threads[t].u, bv, cv, a, threads[t].count, threads[t].y);
                }
            }
            for (int w = 0; w < kWarps; ++w)
            {
                carry[n] = then(carry[n], warp_totals[w]);
            }
        }
        if (!totals_only)
        {
            for (int t = 0; t < kThreads; ++t)
            {
                for (int i = 0; i < threads[t].count; ++i)
                {
                    y[threads[t].t0 + i] = threads[t].y[i];
                }
            }
        }
    }
    return carry;
}

//! The kernel's two passes for one (b, c) sequence cut into `segments` blocks.
void scan_sequence(Inputs const& in, int32_t b, int32_t c, int32_t segments, float* y)
{
    Dims const& d = in.d;
    int64_t const seg_len = segment_length(d, segments);
    auto const bounds = [&](int32_t s, int64_t* begin, int64_t* end) {
        *begin = s * seg_len;
        *end = *begin + seg_len < d.length ? *begin + seg_len : static_cast<int64_t>(d.length);
    };
    std::vector<float> const zero(d.state, 0.0f);
    std::vector<std::vector<Affine>> totals(segments);
    for (int32_t s = 0; segments > 1 && s < segments; ++s) // pass 1
    {
        int64_t begin = 0;
        int64_t end = 0;
        bounds(s, &begin, &end);
        totals[s] = scan_segment(in, b, c, begin, end, zero, true, y);
    }
    for (int32_t s = 0; s < segments; ++s) // pass 2
    {
        std::vector<float> h0(d.state, 0.0f);
        for (int32_t n = 0; n < d.state; ++n)
        {
            for (int32_t earlier = 0; earlier < s; ++earlier)
            {
                h0[n] = apply(totals[earlier][n], h0[n]);
            }
        }
        int64_t begin = 0;
        int64_t end = 0;
        bounds(s, &begin, &end);
        scan_segment(in, b, c, begin, end, h0, false, y);
    }
}

bool read_floats(std::FILE* f, std::vector<float>& v, int64_t n)
{
    v.resize(static_cast<size_t>(n));
    return std::fread(v.data(), sizeof(float), v.size(), f) == v.size();
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 3)
    {
        std::fprintf(stderr, "usage: host_harness IN.bin OUT.bin\n");
        return 2;
    }
    std::FILE* in = std::fopen(argv[1], "rb");
    if (in == nullptr)
    {
        std::fprintf(stderr, "host_harness: cannot open %s\n", argv[1]);
        return 2;
    }
    int32_t header[9];
    if (std::fread(header, sizeof(int32_t), 9, in) != 9)
    {
        std::fprintf(stderr, "host_harness: %s is shorter than its 9-int header\n", argv[1]);
        return 2;
    }
    Dims const d{header[0], header[1], header[2], header[3], header[4]};
    bool const softplus = header[5] != 0;
    if (char const* why = check_dims(d))
    {
        std::fprintf(stderr, "host_harness: %s\n", why);
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
    std::vector<float> y(static_cast<size_t>(bdl), 0.0f);
    Inputs const inputs{d, softplus, u.data(), delta.data(), A.data(), B.data(), C.data(),
        D_skip.empty() ? nullptr : D_skip.data(), delta_bias.empty() ? nullptr : delta_bias.data()};
    int32_t const segments = header[8] > 0 ? header[8] : segments_for(d, 132);
    if (segments > kMaxSegments)
    {
        std::fprintf(stderr, "host_harness: at most %d segments\n", kMaxSegments);
        return 2;
    }
    for (int32_t b = 0; b < d.batch; ++b)
    {
        for (int32_t c = 0; c < d.dim; ++c)
        {
            scan_sequence(inputs, b, c, segments, y.data());
        }
    }
    std::FILE* out = std::fopen(argv[2], "wb");
    if (out == nullptr || std::fwrite(y.data(), sizeof(float), y.size(), out) != y.size())
    {
        std::fprintf(stderr, "host_harness: cannot write %s\n", argv[2]);
        return 2;
    }
    std::fclose(out);
    return 0;
}
