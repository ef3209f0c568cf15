// Launch API of the SelectiveScan CUDA kernel (used by the TensorRT plugin).
#pragma once

#include <cuda_runtime_api.h>

#include "qmamba/scan_math.h"

namespace qmamba {

//! Element type of u, delta, B, C and y. A, D_skip and delta_bias are always float32.
enum class IOType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

//! How the launcher may run a call with a workspace (for tests and benchmarks; the plugin leaves
//! kAuto).
enum class Strategy : int32_t
{
    kAuto = 0,      //!< one pass, two passes or the fused mode, whichever the cost model prefers
    kTwoPasses = 1, //!< never the fused mode
};

//! One call of the op. D_skip and delta_bias may be null (treated as zeros).
struct ScanArgs
{
    scan::Dims dims;
    bool delta_softplus;
    IOType io;
    void const* u;          //!< [B, D, L]
    void const* delta;      //!< [B, D, L]
    float const* A;         //!< [D, N]
    void const* B;          //!< [B, K, N, L]
    void const* C;          //!< [B, K, N, L]
    float const* D_skip;    //!< [D] or null
    float const* delta_bias;//!< [D] or null
    void* y;                //!< [B, D, L]
    //! scan::workspace_bytes(dims) bytes of device memory, or null. With a workspace the
    //! launcher may cut each sequence into segments (two passes) when one pass would leave
    //! SMs idle; without one it runs a single pass.
    void* workspace;
    //! The GPU's SM count and the kernels' resident blocks per SM for (io, N), as
    //! describe_device() reports them. sm_count or blocks_per_sm 0: the launcher asks the CUDA
    //! runtime itself (device attributes and occupancy queries per call; the plugin caches them in
    //! attachToContext). fused_blocks_per_sm 0: no fused mode.
    int32_t sm_count;
    int32_t blocks_per_sm;
    int32_t fused_blocks_per_sm;
    Strategy strategy;
};

//! What the launcher needs to know of the current GPU, queried once.
struct DeviceInfo
{
    int32_t sm_count;
    //! Resident blocks per SM of the scan kernel, [io][N - 1] (cudaOccupancyMaxActiveBlocksPerMultiprocessor).
    int32_t blocks_per_sm[2][scan::kMaxState];
    //! The same for the fused mode's kernel; 0 where there is none (N > kMaxFusedState) or the GPU
    //! has no cooperative launch.
    int32_t fused_blocks_per_sm[2][scan::kMaxState];
};

//! Fills `info` for the current device.
cudaError_t describe_device(DeviceInfo* info);

//! Enqueues the scan on `stream`. cudaErrorInvalidValue for dims check_dims() rejects.
cudaError_t launch_selective_scan(ScanArgs const& args, cudaStream_t stream);

} // namespace qmamba
