/*
 * CPU kernels: loops over the inline math of dsq_math.h.
 *
 * The build targets the x86-64 baseline; on x86-64 the hot loops are also
 * compiled for AVX2+FMA and AVX-512 and the widest one the CPU supports is
 * picked at load time (GCC function multi-versioning), so the same binary
 * runs everywhere without "illegal instruction".
 */
#include "dsq_kernels.h"

#include <string.h>

#include "dsq_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DSQ_NO_CLONES)
#define DSQ_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSQ_HOT
#endif

/* bfloat16 is stored as its 16 bits and computed in float. Widening is exact;
 * narrowing rounds to nearest even and turns NaN into 0x7FC0, as c10::BFloat16 does,
 * so these kernels and ATen's conversions give the same bits. */
static inline float bf16_load(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

#define DSQ_DEFINE_KERNELS(T, SFX)                                                          \
    DSQ_HOT void dsq_forward_##SFX(const T *restrict x, T *restrict y, int64_t n, T lower,  \
                                   T upper, int bits) {                                     \
        const dsq_coef_##SFX k = dsq_coef_make_##SFX(lower, upper, (T)DSQ_ALPHA_MAX, bits); \
        _Pragma("omp simd") for (int64_t j = 0; j < n; ++j)                                 \
            y[j] = dsq_elem_forward_##SFX(k, x[j]);                                         \
    }                                                                                       \
                                                                                            \
    /* mode is a compile-time constant at each call site below, so the branch on it folds */ \
    static inline void backward_run_##SFX(const dsq_coef_##SFX k, const int mode,           \
                                          const T *restrict g, const T *restrict x,         \
                                          T *restrict dx, int64_t n, double sums[3]) {      \
        for (int64_t b = 0; b < n; b += DSQ_SUB_BLOCK) {                                    \
            const int64_t e = n - b < DSQ_SUB_BLOCK ? n : b + DSQ_SUB_BLOCK;                \
            T sl = 0, su = 0, sa = 0;                                                       \
            _Pragma("omp simd reduction(+ : sl, su, sa)") for (int64_t j = b; j < e; ++j) { \
                const dsq_grad_##SFX d = dsq_elem_backward_##SFX(k, mode, x[j], g[j]);      \
                dx[j] = d.dx;                                                               \
                sl += d.dl;                                                                 \
                su += d.du;                                                                 \
                sa += d.da;                                                                 \
            }                                                                               \
            sums[0] += (double)sl;                                                          \
            sums[1] += (double)su;                                                          \
            sums[2] += (double)sa;                                                          \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    DSQ_HOT void dsq_backward_##SFX(const T *g, const T *x, T *dx, int64_t n, T lower,      \
                                    T upper, T alpha, int bits, int mode, double sums[3]) { \
        const dsq_coef_##SFX k = dsq_coef_make_##SFX(lower, upper, alpha, bits);            \
        if (mode == DSQ_MODE_DSQ)                                                           \
            backward_run_##SFX(k, DSQ_MODE_DSQ, g, x, dx, n, sums);                         \
        else                                                                                \
            backward_run_##SFX(k, DSQ_MODE_UNIFORM, g, x, dx, n, sums);                     \
    }

DSQ_DEFINE_KERNELS(float, f32)
DSQ_DEFINE_KERNELS(double, f64)

/* bfloat16 goes through float32 buffers of one sub-block, which stay in L1, so
 * the float32 loops above do the work and the partial sums are formed exactly
 * as for float32 input. */
DSQ_HOT void dsq_forward_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n,
                              float lower, float upper, int bits) {
    const dsq_coef_f32 k = dsq_coef_make_f32(lower, upper, (float)DSQ_ALPHA_MAX, bits);
    float xb[DSQ_SUB_BLOCK];
    for (int64_t b = 0; b < n; b += DSQ_SUB_BLOCK) {
        const int64_t m = n - b < DSQ_SUB_BLOCK ? n - b : DSQ_SUB_BLOCK;
        for (int64_t j = 0; j < m; ++j) xb[j] = bf16_load(x[b + j]);
        _Pragma("omp simd") for (int64_t j = 0; j < m; ++j) xb[j] = dsq_elem_forward_f32(k, xb[j]);
        for (int64_t j = 0; j < m; ++j) y[b + j] = bf16_store(xb[j]);
    }
}

DSQ_HOT void dsq_backward_bf16(const uint16_t *g, const uint16_t *x, uint16_t *dx, int64_t n,
                               float lower, float upper, float alpha, int bits, int mode,
                               double sums[3]) {
    const dsq_coef_f32 k = dsq_coef_make_f32(lower, upper, alpha, bits);
    float xb[DSQ_SUB_BLOCK], gb[DSQ_SUB_BLOCK], db[DSQ_SUB_BLOCK];
    for (int64_t b = 0; b < n; b += DSQ_SUB_BLOCK) {
        const int64_t m = n - b < DSQ_SUB_BLOCK ? n - b : DSQ_SUB_BLOCK;
        for (int64_t j = 0; j < m; ++j) {
            xb[j] = bf16_load(x[b + j]);
            gb[j] = bf16_load(g[b + j]);
        }
        /* one sub-block per call: the same partial sums as the float32 kernel's */
        if (mode == DSQ_MODE_DSQ)
            backward_run_f32(k, DSQ_MODE_DSQ, gb, xb, db, m, sums);
        else
            backward_run_f32(k, DSQ_MODE_UNIFORM, gb, xb, db, m, sums);
        for (int64_t j = 0; j < m; ++j) dx[b + j] = bf16_store(db[j]);
    }
}

void dsq_tanh_f32_array(const float *x, float *y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = dsq_tanh_f32(x[j]);
}
