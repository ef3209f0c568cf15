/* The fake quantizers' training passes on a CPU: LSQ / LSQ+, DLS's element-wise part, RFA.
 *
 * Built at first use by qmamba_deploy/quant/fake_quant_cpu.py with the system C compiler, as the scan
 * kernel is (a plain shared library called through ctypes; no torch headers). Each quantizer's forward
 * is one pass and its backward one pass (DLS: two, the second adds the gradient of its live statistics),
 * where the torch compositions in quant/fused.py take 10-30 operator calls each.
 *
 * The forward values are bit-for-bit those of the torch definitions: the same IEEE operations in the
 * same order, which is why this file is compiled with -ffp-contract=off (no fused multiply-adds) and
 * without -ffast-math. Rounding is half to even, as torch.round (round_grid below).
 * The backward's sums run in float by vector lanes (OpenMP simd reductions, -fopenmp-simd: no runtime)
 * over chunks of CHUNK values, then in double (another order than torch's reductions: the gradients
 * agree to float rounding).
 *
 * Layout: x is float32, contiguous, seen as [outer, channels, inner]; alpha has one value per channel
 * (channels = 1: one per tensor).
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 1024 /* values summed in float (by vector lanes) before a sum moves to double */
#define MAX_ANCHORS 256 /* RFA's anchors: 2^bits, bits <= 8 */
#define RFA_CHUNK 256   /* values per chunk of RFA's passes (on the stack; the backward's scatter follows each) */

static inline float clamp_grid(float u, float qn, float qp) {
    float v = u < qn ? qn : u; /* torch.clamp(u, qn, qp): max, then min; NaN stays NaN */
    return v > qp ? qp : v;
}

/* Round half to even, for |v| < 2^22 (every value here is clamped to a grid of at most 8 bits): adding
 * 1.5 * 2^23 lands in the binade whose spacing is 1, so the sum rounds to an integer (ties to even) and
 * the subtraction is exact; the sign is put back so that -0.3 rounds to -0 as nearbyintf does. Plain
 * arithmetic and bit operations: no libm call, so the loops vectorise on any instruction set. NaN stays
 * NaN. */
static inline float round_grid(float v) {
    const float magic = 12582912.0f;
    return copysignf((fabsf(v) + magic) - magic, v);
}

/* ------------------------------------------------------------------------------------------- LSQ */

/* out = R(clamp((x + beta) / alpha_c, qn, qp)) * alpha_c - beta  (no beta: has_beta = 0) */
int qmamba_lsq_forward_f32(const float *x, const float *alpha, float beta, int has_beta, float qn, float qp,
                           int64_t outer, int64_t channels, int64_t inner, float *out) {
    for (int64_t o = 0; o < outer; o++)
        for (int64_t c = 0; c < channels; c++) {
            const float a = alpha[c];
            const int64_t base = (o * channels + c) * inner;
            const float *xs = x + base;
            float *os = out + base;
            if (has_beta) {
                for (int64_t j = 0; j < inner; j++) {
                    float r = round_grid(clamp_grid((xs[j] + beta) / a, qn, qp)) * a;
                    os[j] = r - beta;
                }
            } else {
                for (int64_t j = 0; j < inner; j++)
                    os[j] = round_grid(clamp_grid(xs[j] / a, qn, qp)) * a;
            }
        }
    return 0;
}

/* gx = [qn <= u <= qp] g;  galpha[c] = sum g (R(v) - [inside] u);  sums = (sum gx, sum g)
 * with u = (x + beta) / alpha_c, v = clamp(u) (the caller applies LSQ's gradient scale). */
int qmamba_lsq_backward_f32(const float *x, const float *g, const float *alpha, float beta, int has_beta,
                            float qn, float qp, int64_t outer, int64_t channels, int64_t inner, float *gx,
                            double *galpha, double *sums) {
    double s_gx = 0.0, s_g = 0.0;
    for (int64_t c = 0; c < channels; c++) galpha[c] = 0.0;
    const float b = has_beta ? beta : 0.0f;
    for (int64_t o = 0; o < outer; o++)
        for (int64_t c = 0; c < channels; c++) {
            const float a = alpha[c];
            const int64_t base = (o * channels + c) * inner;
            const float *xs = x + base, *gs = g + base;
            float *gxs = gx + base;
            double acc_a = 0.0;
            for (int64_t j0 = 0; j0 < inner; j0 += CHUNK) {
                const int64_t j1 = j0 + CHUNK < inner ? j0 + CHUNK : inner;
                float fa = 0.0f, fgx = 0.0f, fg = 0.0f;
#pragma omp simd reduction(+ : fa, fgx, fg)
                for (int64_t j = j0; j < j1; j++) {
                    float u = (xs[j] + b) / a; /* b = 0 without beta: only the sign of a zero u differs */
                    float v = clamp_grid(u, qn, qp), q = round_grid(v);
                    int inside = v == u;
                    float ge = gs[j], gxe = inside ? ge : 0.0f;
                    float d = q - u;
                    gxs[j] = gxe;
                    fa += ge * (inside ? d : q);
                    fgx += gxe;
                    fg += ge;
                }
                acc_a += fa;
                s_gx += fgx;
                s_g += fg;
            }
            galpha[c] += acc_a;
        }
    sums[0] = s_gx;
    sums[1] = s_g;
    return 0;
}

/* ------------------------------------------------------------------------------------------- DLS */

/* out = min(max(R(clamp((x + beta) / alpha, qn, qp)) * alpha - beta, lo), hi), one alpha and beta per
 * tensor (DLS's live statistics, computed by the caller). */
int qmamba_dls_forward_f32(const float *x, int64_t n, float beta, float alpha, float qn, float qp, float lo,
                           float hi, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float o0 = round_grid(clamp_grid((x[i] + beta) / alpha, qn, qp)) * alpha;
        o0 = o0 - beta;
        float t = o0 < lo ? lo : o0; /* torch.maximum(o0, lo) */
        out[i] = t > hi ? hi : t;    /* torch.minimum(t, hi) */
    }
    return 0;
}

/* The element-wise part of DLS's backward. The output's two clamps pass g to min(x) / max(x) where the
 * value lies beyond (half at a tie); the grid clamp passes the rest where it is inside. gx gets that
 * part; sums (in this order) receive
 *   0 sum g0 q   1 sum gx u   2 sum gx   3 sum g0   4 sum (to min x)   5 sum (to max x)
 *   6 #(xb == min_b)   7 #(xb == max_b)   8 #(x == min_x)   9 #(x == max_x)   10 sum (xb - mean_b)
 * with xb = x + beta, u = xb / alpha, g0 the gradient past the output clamps. */
int qmamba_dls_backward1_f32(const float *x, const float *g, int64_t n, float beta, float alpha, float qn,
                             float qp, float x_min, float x_max, float min_b, float max_b, float mean_b,
                             float *gx, double *sums) {
    double acc[11] = {0};
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        float f0 = 0.0f, f1 = 0.0f, f2 = 0.0f, f3 = 0.0f, f4 = 0.0f, f5 = 0.0f, f6 = 0.0f, f7 = 0.0f, f8 = 0.0f,
              f9 = 0.0f, f10 = 0.0f;
#pragma omp simd reduction(+ : f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10)
        for (int64_t i = i0; i < i1; i++) {
            float xe = x[i], xb = xe + beta, u = xb / alpha;
            float v = clamp_grid(u, qn, qp), q = round_grid(v);
            float o0 = q * alpha;
            o0 = o0 - beta;
            float t = o0 < x_min ? x_min : o0;
            float ge = g[i];
            float half_g = ge * 0.5f;
            float to_max = t > x_max ? ge : (t == x_max ? half_g : 0.0f);
            float g1 = ge - to_max;
            float half_g1 = g1 * 0.5f;
            float to_min = o0 < x_min ? g1 : (o0 == x_min ? half_g1 : 0.0f);
            float g0 = g1 - to_min;
            float gxe = v == u ? g0 : 0.0f;
            gx[i] = gxe;
            f0 += g0 * q;
            f1 += gxe * u;
            f2 += gxe;
            f3 += g0;
            f4 += to_min;
            f5 += to_max;
            f6 += xb == min_b ? 1.0f : 0.0f;
            f7 += xb == max_b ? 1.0f : 0.0f;
            f8 += xe == x_min ? 1.0f : 0.0f;
            f9 += xe == x_max ? 1.0f : 0.0f;
            f10 += xb - mean_b;
        }
        const float f[11] = {f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10};
        for (int k = 0; k < 11; k++) acc[k] += f[k];
    }
    for (int k = 0; k < 11; k++) sums[k] = acc[k];
    return 0;
}

/* gx += the gradient through DLS's statistics, given their coefficients (the caller derives them from
 * the first pass's sums): coef = (to each element equal to min(x + beta), to max(x + beta), slope of
 * std(x + beta) on (xb - mean_b), the means' constant, slope of std(x) on (x - mean_x), to each element
 * equal to min(x), to max(x)). */
int qmamba_dls_backward2_f32(const float *x, int64_t n, float beta, float mean_b, float min_b, float max_b,
                             float mean_x, float x_min, float x_max, const float *coef, float *gx) {
    const float c_minb = coef[0], c_maxb = coef[1], k_b = coef[2], cst = coef[3], k_x = coef[4],
                c_minx = coef[5], c_maxx = coef[6];
    for (int64_t i = 0; i < n; i++) {
        float xe = x[i], xb = xe + beta;
        float add = (xb == min_b ? c_minb : 0.0f) + (xb == max_b ? c_maxb : 0.0f);
        add += k_b * (xb - mean_b) + cst + k_x * (xe - mean_x);
        add += (xe == x_min ? c_minx : 0.0f) + (xe == x_max ? c_maxx : 0.0f);
        gx[i] += add;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------- RFA */

/* idx[j] = the largest i with v[j] > edges[i - 1] (0 if none): the number of edges below v while they are
 * in order, the literal rule once training has crossed them (quantizers._count_below). Edges in the outer
 * loop, so that the loop over values vectorises. */
static void count_below(const float *v, int64_t m, const float *edges, int64_t n_edges, int *idx) {
    for (int64_t j = 0; j < m; j++) idx[j] = 0;
    for (int64_t e = 0; e < n_edges; e++) {
        const float edge = edges[e];
        const int next = (int)e + 1;
        for (int64_t j = 0; j < m; j++) idx[j] = v[j] > edge ? next : idx[j];
    }
}

/* out = level * alpha_c - beta, level = (count_below(v, thresholds) - half) for v = clamp((x + beta) /
 * alpha_c, qn, qp): the levels -half ... half - 1 picked by the anchors' midpoints. */
int qmamba_rfa_forward_f32(const float *x, const float *alpha, float beta, const float *thr, int64_t n_thr,
                           float half, float qn, float qp, int64_t outer, int64_t channels, int64_t inner,
                           float *out) {
    float v[RFA_CHUNK];
    int idx[RFA_CHUNK];
    for (int64_t o = 0; o < outer; o++)
        for (int64_t c = 0; c < channels; c++) {
            const float a = alpha[c];
            const int64_t base = (o * channels + c) * inner;
            for (int64_t j0 = 0; j0 < inner; j0 += RFA_CHUNK) {
                const int64_t m = j0 + RFA_CHUNK < inner ? RFA_CHUNK : inner - j0;
                const float *xs = x + base + j0;
                float *os = out + base + j0;
                for (int64_t j = 0; j < m; j++) v[j] = clamp_grid((xs[j] + beta) / a, qn, qp);
                count_below(v, m, thr, n_thr, idx);
                for (int64_t j = 0; j < m; j++) {
                    float r = ((float)idx[j] - half) * a;
                    os[j] = r - beta;
                }
            }
        }
    return 0;
}

/* RFA's backward through its piecewise-linear surrogate: cell k = count_below(v, anchors) (0 below the
 * first anchor, n above the last), slope[k] = outer_slope, 1 / (a[k] - a[k-1]), outer_slope;
 * gx = [inside] g alpha slope[k] / alpha;  galpha[c] = sum g level - gx u;  ga the anchors' gradient;
 * sums = (sum gx, sum g). Returns 1 when there are more anchors than MAX_ANCHORS. */
int qmamba_rfa_backward_f32(const float *x, const float *g, const float *alpha, float beta, const float *thr,
                            int64_t n_thr, const float *anchors, int64_t n_anchors,
                            float half, float qn, float qp, float outer_slope, int64_t outer, int64_t channels,
                            int64_t inner, float *gx, double *galpha, float *ga, double *sums) {
    if (n_anchors > MAX_ANCHORS || n_anchors < 2) return 1;
    float slope[MAX_ANCHORS + 1];
    slope[0] = slope[n_anchors] = outer_slope;
    for (int64_t k = 1; k < n_anchors; k++) slope[k] = 1.0f / (anchors[k] - anchors[k - 1]);
    double s0[MAX_ANCHORS + 1] = {0}, s1[MAX_ANCHORS + 1] = {0};
    double s_gx = 0.0, s_g = 0.0;
    for (int64_t c = 0; c < channels; c++) galpha[c] = 0.0;
    for (int64_t o = 0; o < outer; o++)
        for (int64_t c = 0; c < channels; c++) {
            const float a = alpha[c];
            const int64_t base = (o * channels + c) * inner;
            double acc_a = 0.0;
            for (int64_t j0 = 0; j0 < inner; j0 += RFA_CHUNK) {
                const int64_t m = j0 + RFA_CHUNK < inner ? RFA_CHUNK : inner - j0;
                const float *xs = x + base + j0, *gs = g + base + j0;
                float *gxs = gx + base + j0;
                int lvl[RFA_CHUNK], cell[RFA_CHUNK];
                float us[RFA_CHUNK], vs[RFA_CHUNK], gls[RFA_CHUNK];
                for (int64_t j = 0; j < m; j++) {
                    us[j] = (xs[j] + beta) / a;
                    vs[j] = clamp_grid(us[j], qn, qp);
                }
                count_below(vs, m, thr, n_thr, lvl);
                count_below(vs, m, anchors, n_anchors, cell);
                float fa = 0.0f, fgx = 0.0f, fg = 0.0f;
#pragma omp simd reduction(+ : fa, fgx, fg)
                for (int64_t j = 0; j < m; j++) {
                    float u = us[j], v = vs[j];
                    float level = (float)lvl[j] - half;
                    float ge = gs[j];
                    float gl = ge * a;
                    float gv = gl * slope[cell[j]];
                    float gxe = (v == u ? gv : 0.0f) / a;
                    gxs[j] = gxe;
                    fa += ge * level - gxe * u;
                    fgx += gxe;
                    fg += ge;
                    gls[j] = gl;
                }
                for (int64_t j = 0; j < m; j++) { /* the per-cell sums: a scatter, not vectorised */
                    s0[cell[j]] += (double)gls[j];
                    s1[cell[j]] += (double)(gls[j] * vs[j]);
                }
                acc_a += fa;
                s_gx += fgx;
                s_g += fg;
            }
            galpha[c] += acc_a;
        }
    /* cell i (k = i + 1) lies between a[i] and a[i+1]: the surrogate there is L_i + (v - a[i]) / d, d = a[i+1] - a[i] */
    double gad[MAX_ANCHORS] = {0};
    for (int64_t i = 0; i + 1 < n_anchors; i++) {
        double d = (double)anchors[i + 1] - (double)anchors[i];
        double d2 = d * d;
        gad[i] += (s1[i + 1] - (double)anchors[i + 1] * s0[i + 1]) / d2;
        gad[i + 1] += ((double)anchors[i] * s0[i + 1] - s1[i + 1]) / d2;
    }
    gad[0] -= (double)outer_slope * s0[0];
    gad[n_anchors - 1] -= (double)outer_slope * s0[n_anchors];
    for (int64_t i = 0; i < n_anchors; i++) ga[i] = (float)gad[i];
    sums[0] = s_gx;
    sums[1] = s_g;
    return 0;
}
