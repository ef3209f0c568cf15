#!/usr/bin/env bash
# The selective-scan kernel on an NVIDIA GPU, in one prepared run (< 5 minutes on an H100/H200):
#
#   bash tools/gpu_kernel_check.sh OUT_DIR
#
# 1. builds trt_plugins/selective_scan/tests/kernel_check.cu with the kernel for this GPU
#    (nvcc -arch=native; KERNEL_CHECK=/path/to/kernel_check uses a prebuilt one instead);
# 2. checks it against the float64 recurrence and times it, in three modes each time (one pass
#    without a workspace; with the workspace, the launcher's choice: two passes or, at batch 1
#    where every block fits the GPU, the fused mode; two passes forced; and the launcher's choice
#    captured into a CUDA graph, as TensorRT may run it), on the released
#    models' scan shapes (MambaIRv2-light D = 48, K = 1, N = 8 and MambaIR-light D = 288, K = 4,
#    N = 10 at 64x64 .. 256x256 inputs; a 16-state shape), fp32 and fp16, and on the edge cases
#    (misaligned base pointers, odd L, softplus off, growing maps, A > 0 with softplus);
# 3. runs compute-sanitizer memcheck, racecheck and synccheck on small shapes (every mode, the
#    fused one included, fp32 and fp16, growing maps, A > 0, misaligned pointers);
# 4. writes OUT_DIR/summary.json (every run: command, exit code, kernel_check's JSON line) and
#    OUT_DIR/summary.md (the table: error vs tolerance, ms, GB/s, fraction of peak bandwidth),
#    with the raw logs in OUT_DIR/logs/.
#
# Exit status: 0 when every check passed; 1 when a check failed (wrong result, sanitizer
# error); 2 when it cannot run (no GPU, no nvcc, no compute-sanitizer). SANITIZE=0 skips step 3
# (reported in the summary, exit 0 still requires the rest). ITERATIONS (default 50) sets the
# timed launches per mode.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash tools/gpu_kernel_check.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PLUGIN=$ROOT/trt_plugins/selective_scan
ITERATIONS=${ITERATIONS:-50}
SANITIZE=${SANITIZE:-1}
mkdir -p "$OUT/logs" || exit 2
RESULTS=$OUT/logs/results.jsonl
: > "$RESULTS"

die() { # code message
    echo "gpu_kernel_check: $2" >&2
    printf '{"status": "error", "exit": %d, "reason": "%s"}\n' "$1" "$2" > "$OUT/summary.json"
    printf '# GPU kernel check\n\n**Could not run:** %s\n' "$2" > "$OUT/summary.md"
    exit "$1"
}

# --- the GPU -----------------------------------------------------------------------------------
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > "$OUT/logs/gpu.txt" 2>&1; then
    die 2 "no NVIDIA GPU visible (nvidia-smi -L failed): this check needs one"
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
    >> "$OUT/logs/gpu.txt" 2>&1

# --- the binary --------------------------------------------------------------------------------
CUDA_BIN=""
if command -v nvcc > /dev/null 2>&1; then
    CUDA_BIN=$(dirname "$(command -v nvcc)")
elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    CUDA_BIN=$CUDA_HOME/bin
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_BIN=/usr/local/cuda/bin
fi
EXE=${KERNEL_CHECK:-}
if [[ -z "$EXE" ]]; then
    [[ -n "$CUDA_BIN" ]] || die 2 "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): set KERNEL_CHECK to a prebuilt kernel_check"
    EXE=$OUT/kernel_check
    echo "building kernel_check (nvcc -arch=native) ..."
    if ! "$CUDA_BIN/nvcc" -std=c++17 -O3 -lineinfo -arch=native -Xptxas -v -I"$PLUGIN/include" \
        "$PLUGIN/src/selective_scan_kernel.cu" "$PLUGIN/tests/kernel_check.cu" -o "$EXE" \
        > "$OUT/logs/nvcc.txt" 2>&1; then
        tail -20 "$OUT/logs/nvcc.txt" >&2
        die 2 "nvcc failed (log: $OUT/logs/nvcc.txt)"
    fi
fi
[[ -x "$EXE" ]] || die 2 "kernel_check not found or not executable: $EXE"

FAILED=0
# run NAME KIND ARGS... : one kernel_check run; its JSON line goes to results.jsonl.
run() {
    local name=$1 kind=$2
    shift 2
    local log=$OUT/logs/$name.txt
    "$@" > "$log" 2>&1
    local rc=$?
    local line
    line=$(grep '^{' "$log" | tail -1)
    [[ -n "$line" ]] || line=null
    printf '{"name": "%s", "kind": "%s", "rc": %d, "command": "%s", "result": %s}\n' \
        "$name" "$kind" "$rc" "$*" "$line" >> "$RESULTS"
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        echo "FAILED ($rc): $name: $*" >&2
        tail -5 "$log" >&2
    else
        echo "ok: $name"
    fi
}

# --- correctness and speed (the three modes in every run) ---------------------------------------
for io in fp32 fp16; do
    for side in 64 128 256; do
        L=$((side * side))
        run "v2light_${side}_${io}" timing "$EXE" 1 48 1 $L 8 $io "$ITERATIONS"
        run "v1light_${side}_${io}" timing "$EXE" 1 288 4 $L 10 $io "$ITERATIONS"
    done
    run "v2light_b8_128_${io}" timing "$EXE" 8 48 1 16384 8 $io "$ITERATIONS"
    run "v2s_128_${io}" timing "$EXE" 1 264 1 16384 16 $io "$ITERATIONS"
done
run edge_offset1_fp32 edge "$EXE" 2 24 2 5001 8 fp32 3 0 --offset 1
run edge_offset3_fp16 edge "$EXE" 1 20 2 4099 10 fp16 3 0 --offset 3
run edge_oddL_fp32 edge "$EXE" 1 12 1 777 16 fp32 3
run edge_nosoftplus_fp32 edge "$EXE" 1 16 2 3000 4 fp32 3 0 --no-softplus
run edge_grow_fp32 edge "$EXE" 1 16 1 3000 4 fp32 3 0 --grow
run edge_grow_fp16 edge "$EXE" 1 8 1 2000 8 fp16 3 0 --grow
run edge_positive_a_fp32 edge "$EXE" 1 16 1 3000 8 fp32 3 0 --positive-a
run edge_tiny edge "$EXE" 1 1 1 1 1 fp32 3

# --- compute-sanitizer ----------------------------------------------------------------------------
SANITIZER=""
if [[ "$SANITIZE" != "0" ]]; then
    if command -v compute-sanitizer > /dev/null 2>&1; then
        SANITIZER=$(command -v compute-sanitizer)
    elif [[ -n "$CUDA_BIN" && -x "$CUDA_BIN/compute-sanitizer" ]]; then
        SANITIZER=$CUDA_BIN/compute-sanitizer
    else
        die 2 "compute-sanitizer not found (PATH or beside nvcc); SANITIZE=0 skips it"
    fi
    # Small shapes: racecheck is slow. Each run does the three modes (2 groups x 1 block, 3 tiles:
    # the launcher fuses the first two with softplus on).
    for tool in memcheck racecheck synccheck; do
        extra=()
        [[ $tool == racecheck ]] && extra=(--racecheck-report all)
        run "sanitize_${tool}_fp32" sanitizer "$SANITIZER" --tool $tool --error-exitcode 1 ${extra[@]+"${extra[@]}"} \
            "$EXE" 1 12 2 700 4 fp32 0 0 --no-timing
        run "sanitize_${tool}_fp16_offset" sanitizer "$SANITIZER" --tool $tool --error-exitcode 1 ${extra[@]+"${extra[@]}"} \
            "$EXE" 1 20 2 555 8 fp16 0 0 --offset 1 --no-timing
        run "sanitize_${tool}_grow" sanitizer "$SANITIZER" --tool $tool --error-exitcode 1 ${extra[@]+"${extra[@]}"} \
            "$EXE" 1 9 1 900 16 fp32 0 0 --grow --no-timing
        run "sanitize_${tool}_positive_a" sanitizer "$SANITIZER" --tool $tool --error-exitcode 1 ${extra[@]+"${extra[@]}"} \
            "$EXE" 1 16 1 700 8 fp32 0 0 --positive-a --no-timing
    done
fi

# --- summary ---------------------------------------------------------------------------------------
python3 - "$OUT" "$RESULTS" "$FAILED" "$SANITIZE" <<'EOF'
import json, sys
from pathlib import Path

out, results, failed, sanitize = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] != "0"
runs = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
gpu = (out / "logs" / "gpu.txt").read_text().strip()
summary = {"status": "failed" if failed else "passed", "gpu": gpu, "sanitizers": sanitize, "runs": runs}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

lines = ["# GPU kernel check", "", "```", gpu, "```", "",
         f"**{'FAILED' if failed else 'passed'}**: {sum(r['rc'] == 0 for r in runs)} of {len(runs)} runs"
         + ("" if sanitize else " (sanitizers skipped: SANITIZE=0)"), "",
         "| run | rc | B | D | K | L | N | I/O | launcher's choice | max rel. error (choice / 2 passes / 1 pass / graph) | "
         "tolerance | ms (choice / 2 passes / 1 pass) | GB/s (choice) | fraction of peak (choice / 2 passes / 1 pass) |",
         "|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|---:|---|"]
for r in runs:
    j = r["result"] or {}
    if not j:
        lines.append(f"| {r['name']} | {r['rc']} | | | | | | | | (no result: see logs/{r['name']}.txt) | | | | |")
        continue
    choice = f"fused, {j['segments']} tiles" if j["fused"] else f"{j['segments']} segment(s)"
    lines.append(
        f"| {r['name']} | {r['rc']} | {j['B']} | {j['D']} | {j['K']} | {j['L']} | {j['N']} | {j['io']} | {choice} | "
        f"{j['max_rel_error']:.2e} / {j['max_rel_error_two_passes']:.2e} / {j['max_rel_error_one_pass']:.2e} / "
        f"{j['max_rel_error_graph']:.2e} | "
        f"{j['tolerance']:.0e} | {j['ms']:.4f} / {j['ms_two_passes']:.4f} / {j['ms_one_pass']:.4f} | {j['GBps']:.0f} | "
        f"{j['fraction_of_peak']:.3f} / {j['fraction_of_peak_two_passes']:.3f} / {j['fraction_of_peak_one_pass']:.3f} |")
lines += ["", "Bytes counted: the op's minimum (u, delta, y per channel; B, C once per group; A, D, bias).",
          "Peak: from the device attributes (memory clock x bus width x 2)."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
[[ $FAILED -eq 0 ]] || exit 1
exit 0
