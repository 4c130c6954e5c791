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

/* The helpers below must be inlined into each DSQ_HOT clone: a helper left out of
 * line would be compiled once, for the baseline target, and run there (no AVX, no
 * FMA) whichever clone called it. */
#if defined(__GNUC__)
#define DSQ_INLINE static inline __attribute__((always_inline))
#else
#define DSQ_INLINE static inline
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

/* Which element functions of dsq_math.h a loop runs (its path, as in dsq_cuda.cu): the
 * free grid, the affine and symmetric grids, or either with halved bounds (an
 * overflowing u - l; rare, not tuned). */
enum { PATH_FREE = 0, PATH_PINNED = 1, PATH_ANY = 2 };

#define DSQ_DEFINE_KERNELS(T, SFX)                                                                  \
    DSQ_INLINE dsq_grad_##SFX backward_elem_##SFX(const dsq_coef_##SFX k, const int mode,           \
                                                  const int path, T x, T g) {                       \
        if (path == PATH_FREE) return dsq_elem_backward_##SFX(k, mode, x, g);                       \
        if (path == PATH_PINNED) return dsq_elem_backward_pinned_##SFX(k, mode, x, g);              \
        return dsq_elem_backward_any_##SFX(k, mode, x, g);                                          \
    }                                                                                               \
                                                                                                    \
    /* mode and path are compile-time constants at each call site below, so the branches            \
       on them fold */                                                                              \
    DSQ_INLINE void backward_run_##SFX(const dsq_coef_##SFX k, const int mode, const int path,      \
                                       const T *restrict g, const T *restrict x,                    \
                                       T *restrict dx, int64_t n, double sums[3]) {                 \
        for (int64_t b = 0; b < n; b += DSQ_SPAN) {                                                 \
            const int64_t e = n - b < DSQ_SPAN ? n : b + DSQ_SPAN;                                  \
            T sl = 0, su = 0, sa = 0;                                                               \
            _Pragma("omp simd reduction(+ : sl, su, sa)") for (int64_t j = b; j < e; ++j) {         \
                const dsq_grad_##SFX d = backward_elem_##SFX(k, mode, path, x[j], g[j]);            \
                dx[j] = d.dx;                                                                       \
                sl += d.dl;                                                                         \
                su += d.du;                                                                         \
                sa += d.da;                                                                         \
            }                                                                                       \
            sums[0] += (double)sl;                                                                  \
            sums[1] += (double)su;                                                                  \
            sums[2] += (double)sa;                                                                  \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    /* The free grid: the loops these kernels had before the other grids existed. */                \
    DSQ_INLINE void forward_free_##SFX(const dsq_coef_##SFX k, const T *restrict x,                 \
                                       T *restrict y, int64_t n) {                                  \
        _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) y[j] = dsq_elem_forward_##SFX(k, x[j]); \
    }                                                                                               \
                                                                                                    \
    DSQ_INLINE void backward_free_##SFX(const dsq_coef_##SFX k, const int mode,                     \
                                        const T *restrict g, const T *restrict x,                   \
                                        T *restrict dx, int64_t n, double sums[3]) {                \
        if (mode == DSQ_MODE_DSQ)                                                                   \
            backward_run_##SFX(k, DSQ_MODE_DSQ, PATH_FREE, g, x, dx, n, sums);                      \
        else                                                                                        \
            backward_run_##SFX(k, DSQ_MODE_UNIFORM, PATH_FREE, g, x, dx, n, sums);                  \
    }                                                                                               \
                                                                                                    \
    /* The affine and symmetric grids (k.pinned), and a u - l that overflows on any grid            \
       (k.xscale != 1): functions of their own, with their own clones, so that the free             \
       grid's functions keep their code and their registers. */                                     \
    static DSQ_HOT void forward_other_##SFX(const dsq_coef_##SFX *kp, const T *restrict x,          \
                                            T *restrict y, int64_t n) {                             \
        const dsq_coef_##SFX k = *kp;                                                               \
        if (k.xscale != (T)1) {                                                                     \
            for (int64_t j = 0; j < n; ++j) y[j] = dsq_elem_forward_any_##SFX(k, x[j]);             \
        } else {                                                                                    \
            _Pragma("omp simd") for (int64_t j = 0; j < n; ++j)                                     \
                y[j] = dsq_elem_forward_pinned_##SFX(k, x[j]);                                      \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    static DSQ_HOT void backward_other_##SFX(const dsq_coef_##SFX *kp, const int mode,              \
                                             const T *restrict g, const T *restrict x,              \
                                             T *restrict dx, int64_t n, double sums[3]) {           \
        const dsq_coef_##SFX k = *kp;                                                               \
        if (k.xscale != (T)1)                                                                       \
            backward_run_##SFX(k, mode, PATH_ANY, g, x, dx, n, sums);                               \
        else if (mode == DSQ_MODE_DSQ)                                                              \
            backward_run_##SFX(k, DSQ_MODE_DSQ, PATH_PINNED, g, x, dx, n, sums);                    \
        else                                                                                        \
            backward_run_##SFX(k, DSQ_MODE_UNIFORM, PATH_PINNED, g, x, dx, n, sums);                \
    }                                                                                               \
                                                                                                    \
    DSQ_INLINE int other_##SFX(const dsq_coef_##SFX k) { return k.pinned || k.xscale != (T)1; }     \
                                                                                                    \
    DSQ_HOT void dsq_forward_##SFX(const T *restrict x, T *restrict y, int64_t n, T lower,          \
                                   T upper, int bits, int grid) {                                   \
        const dsq_coef_##SFX k =                                                                    \
            dsq_coef_make_##SFX(lower, upper, (T)DSQ_ALPHA_MAX, bits, grid);                        \
        if (other_##SFX(k))                                                                         \
            forward_other_##SFX(&k, x, y, n);                                                       \
        else                                                                                        \
            forward_free_##SFX(k, x, y, n);                                                         \
    }                                                                                               \
                                                                                                    \
    DSQ_HOT void dsq_backward_##SFX(const T *g, const T *x, T *dx, int64_t n, T lower,              \
                                    T upper, T alpha, int bits, int mode, int grid,                 \
                                    double sums[3]) {                                               \
        const dsq_coef_##SFX k = dsq_coef_make_##SFX(lower, upper, alpha, bits, grid);              \
        if (other_##SFX(k))                                                                         \
            backward_other_##SFX(&k, mode, g, x, dx, n, sums);                                      \
        else                                                                                        \
            backward_free_##SFX(k, mode, g, x, dx, n, sums);                                        \
    }                                                                                               \
                                                                                                    \
    void dsq_grid_params_##SFX(const T *lower, int64_t ls, const T *upper, int64_t us,              \
                               int64_t n, int bits, int grid, int sort_bounds, T *scale,            \
                               T *zero_point) {                                                     \
        for (int64_t c = 0; c < n; ++c) {                                                           \
            T l = lower[c * ls], u = upper[c * us];                                                 \
            dsq_sort_bounds_##SFX(sort_bounds, &l, &u);                                             \
            const dsq_coef_##SFX k = dsq_coef_make_##SFX(l, u, (T)DSQ_ALPHA_MAX, bits, grid);       \
            dsq_grid_export_##SFX(k, scale + c, zero_point + c);                                    \
        }                                                                                           \
    }                                                                                               \


DSQ_DEFINE_KERNELS(float, f32)
DSQ_DEFINE_KERNELS(double, f64)

/* bfloat16 goes through float32 buffers of one span, which stay in L1, so
 * the float32 loops above do the work and the partial sums are formed exactly
 * as for float32 input. */
DSQ_HOT void dsq_forward_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n,
                              float lower, float upper, int bits, int grid) {
    const dsq_coef_f32 k = dsq_coef_make_f32(lower, upper, (float)DSQ_ALPHA_MAX, bits, grid);
    const int other = other_f32(k);
    float xb[DSQ_SPAN], yb[DSQ_SPAN];
    for (int64_t b = 0; b < n; b += DSQ_SPAN) {
        const int64_t m = n - b < DSQ_SPAN ? n - b : DSQ_SPAN;
        for (int64_t j = 0; j < m; ++j) xb[j] = bf16_load(x[b + j]);
        if (other)
            forward_other_f32(&k, xb, yb, m);
        else
            forward_free_f32(k, xb, yb, m);
        for (int64_t j = 0; j < m; ++j) y[b + j] = bf16_store(yb[j]);
    }
}

DSQ_HOT void dsq_backward_bf16(const uint16_t *g, const uint16_t *x, uint16_t *dx, int64_t n,
                               float lower, float upper, float alpha, int bits, int mode,
                               int grid, double sums[3]) {
    const dsq_coef_f32 k = dsq_coef_make_f32(lower, upper, alpha, bits, grid);
    const int other = other_f32(k);
    float xb[DSQ_SPAN], gb[DSQ_SPAN], db[DSQ_SPAN];
    for (int64_t b = 0; b < n; b += DSQ_SPAN) {
        const int64_t m = n - b < DSQ_SPAN ? n - b : DSQ_SPAN;
        for (int64_t j = 0; j < m; ++j) {
            xb[j] = bf16_load(x[b + j]);
            gb[j] = bf16_load(g[b + j]);
        }
        /* one span per call: the same partial sums as the float32 kernel's */
        if (other)
            backward_other_f32(&k, mode, gb, xb, db, m, sums);
        else
            backward_free_f32(k, mode, gb, xb, db, m, sums);
        for (int64_t j = 0; j < m; ++j) dx[b + j] = bf16_store(db[j]);
    }
}

void dsq_tanh_f32_array(const float *x, float *y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = dsq_tanh_f32(x[j]);
}
