/* The selective scan's forward on a CPU, one pass over time with the state in registers.
 *
 * Built at first use by qmamba_deploy/ops/scan_cpu.py with the system C compiler (no torch headers,
 * no Python API: a plain shared library called through ctypes, which releases the GIL so that the
 * caller's threads run disjoint channel blocks side by side). Same math as selective_scan_ref:
 *
 *     h[t, n] = exp(dt[t] A[c, n]) h[t-1, n] + dt[t] u[t] B[k, t, n],   y[t] = sum_n C[k, t, n] h[t, n] + D[c] u[t]
 *
 * with dt already formed by the caller (softplus(delta + bias) in torch, so that its rounding is
 * torch's). Layouts, float32, contiguous: the forward takes the op's own (channel-major) layout and
 * gathers tiles of it into time-major scratch so that a step reads LANES neighbouring channels in one
 * vector; the backward takes time-major copies:
 *
 *     forward    dt, u, y   [batch, dim, length]        Bm, Cm   [batch, groups, nstate, length]
 *     backward   dt, u, gy, g_u, g_dt   [batch, length, dim]    Bm, Cm   [batch, groups, length, nstate]
 *     both       A   [dim, nstate]       Dskip   [dim]
 *
 * Channels go in blocks of LANES; the loops over a block are fixed-length so that the compiler
 * vectorises them (one vector: LANES = 16 with AVX-512, 8 otherwise), the exponential included
 * (exp_nonpos below: no libm call in the loop). The state of a block is nstate x LANES floats (<= 256).
 */
#include <stdint.h>
#include <string.h>

/* Channels per block: one vector register per state index (16 with AVX-512, 8 with AVX2 and others). */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define MAX_STATE 16
#define TILE 64

/* exp(x) for x <= 0 (a decay exponent dt * A), to about 1 ulp: x = k ln2 + r, |r| <= ln2 / 2, e^r by a
 * degree-6 polynomial (the minimax coefficients of the classic single-precision expf), 2^k through the
 * exponent bits. Below -87 the result is clamped at exp(-87) ~ 1.6e-38 (a decay that kills the state
 * either way); NaN stays NaN. Written without branches so that the loop around it vectorises. */
static inline float exp_nonpos(float x) {
    const float lo = -87.0f;
    float xc = x < lo ? lo : x;
    /* round(xc / ln2) by the 1.5 * 2^23 trick (exact for |value| < 2^22; no -ffast-math, so it stays) */
    const float magic = 12582912.0f;
    float kf = (xc * 1.44269504088896341f + magic) - magic;
    float r = xc - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)kf * (1 << 23);
    float out;
    memcpy(&out, &bits, sizeof out);
    return x != x ? x : out;
}

/* dst[0, w) = src[0, w); a full block (w = LANES, every block but a group's last) is one fixed-size copy
 * the compiler turns into a vector load, where a memcpy of a runtime length would be a library call. */
static inline void copy_lanes(float *dst, const float *src, int64_t w) {
    if (w == LANES) {
        for (int l = 0; l < LANES; l++) dst[l] = src[l];
    } else {
        for (int64_t l = 0; l < w; l++) dst[l] = src[l];
    }
}

/* A block's A rows (a[n][l] = A[c0 + l, n]) and skip weights; lanes past the block (l >= w) and states
 * past nstate are 0. */
static void block_params(float a[MAX_STATE][LANES], float dsk[LANES], const float *A, const float *Dskip,
                         int64_t nstate, int64_t c0, int64_t w) {
    for (int64_t n = 0; n < MAX_STATE; n++)
        for (int l = 0; l < LANES; l++) a[n][l] = (n < nstate && l < w) ? A[(c0 + l) * nstate + n] : 0.0f;
    for (int l = 0; l < LANES; l++) dsk[l] = l < w ? Dskip[c0 + l] : 0.0f;
}

/* The work grid: item = (batch row b, group g, block of LANES channels in the group); a group's last
 * block may be short. Every block's channels share the group's B and C rows. */
typedef struct {
    int64_t row, state_row;  /* offsets of batch row b in dt, u, y (length x dim each) and of (b, g) in B / C */
    int64_t c0, c1;          /* the block's channels */
} Block;

static int64_t blocks_per_group(int64_t dim, int64_t groups) {
    return (dim / groups + LANES - 1) / LANES;
}

static Block block_of(int64_t item, int64_t dim, int64_t groups, int64_t length, int64_t nstate) {
    const int64_t per_group = dim / groups, per_row = groups * blocks_per_group(dim, groups);
    const int64_t b = item / per_row, g = (item % per_row) / blocks_per_group(dim, groups);
    const int64_t c0 = g * per_group + (item % per_row) % blocks_per_group(dim, groups) * LANES;
    const int64_t end = (g + 1) * per_group;
    Block k = {b * length * dim, (b * groups + g) * length * nstate, c0, c0 + LANES < end ? c0 + LANES : end};
    return k;
}

/* LANES as this build set it (the caller shapes the backward's per-block outputs with it). */
int qmamba_scan_lanes(void) { return LANES; }

static int valid_sizes(int64_t dim, int64_t groups, int64_t nstate) {
    return nstate >= 1 && nstate <= MAX_STATE && groups >= 1 && dim % groups == 0;
}

/* One time step of a block: the states h advance by (dt, u, B_t) and acc = D u + sum_n C_t[n] h[n]. */
static inline void scan_step(float h[MAX_STATE][LANES], const float a[MAX_STATE][LANES], const float dsk[LANES],
                             const float dtv[LANES], const float uv[LANES], const float *bt, const float *ct,
                             int64_t nstate, float acc[LANES]) {
    float du[LANES];
    for (int l = 0; l < LANES; l++) {
        du[l] = dtv[l] * uv[l];
        acc[l] = dsk[l] * uv[l];
    }
    for (int64_t n = 0; n < nstate; n++) {
        const float bn = bt[n], cn = ct[n];
        for (int l = 0; l < LANES; l++) {
            h[n][l] = exp_nonpos(dtv[l] * a[n][l]) * h[n][l] + du[l] * bn;
            acc[l] += h[n][l] * cn;
        }
    }
}

/* Channels [c0, c1) of batch row b (c1 - c0 <= LANES, all in one group), in the op's own channel-major
 * layout: dt, u, y point at row b of [batch, dim, length], Bm, Cm at (b, g) of [batch, groups, nstate,
 * length]. Time goes in tiles of TILE steps: each tile's operands are gathered into time-major scratch
 * (LANES rows of TILE contiguous floats each, read once), scanned, and y scattered back the same way, so
 * that the caller needs no transposed copies. */
static void scan_block(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm,
                       const float *Dskip, float *y, int64_t length, int64_t nstate, int64_t c0, int64_t c1) {
    float a[MAX_STATE][LANES], h[MAX_STATE][LANES] = {{0}}, dsk[LANES];
    const int64_t w = c1 - c0;
    block_params(a, dsk, A, Dskip, nstate, c0, w);
    /* lanes past the block's end stay 0 (their dt = 0: a decay of 1 and no input, never stored) */
    float dts[TILE][LANES] = {{0}}, us[TILE][LANES] = {{0}}, ys[TILE][LANES], bs[TILE][MAX_STATE],
          cs[TILE][MAX_STATE];
    for (int64_t t0 = 0; t0 < length; t0 += TILE) {
        const int64_t span = length - t0 < TILE ? length - t0 : TILE;
        for (int64_t l = 0; l < w; l++) {
            const float *dr = dt + (c0 + l) * length + t0, *ur = u + (c0 + l) * length + t0;
            for (int64_t i = 0; i < span; i++) {
                dts[i][l] = dr[i];
                us[i][l] = ur[i];
            }
        }
        for (int64_t n = 0; n < nstate; n++) {
            const float *br = Bm + n * length + t0, *cr = Cm + n * length + t0;
            for (int64_t i = 0; i < span; i++) {
                bs[i][n] = br[i];
                cs[i][n] = cr[i];
            }
        }
        for (int64_t i = 0; i < span; i++) scan_step(h, a, dsk, dts[i], us[i], bs[i], cs[i], nstate, ys[i]);
        for (int64_t l = 0; l < w; l++) {
            float *yr = y + (c0 + l) * length + t0;
            for (int64_t i = 0; i < span; i++) yr[i] = ys[i][l];
        }
    }
}

/* Work items [item0, item1) of the (batch x channel block) grid; returns 0, or -1 for a state size
 * the kernel does not hold (the caller checks first). Channel-major layouts (scan_block). */
int qmamba_scan_forward_f32(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm,
                            const float *Dskip, float *y, int64_t batch, int64_t dim, int64_t groups,
                            int64_t length, int64_t nstate, int64_t item0, int64_t item1) {
    if (!valid_sizes(dim, groups, nstate)) return -1;
    const int64_t items = batch * groups * blocks_per_group(dim, groups);
    for (int64_t item = item0; item < item1 && item < items; item++) {
        const Block k = block_of(item, dim, groups, length, nstate);
        scan_block(dt + k.row, u + k.row, A, Bm + k.state_row, Cm + k.state_row, Dskip, y + k.row, length,
                   nstate, k.c0, k.c1);
    }
    return 0;
}

/* The gradient of one block (channels [c0, c1) of batch row b). The forward runs again and keeps every
 * state in `hs` (length x nstate x LANES floats, the caller's scratch); then the adjoint runs backwards:
 *
 *     lam[t] = C_t gy_t + a_{t+1} lam[t+1]        q[t] = lam[t] h[t-1] a_t        s[t] = sum_n lam[t, n] B_t[n]
 *     g_u = dt s + D gy    g_dt = sum_n q A + u s    g_A += q dt    g_D += gy u
 *     g_B[t, n] += sum_c lam dt u                  g_C[t, n] += sum_c gy h
 *
 * g_u, g_dt: [batch, length, dim] (this block's channels); g_A: [LANES][nstate] and g_D: [LANES] of this
 * item; g_B, g_C: [length][nstate] of this item (the caller sums the items of a group). */
static void scan_block_backward(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm,
                                const float *Dskip, const float *gy, float *hs, float *g_u, float *g_dt,
                                float *g_A, float *g_B, float *g_C, float *g_D, int64_t length, int64_t dim,
                                int64_t nstate, int64_t c0, int64_t c1) {
    float a[MAX_STATE][LANES], h[MAX_STATE][LANES] = {{0}}, lam[MAX_STATE][LANES] = {{0}};
    float anext[MAX_STATE][LANES] = {{0}}, ga[MAX_STATE][LANES] = {{0}}, dsk[LANES], gd[LANES] = {0};
    const int64_t w = c1 - c0;
    block_params(a, dsk, A, Dskip, nstate, c0, w);
    float dtv[LANES] = {0}, uv[LANES] = {0}, gyv[LANES] = {0};
    for (int64_t t = 0; t < length; t++) {               /* forward again, keeping the states */
        float du[LANES];
        const float *bt = Bm + t * nstate;
        float *ht = hs + t * nstate * LANES;
        copy_lanes(dtv, dt + t * dim + c0, w);
        copy_lanes(uv, u + t * dim + c0, w);
        for (int l = 0; l < LANES; l++) du[l] = dtv[l] * uv[l];
        for (int64_t n = 0; n < nstate; n++) {
            const float bn = bt[n];
            for (int l = 0; l < LANES; l++) {
                h[n][l] = exp_nonpos(dtv[l] * a[n][l]) * h[n][l] + du[l] * bn;
                ht[n * LANES + l] = h[n][l];
            }
        }
    }
    for (int64_t t = length - 1; t >= 0; t--) {          /* the adjoint, backwards in time */
        float du[LANES], sv[LANES] = {0}, gdt[LANES] = {0};
        const float *bt = Bm + t * nstate, *ct = Cm + t * nstate;
        const float *ht = hs + t * nstate * LANES, *hp = t > 0 ? hs + (t - 1) * nstate * LANES : NULL;
        copy_lanes(dtv, dt + t * dim + c0, w);
        copy_lanes(uv, u + t * dim + c0, w);
        copy_lanes(gyv, gy + t * dim + c0, w);
        for (int l = 0; l < LANES; l++) du[l] = dtv[l] * uv[l];
        for (int64_t n = 0; n < nstate; n++) {
            const float bn = bt[n], cn = ct[n];
            float gb = 0.0f, gc = 0.0f;
            for (int l = 0; l < LANES; l++) {
                const float at = exp_nonpos(dtv[l] * a[n][l]);
                const float hprev = hp ? hp[n * LANES + l] : 0.0f;
                lam[n][l] = cn * gyv[l] + anext[n][l] * lam[n][l];
                const float q = lam[n][l] * hprev * at;
                sv[l] += lam[n][l] * bn;
                gdt[l] += q * a[n][l];
                ga[n][l] += q * dtv[l];
                gb += lam[n][l] * du[l];
                gc += gyv[l] * ht[n * LANES + l];
                anext[n][l] = at;
            }
            g_B[t * nstate + n] = gb;
            g_C[t * nstate + n] = gc;
        }
        float *gut = g_u + t * dim + c0, *gdtt = g_dt + t * dim + c0;
        for (int l = 0; l < w; l++) {
            gut[l] = dtv[l] * sv[l] + dsk[l] * gyv[l];
            gdtt[l] = gdt[l] + uv[l] * sv[l];
            gd[l] += gyv[l] * uv[l];
        }
    }
    for (int l = 0; l < LANES; l++) {
        for (int64_t n = 0; n < nstate; n++) g_A[l * nstate + n] = ga[n][l];
        g_D[l] = gd[l];
    }
}

/* Work items [item0, item1) of the backward; `hs` is one scratch of length x nstate x LANES floats for
 * this caller's items in turn. Per-item outputs: g_A [items][LANES][nstate], g_D [items][LANES],
 * g_B and g_C [items][length][nstate]. */
int qmamba_scan_backward_f32(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm,
                             const float *Dskip, const float *gy, float *hs, float *g_u, float *g_dt, float *g_A,
                             float *g_B, float *g_C, float *g_D, int64_t batch, int64_t dim, int64_t groups,
                             int64_t length, int64_t nstate, int64_t item0, int64_t item1) {
    if (!valid_sizes(dim, groups, nstate)) return -1;
    const int64_t items = batch * groups * blocks_per_group(dim, groups);
    for (int64_t item = item0; item < item1 && item < items; item++) {
        const Block k = block_of(item, dim, groups, length, nstate);
        scan_block_backward(dt + k.row, u + k.row, A, Bm + k.state_row, Cm + k.state_row, Dskip, gy + k.row, hs,
                            g_u + k.row, g_dt + k.row, g_A + item * LANES * nstate, g_B + item * length * nstate,
                            g_C + item * length * nstate, g_D + item * LANES, length, dim, nstate, k.c0, k.c1);
    }
    return 0;
}

/* Items in the grid (what the caller splits among its threads). */
int64_t qmamba_scan_items(int64_t batch, int64_t dim, int64_t groups) {
    return batch * groups * blocks_per_group(dim, groups);
}
