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
    //! launcher may cut each sequence into segments (two passes) when B * D blocks would
    //! leave SMs idle; without one it runs a single pass.
    void* workspace;
};

//! Enqueues the scan on `stream`. cudaErrorInvalidValue for dims check_dims() rejects.
cudaError_t launch_selective_scan(ScanArgs const& args, cudaStream_t stream);

} // namespace qmamba
