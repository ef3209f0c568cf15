// GPU check and benchmark of the SelectiveScan kernel (needs an NVIDIA GPU; compiled in CI).
//
//   kernel_check B D K L N [fp32|fp16] [iterations] [peak_GBps] [options]
//
// options:
//   --no-softplus   delta_softplus = 0 (dt = delta + bias, kept >= 0 unless --grow)
//   --grow          delta_softplus = 0 with dt < 0 in the middle third of the sequence: growing
//                   maps, run by the kernel as the plain recurrence (u = 0 before that third, so
//                   the state stays finite)
//   --offset E      base pointers of u, delta, B, C and y E elements past a 256-byte boundary
//                   (E % (16 / element size) != 0: the scalar paths)
//   --positive-a    A > 0 (small) in the first channel, softplus on: that channel's block takes
//                   the serial tiles (and in the fused mode, segment 0's block scans its sequence)
//   --no-timing     check only (for compute-sanitizer runs)
//
// 1. Random inputs (fixed seed) -> launch_selective_scan -> y, compared with a sequential
//    float64 run of the contract's recurrence on the CPU: the max |error| relative to max |y|;
//    fails (exit 1) above 1e-5 (fp32 I/O) or 1e-2 (fp16 I/O). Three modes: one pass (no
//    workspace), the launcher's choice with a workspace (one pass, two passes or the fused mode:
//    "fused" in the output says which), two passes forced (Strategy::kTwoPasses), and the
//    launcher's choice captured into a CUDA graph and replayed (max_rel_error_graph).
// 2. `iterations` timed launches per mode (CUDA events): mean ms per call, the bytes the op
//    must move at least (u, delta, y per channel; B, C once per group; A, D, bias), the
//    effective bandwidth and its fraction of the GPU's peak (from the device attributes, or
//    `peak_GBps` when given and > 0).
// Output: one JSON line (tools/bench_scan_gpu.py, tools/gpu_kernel_check.sh). Exit 2: no GPU or
// a CUDA error.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "qmamba/selective_scan.h"

namespace {

#define CHECK_CUDA(call)                                                                                               \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const e = (call);                                                                                  \
        if (e != cudaSuccess)                                                                                          \
        {                                                                                                              \
            std::fprintf(stderr, "kernel_check: %s failed: %s\n", #call, cudaGetErrorString(e));                      \
            std::exit(2);                                                                                              \
        }                                                                                                              \
    } while (0)

//! Deterministic uniform numbers in [lo, hi).
struct Random
{
    uint64_t state = 0x9E3779B97F4A7C15ull;
    float next(float lo, float hi)
    {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        return lo + (hi - lo) * static_cast<float>((state >> 40) & 0xFFFFFF) / 16777216.0f;
    }
    std::vector<float> fill(size_t n, float lo, float hi)
    {
        std::vector<float> v(n);
        for (float& x : v)
        {
            x = next(lo, hi);
        }
        return v;
    }
};

//! The recurrence of the op contract, sequentially, in float64.
std::vector<double> reference(qmamba::scan::Dims const& d, bool softplus, std::vector<float> const& u,
    std::vector<float> const& delta, std::vector<float> const& A, std::vector<float> const& B,
    std::vector<float> const& C, std::vector<float> const& Dskip, std::vector<float> const& bias)
{
    std::vector<double> y(u.size());
    std::vector<double> h(d.state);
    int32_t const per_group = d.dim / d.groups;
    for (int32_t b = 0; b < d.batch; ++b)
    {
        for (int32_t c = 0; c < d.dim; ++c)
        {
            int32_t const k = c / per_group;
            std::fill(h.begin(), h.end(), 0.0);
            int64_t const row = (static_cast<int64_t>(b) * d.dim + c) * d.length;
            for (int32_t t = 0; t < d.length; ++t)
            {
                double const z = static_cast<double>(delta[row + t]) + bias[c];
                double const dt = !softplus || z > 20.0 ? z : std::log1p(std::exp(z));
                double acc = static_cast<double>(Dskip[c]) * u[row + t];
                for (int32_t n = 0; n < d.state; ++n)
                {
                    int64_t const bn = ((static_cast<int64_t>(b) * d.groups + k) * d.state + n) * d.length + t;
                    h[n] = std::exp(dt * A[static_cast<int64_t>(c) * d.state + n]) * h[n] + dt * B[bn] * u[row + t];
                    acc += C[bn] * h[n];
                }
                y[row + t] = acc;
            }
        }
    }
    return y;
}

//! Device copies of the inputs, `offset` elements past a 256-byte boundary.
struct DeviceBuffer
{
    void* base = nullptr;
    void* at = nullptr;
};

DeviceBuffer upload(std::vector<float> const& host, bool half, int offset)
{
    DeviceBuffer buf;
    size_t const elem = half ? sizeof(__half) : sizeof(float);
    CHECK_CUDA(cudaMalloc(&buf.base, (host.size() + offset) * elem + 256));
    buf.at = static_cast<char*>(buf.base) + offset * elem;
    if (half)
    {
        std::vector<__half> h(host.size());
        for (size_t i = 0; i < host.size(); ++i)
        {
            h[i] = __float2half(host[i]);
        }
        CHECK_CUDA(cudaMemcpy(buf.at, h.data(), host.size() * elem, cudaMemcpyHostToDevice));
    }
    else
    {
        CHECK_CUDA(cudaMemcpy(buf.at, host.data(), host.size() * elem, cudaMemcpyHostToDevice));
    }
    return buf;
}

//! fp16 inputs are rounded before the reference sees them, so only the kernel's error is measured.
void round_to_half(std::vector<float>& v)
{
    for (float& x : v)
    {
        x = __half2float(__float2half(x));
    }
}

double peak_bandwidth_gbps(int device)
{
    int clock_khz = 0;
    int bus_bits = 0;
    if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) != cudaSuccess
        || cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) != cudaSuccess)
    {
        cudaGetLastError();
        return 0.0;
    }
    return 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9; // double data rate
}

} // namespace

int main(int argc, char** argv)
{
    std::vector<char const*> positional;
    bool softplus = true;
    bool grow = false;
    bool positive_a = false;
    bool timing = true;
    int offset = 0;
    for (int i = 1; i < argc; ++i)
    {
        if (std::strcmp(argv[i], "--no-softplus") == 0)
        {
            softplus = false;
        }
        else if (std::strcmp(argv[i], "--grow") == 0)
        {
            softplus = false;
            grow = true;
        }
        else if (std::strcmp(argv[i], "--positive-a") == 0)
        {
            positive_a = true;
        }
        else if (std::strcmp(argv[i], "--no-timing") == 0)
        {
            timing = false;
        }
        else if (std::strcmp(argv[i], "--offset") == 0 && i + 1 < argc)
        {
            offset = std::atoi(argv[++i]);
        }
        else
        {
            positional.push_back(argv[i]);
        }
    }
    if (positional.size() < 5 || offset < 0 || offset > 64)
    {
        std::fprintf(stderr,
            "usage: kernel_check B D K L N [fp32|fp16] [iterations] [peak_GBps] [--no-softplus] [--grow] "
            "[--positive-a] [--offset E (0..64)] [--no-timing]\n");
        return 2;
    }
    qmamba::scan::Dims const d{std::atoi(positional[0]), std::atoi(positional[1]), std::atoi(positional[2]),
        std::atoi(positional[3]), std::atoi(positional[4])};
    bool const half = positional.size() > 5 && std::strcmp(positional[5], "fp16") == 0;
    int const iterations = positional.size() > 6 ? std::atoi(positional[6]) : 20;
    double peak = positional.size() > 7 ? std::atof(positional[7]) : 0.0;
    if (char const* why = qmamba::scan::check_dims(d))
    {
        std::fprintf(stderr, "kernel_check: %s\n", why);
        return 2;
    }
    size_t const bdl = static_cast<size_t>(d.batch) * d.dim * d.length;
    size_t const bknl = static_cast<size_t>(d.batch) * d.groups * d.state * d.length;
    Random rng;
    std::vector<float> u = rng.fill(bdl, -1.f, 1.f), delta = rng.fill(bdl, -3.f, 1.f);
    std::vector<float> A = rng.fill(static_cast<size_t>(d.dim) * d.state, -2.f, -0.05f);
    std::vector<float> B = rng.fill(bknl, -1.f, 1.f), C = rng.fill(bknl, -1.f, 1.f);
    std::vector<float> Dskip = rng.fill(d.dim, -1.f, 1.f), bias = rng.fill(d.dim, -0.5f, 0.5f);
    if (!softplus)
    {
        // dt = delta + bias: >= 0 (decaying), or < 0 in the middle third (--grow: the state grows
        // by at most e^20 over that third, |A| <= 2)
        float const growth = 30.0f / static_cast<float>(d.length > 0 ? d.length : 1);
        for (size_t i = 0; i < bdl; ++i)
        {
            size_t const t = i % d.length;
            bool const middle = 3 * t >= static_cast<size_t>(d.length) && 3 * t < 2 * static_cast<size_t>(d.length);
            delta[i] = grow && middle ? -growth * (delta[i] + 3.f) / 4.f : 0.1f * (delta[i] + 3.f);
            if (grow && 3 * t < static_cast<size_t>(d.length))
            {
                u[i] = 0.0f;
            }
        }
        for (float& x : bias)
        {
            x = grow ? 0.0f : std::fabs(x);
        }
    }
    if (positive_a)
    {
        for (int32_t n = 0; n < d.state; ++n)
        {
            A[n] = 0.001f * static_cast<float>(n + 1) / static_cast<float>(d.state); // channel 0 grows slowly
        }
    }
    if (half)
    {
        round_to_half(u);
        round_to_half(delta);
        round_to_half(B);
        round_to_half(C);
    }

    qmamba::ScanArgs args{};
    args.dims = d;
    args.delta_softplus = softplus;
    args.io = half ? qmamba::IOType::kFLOAT16 : qmamba::IOType::kFLOAT32;
    DeviceBuffer const bu = upload(u, half, offset), bdelta = upload(delta, half, offset);
    DeviceBuffer const bB = upload(B, half, offset), bC = upload(C, half, offset);
    DeviceBuffer const bA = upload(A, false, 0), bD = upload(Dskip, false, 0), bbias = upload(bias, false, 0);
    DeviceBuffer const by = upload(std::vector<float>(bdl, 0.0f), half, offset);
    args.u = bu.at;
    args.delta = bdelta.at;
    args.B = bB.at;
    args.C = bC.at;
    args.A = static_cast<float const*>(bA.at);
    args.D_skip = static_cast<float const*>(bD.at);
    args.delta_bias = static_cast<float const*>(bbias.at);
    args.y = by.at;
    size_t const io_size = half ? sizeof(__half) : sizeof(float);

    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    qmamba::DeviceInfo info{};
    CHECK_CUDA(qmamba::describe_device(&info));
    int32_t const blocks_per_sm = info.blocks_per_sm[half ? 1 : 0][d.state - 1];
    void* workspace = nullptr;
    CHECK_CUDA(cudaMalloc(&workspace, qmamba::scan::workspace_bytes(d)));
    std::vector<double> const want = reference(d, softplus, u, delta, A, B, C, Dskip, bias);
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));

    //! (max relative error, ms per call) of one mode; `graph`: the checked call is captured into a
    //! CUDA graph and replayed from it (as TensorRT may run an engine), the timed ones are not.
    auto const run_mode = [&](void* ws, qmamba::Strategy strategy, bool graph, double* rel, double* ms) {
        args.workspace = ws;
        args.strategy = strategy;
        args.fused_blocks_per_sm = info.fused_blocks_per_sm[half ? 1 : 0][d.state - 1];
        args.sm_count = info.sm_count; // cached, as the plugin does
        args.blocks_per_sm = blocks_per_sm;
        CHECK_CUDA(cudaMemset(by.base, 0xff, (bdl + offset) * io_size)); // NaN where nothing is written
        if (graph)
        {
            cudaGraph_t captured = nullptr;
            cudaGraphExec_t exec = nullptr;
            CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
            CHECK_CUDA(qmamba::launch_selective_scan(args, stream));
            CHECK_CUDA(cudaStreamEndCapture(stream, &captured));
            CHECK_CUDA(cudaGraphInstantiate(&exec, captured, 0));
            CHECK_CUDA(cudaGraphLaunch(exec, stream));
            CHECK_CUDA(cudaStreamSynchronize(stream));
            CHECK_CUDA(cudaGraphExecDestroy(exec));
            CHECK_CUDA(cudaGraphDestroy(captured));
        }
        else
        {
            CHECK_CUDA(qmamba::launch_selective_scan(args, stream));
        }
        CHECK_CUDA(cudaStreamSynchronize(stream));
        std::vector<float> y(bdl);
        if (half)
        {
            std::vector<__half> yh(bdl);
            CHECK_CUDA(cudaMemcpy(yh.data(), args.y, bdl * io_size, cudaMemcpyDeviceToHost));
            for (size_t i = 0; i < bdl; ++i)
            {
                y[i] = __half2float(yh[i]);
            }
        }
        else
        {
            CHECK_CUDA(cudaMemcpy(y.data(), args.y, bdl * io_size, cudaMemcpyDeviceToHost));
        }
        double max_err = 0.0, max_ref = 1e-30;
        for (size_t i = 0; i < bdl; ++i)
        {
            double const err = std::fabs(y[i] - want[i]);
            max_err = std::isnan(err) ? INFINITY : std::fmax(max_err, err);
            max_ref = std::fmax(max_ref, std::fabs(want[i]));
        }
        *rel = max_err / std::fmax(1.0, max_ref);
        *ms = 0.0;
        if (!timing || iterations <= 0 || graph)
        {
            return;
        }
        for (int i = 0; i < 3; ++i)
        {
            CHECK_CUDA(qmamba::launch_selective_scan(args, stream));
        }
        CHECK_CUDA(cudaEventRecord(start, stream));
        for (int i = 0; i < iterations; ++i)
        {
            CHECK_CUDA(qmamba::launch_selective_scan(args, stream));
        }
        CHECK_CUDA(cudaEventRecord(stop, stream));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float total_ms = 0.f;
        CHECK_CUDA(cudaEventElapsedTime(&total_ms, start, stop));
        *ms = total_ms / iterations;
    };
    double rel_single = 0, ms_single = 0, rel = 0, ms = 0, rel_two = 0, ms_two = 0, rel_graph = 0, ms_graph = 0;
    run_mode(nullptr, qmamba::Strategy::kAuto, false, &rel_single, &ms_single);
    run_mode(workspace, qmamba::Strategy::kAuto, false, &rel, &ms);
    run_mode(workspace, qmamba::Strategy::kTwoPasses, false, &rel_two, &ms_two);
    run_mode(workspace, qmamba::Strategy::kAuto, true, &rel_graph, &ms_graph);
    qmamba::scan::Choice const choice = qmamba::scan::choose(d, softplus, info.sm_count, blocks_per_sm,
        info.fused_blocks_per_sm[half ? 1 : 0][d.state - 1]);
    double const bytes = 3.0 * bdl * io_size + 2.0 * bknl * io_size + (d.dim * (d.state + 2.0)) * sizeof(float);
    double const gbps = ms > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0;
    double const gbps_single = ms_single > 0 ? bytes / (ms_single * 1e-3) / 1e9 : 0.0;
    double const gbps_two = ms_two > 0 ? bytes / (ms_two * 1e-3) / 1e9 : 0.0;
    int device = 0;
    CHECK_CUDA(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
    if (peak <= 0.0)
    {
        peak = peak_bandwidth_gbps(device);
    }
    double const tolerance = half ? 1e-2 : 1e-5;
    std::printf("{\"gpu\": \"%s\", \"cc\": \"%d.%d\", \"sms\": %d, \"blocks_per_sm\": %d, "
                "\"fused_blocks_per_sm\": %d, \"B\": %d, \"D\": %d, \"K\": %d, \"L\": %d, \"N\": %d, \"io\": \"%s\", "
                "\"softplus\": %s, \"grow\": %s, \"positive_a\": %s, \"offset\": %d, \"segments\": %d, \"fused\": %s, "
                "\"max_rel_error\": %.3e, \"max_rel_error_two_passes\": %.3e, \"max_rel_error_one_pass\": %.3e, "
                "\"max_rel_error_graph\": %.3e, "
                "\"tolerance\": %.0e, \"ms\": %.4f, \"ms_two_passes\": %.4f, \"ms_one_pass\": %.4f, \"bytes\": %.0f, "
                "\"GBps\": %.1f, \"GBps_two_passes\": %.1f, \"GBps_one_pass\": %.1f, \"peak_GBps\": %.1f, "
                "\"fraction_of_peak\": %.3f, \"fraction_of_peak_two_passes\": %.3f, \"fraction_of_peak_one_pass\": %.3f}\n",
        prop.name, prop.major, prop.minor, prop.multiProcessorCount, blocks_per_sm,
        info.fused_blocks_per_sm[half ? 1 : 0][d.state - 1], d.batch, d.dim, d.groups, d.length, d.state,
        half ? "fp16" : "fp32", softplus ? "true" : "false", grow ? "true" : "false", positive_a ? "true" : "false",
        offset, choice.plan.segments, choice.fused ? "true" : "false", rel, rel_two, rel_single, rel_graph, tolerance, ms, ms_two,
        ms_single, bytes, gbps, gbps_two, gbps_single, peak, peak > 0 ? gbps / peak : 0.0,
        peak > 0 ? gbps_two / peak : 0.0, peak > 0 ? gbps_single / peak : 0.0);
    return rel <= tolerance && rel_two <= tolerance && rel_single <= tolerance && rel_graph <= tolerance ? 0 : 1;
}
