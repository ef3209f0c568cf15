// GPU check and benchmark of the SelectiveScan kernel (needs an NVIDIA GPU; compiled in CI).
//
//   kernel_check B D K L N [fp32|fp16] [iterations] [peak_GBps]
//
// 1. Random inputs (fixed seed) -> launch_selective_scan -> y, compared with a sequential
//    float64 run of the contract's recurrence on the CPU: prints the max |error| relative
//    to max |y|, and fails (exit 1) above 1e-5 (fp32 I/O) or 1e-2 (fp16 I/O). Both modes:
//    one pass (no workspace) and segmented (with a workspace; two passes when B * D blocks
//    are fewer than two per SM).
// 2. `iterations` timed launches per mode (CUDA events): mean ms per call, the bytes the kernel must
//    move at least (u, delta, y per channel; B, C once per group; A, D, bias), and the
//    effective bandwidth against the GPU's peak (from the device attributes, or
//    `peak_GBps` when given).
// Output: one JSON line, for tools/bench_scan_gpu.py.
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
std::vector<double> reference(qmamba::scan::Dims const& d, std::vector<float> const& u, std::vector<float> const& delta,
    std::vector<float> const& A, std::vector<float> const& B, std::vector<float> const& C,
    std::vector<float> const& Dskip, std::vector<float> const& bias)
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
                double const dt = z > 20.0 ? z : std::log1p(std::exp(z));
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

template <typename T>
T* upload(std::vector<float> const& host, bool half)
{
    void* dev = nullptr;
    size_t const bytes = host.size() * (half ? sizeof(__half) : sizeof(float));
    CHECK_CUDA(cudaMalloc(&dev, bytes));
    if (half)
    {
        std::vector<__half> h(host.size());
        for (size_t i = 0; i < host.size(); ++i)
        {
            h[i] = __float2half(host[i]);
        }
        CHECK_CUDA(cudaMemcpy(dev, h.data(), bytes, cudaMemcpyHostToDevice));
    }
    else
    {
        CHECK_CUDA(cudaMemcpy(dev, host.data(), bytes, cudaMemcpyHostToDevice));
    }
    return static_cast<T*>(dev);
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
    if (argc < 6)
    {
        std::fprintf(stderr, "usage: kernel_check B D K L N [fp32|fp16] [iterations] [peak_GBps]\n");
        return 2;
    }
    qmamba::scan::Dims const d{std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]),
        std::atoi(argv[5])};
    bool const half = argc > 6 && std::strcmp(argv[6], "fp16") == 0;
    int const iterations = argc > 7 ? std::atoi(argv[7]) : 20;
    double peak = argc > 8 ? std::atof(argv[8]) : 0.0;
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
    if (half)
    {
        round_to_half(u);
        round_to_half(delta);
        round_to_half(B);
        round_to_half(C);
    }

    qmamba::ScanArgs args{};
    args.dims = d;
    args.delta_softplus = true;
    args.io = half ? qmamba::IOType::kFLOAT16 : qmamba::IOType::kFLOAT32;
    args.u = upload<void>(u, half);
    args.delta = upload<void>(delta, half);
    args.B = upload<void>(B, half);
    args.C = upload<void>(C, half);
    args.A = upload<float>(A, false);
    args.D_skip = upload<float>(Dskip, false);
    args.delta_bias = upload<float>(bias, false);
    size_t const io_size = half ? sizeof(__half) : sizeof(float);
    CHECK_CUDA(cudaMalloc(&args.y, bdl * io_size));

    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    void* workspace = nullptr;
    CHECK_CUDA(cudaMalloc(&workspace, qmamba::scan::workspace_bytes(d)));
    std::vector<double> const want = reference(d, u, delta, A, B, C, Dskip, bias);
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));

    //! (max relative error, ms per call) of one mode.
    auto const run_mode = [&](void* ws, double* rel, double* ms) {
        args.workspace = ws;
        CHECK_CUDA(cudaMemset(args.y, 0, bdl * io_size));
        CHECK_CUDA(qmamba::launch_selective_scan(args, stream));
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
            max_err = std::fmax(max_err, std::fabs(y[i] - want[i]));
            max_ref = std::fmax(max_ref, std::fabs(want[i]));
        }
        *rel = max_err / std::fmax(1.0, max_ref);
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
    double rel_single = 0, ms_single = 0, rel = 0, ms = 0;
    run_mode(nullptr, &rel_single, &ms_single);
    run_mode(workspace, &rel, &ms);
    double const bytes = 3.0 * bdl * io_size + 2.0 * bknl * io_size + (d.dim * (d.state + 2.0)) * sizeof(float);
    double const gbps = bytes / (ms * 1e-3) / 1e9;
    int device = 0;
    CHECK_CUDA(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
    if (peak <= 0.0)
    {
        peak = peak_bandwidth_gbps(device);
    }
    double const tolerance = half ? 1e-2 : 1e-5;
    std::printf("{\"gpu\": \"%s\", \"cc\": \"%d.%d\", \"sms\": %d, \"B\": %d, \"D\": %d, \"K\": %d, \"L\": %d, "
                "\"N\": %d, \"io\": \"%s\", \"segments\": %d, \"max_rel_error\": %.3e, "
                "\"max_rel_error_one_pass\": %.3e, \"tolerance\": %.0e, \"ms\": %.4f, \"ms_one_pass\": %.4f, "
                "\"bytes\": %.0f, \"GBps\": %.1f, \"peak_GBps\": %.1f, \"fraction_of_peak\": %.3f}\n",
        prop.name, prop.major, prop.minor, prop.multiProcessorCount, d.batch, d.dim, d.groups, d.length, d.state,
        half ? "fp16" : "fp32", qmamba::scan::segments_for(d, prop.multiProcessorCount), rel, rel_single, tolerance, ms,
        ms_single, bytes, gbps, peak, peak > 0 ? gbps / peak : 0.0);
    return rel <= tolerance && rel_single <= tolerance ? 0 : 1;
}
