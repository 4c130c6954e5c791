/*
 * Per-element math of DSQ and uniform (straight-through) fake quantization.
 *
 * Shared, as inline functions, by the C11 CPU kernels (dsq_kernels.c) and the
 * CUDA kernels (cuda/dsq_cuda.cu), so both backends compute the same thing.
 * The formulas are those of DSQ_MATH.md (Gong et al., ICCV 2019, Algorithm 1):
 *
 *   N = 2^b - 1, Delta = (u - l) / N, v = (clip(x, l, u) - l) / Delta
 *   i = min(floor(v), N - 1), r = v - i - 1/2, Q = i + [r >= 0]
 *   y = l + Delta * Q                          (hard value; alpha does not change it)
 *   D = s * L / 2 * (1 - tanh(L r)^2)          (DSQ)    or 1 (uniform, STE)
 *
 * Guards, all chosen so that no input produces a NaN or Inf that was not
 * already in x, g or a parameter:
 *   - u <= l, a NaN bound, or a Delta that underflows to 0 is "degenerate":
 *     every output is l, dy/dx = 0, x < l feeds dl and x > l feeds du.
 *   - alpha is clamped into [max(DSQ_ALPHA_MIN, 2 / (1 + exp(DSQ_K_MAX * Delta))), 0.5]
 *     (k = L / Delta <= 1000, 0.5 winning when the k bound exceeds it); a clamped
 *     alpha gets zero gradient.
 *   - NaN in x propagates to y, to dy/dx and to every reduced gradient (the
 *     comparisons below are written so that NaN is never clipped away).
 */
#ifndef DSQ_MATH_H
#define DSQ_MATH_H

#include <math.h>

#ifdef __CUDACC__
#define DSQ_FN static __host__ __device__ __forceinline__
#else
#define DSQ_FN static inline
#endif

/* The floor keeps L = log(2/alpha - 1) <= 7.6 and the peak of dy/dx (s L / 2) <= 3.8. */
#define DSQ_ALPHA_MIN 1e-3
#define DSQ_ALPHA_MAX 0.5
#define DSQ_K_MAX 1000.0

enum dsq_mode { DSQ_MODE_UNIFORM = 0, DSQ_MODE_DSQ = 1 };

/*
 * tanh for float as a [13/6] rational function on [-7.9053, 7.9053] (the
 * coefficients of Eigen's and XLA's fast float tanh), saturating outside it.
 * Branch-free so that it vectorises; NaN propagates. Its error against the
 * exact tanh is measured in tests/test_ops.py::test_fast_tanh_error_bound.
 */
DSQ_FN float dsq_tanh_f32(float z) {
    const float clamp = 7.90531110763549805f;
    float a = z > clamp ? clamp : (z < -clamp ? -clamp : z);
    float a2 = a * a;
    float p = -2.76076847742355e-16f;
    p = p * a2 + 2.00018790482477e-13f;
    p = p * a2 + -8.60467152213735e-11f;
    p = p * a2 + 5.12229709037114e-08f;
    p = p * a2 + 1.48572235717979e-05f;
    p = p * a2 + 6.37261928875436e-04f;
    p = p * a2 + 4.89352455891786e-03f;
    p = p * a;
    float q = 1.19825839466702e-06f;
    q = q * a2 + 1.18534705686654e-04f;
    q = q * a2 + 2.26843463243900e-03f;
    q = q * a2 + 4.89352518554385e-03f;
    return p / q;
}

DSQ_FN double dsq_tanh_f64(double z) { return tanh(z); }

/*
 * DSQ_DEFINE_MATH(T, SFX, EXP, LOG, FLOOR) defines, for the real type T:
 *   dsq_coef_SFX                        the scalars derived once per tensor or channel
 *   dsq_coef_make_SFX(l, u, alpha, b)   derives them
 *   dsq_elem_forward_SFX(k, x)          the hard quantized value
 *   dsq_elem_backward_SFX(k, mode, x, g)
 *                                       g * dy/dx and g * dy/d{l, u, alpha}
 * Everything is passed and returned by value: after inlining, the compiler
 * keeps the coefficients in registers and vectorises the loops over elements.
 */
#define DSQ_DEFINE_MATH(T, SFX, EXP, LOG, FLOOR)                                          \
    typedef struct {                                                                      \
        T l, u;     /* bounds; u == l when degenerate */                                  \
        T delta;    /* (u - l) / N; 0 when degenerate */                                  \
        T div;      /* what v divides by: delta, or 1 when degenerate (then xc - l == 0) */ \
        T nlev;     /* N */                                                               \
        T inv_n;    /* 1 / N */                                                           \
        T L, s, c;  /* DSQ shape: log(2/alpha - 1), 1/(1 - alpha), 2/(alpha (2 - alpha)) */ \
        T A;        /* s L / 2; 0 when degenerate */                                      \
        T ste;      /* dy/dx of the uniform mode: 1, or 0 when degenerate */              \
        T da_scale; /* Delta s / 2, or 0 when alpha was clamped */                        \
    } dsq_coef_##SFX;                                                                     \
                                                                                          \
    typedef struct {                                                                      \
        T dx, dl, du, da; /* g times dy/dx, dy/dl, dy/du, dy/dalpha */                    \
    } dsq_grad_##SFX;                                                                     \
                                                                                          \
    DSQ_FN dsq_coef_##SFX dsq_coef_make_##SFX(T lower, T upper, T alpha, int bits) {      \
        dsq_coef_##SFX k;                                                                 \
        const T n = (T)((1 << bits) - 1);                                                 \
        T delta = (upper - lower) / n;                                                    \
        const int degenerate = !(delta > (T)0);                                           \
        if (degenerate) {                                                                 \
            delta = (T)0;                                                                 \
            upper = lower;                                                                \
        }                                                                                 \
        k.l = lower;                                                                      \
        k.u = upper;                                                                      \
        k.delta = delta;                                                                  \
        k.div = degenerate ? (T)1 : delta;                                                \
        k.nlev = n;                                                                       \
        k.inv_n = (T)1 / n;                                                               \
        /* k = L / Delta <= K_MAX  <=>  alpha >= 2 / (1 + exp(K_MAX Delta)) */            \
        const T hi = (T)DSQ_ALPHA_MAX;                                                    \
        T lo = (T)2 / ((T)1 + EXP((T)DSQ_K_MAX * delta));                                 \
        if (lo < (T)DSQ_ALPHA_MIN) lo = (T)DSQ_ALPHA_MIN;                                 \
        if (lo > hi) lo = hi;                                                             \
        /* written so that a NaN alpha stays NaN instead of being clamped away */         \
        const int live = alpha >= lo && alpha <= hi;                                      \
        const T a = alpha < lo ? lo : (alpha > hi ? hi : alpha);                          \
        k.s = (T)1 / ((T)1 - a);                                                          \
        k.L = LOG((T)2 / a - (T)1);                                                       \
        k.c = (T)2 / (a * ((T)2 - a));                                                    \
        k.A = degenerate ? (T)0 : k.s * k.L / (T)2;                                       \
        k.ste = degenerate ? (T)0 : (T)1;                                                 \
        k.da_scale = live ? delta * k.s / (T)2 : (T)0;                                    \
        if (alpha != alpha) k.da_scale = alpha; /* NaN alpha: NaN gradient */             \
        return k;                                                                         \
    }                                                                                     \
                                                                                          \
    DSQ_FN T dsq_elem_forward_##SFX(const dsq_coef_##SFX k, T x) {                        \
        /* not fmin/fmax: those would turn a NaN x into a bound */                        \
        const T xc = x < k.l ? k.l : (x > k.u ? k.u : x);                                 \
        T v = (xc - k.l) / k.div;                                                         \
        v = v > k.nlev ? k.nlev : v;                                                      \
        T i = FLOOR(v);                                                                   \
        i = i > k.nlev - (T)1 ? k.nlev - (T)1 : i;                                        \
        /* exact: v - floor(v) and the 1/2 are exact, so this is round half up */         \
        const T q = i + (v - i - (T)0.5 >= (T)0 ? (T)1 : (T)0);                           \
        return k.l + k.delta * q;                                                         \
    }                                                                                     \
                                                                                          \
    DSQ_FN dsq_grad_##SFX dsq_elem_backward_##SFX(const dsq_coef_##SFX k, const int mode, \
                                                  T x, T g) {                             \
        const int below = x < k.l;                                                        \
        const int above = x > k.u;                                                        \
        const T xc = below ? k.l : (above ? k.u : x);                                     \
        T v = (xc - k.l) / k.div;                                                         \
        v = v > k.nlev ? k.nlev : v;                                                      \
        T i = FLOOR(v);                                                                   \
        i = i > k.nlev - (T)1 ? k.nlev - (T)1 : i;                                        \
        const T r = v - i - (T)0.5;                                                       \
        const T q = i + (r >= (T)0 ? (T)1 : (T)0);                                        \
        T d, da;                                                                          \
        if (mode == DSQ_MODE_DSQ) {                                                       \
            const T th = dsq_tanh_##SFX(k.L * r);                                         \
            const T sech2 = (T)1 - th * th;                                               \
            d = k.A * sech2;                                                              \
            da = k.da_scale * (k.s * th - k.c * r * sech2);                               \
        } else {                                                                          \
            d = k.ste + (r - r); /* r - r: 0, or NaN for a NaN x (never folded: no fast-math) */ \
            da = (T)0;                                                                    \
        }                                                                                 \
        const T gin = (below || above) ? (T)0 : g;                                        \
        const T vn = v * k.inv_n;                                                         \
        const T qn = q * k.inv_n;                                                         \
        dsq_grad_##SFX out;                                                               \
        out.dx = gin * d;                                                                 \
        out.dl = (below ? g : (T)0) + gin * ((T)1 - qn - d * ((T)1 - vn));                \
        out.du = (above ? g : (T)0) + gin * (qn - d * vn);                                \
        out.da = gin * da;                                                                \
        return out;                                                                       \
    }

DSQ_DEFINE_MATH(float, f32, expf, logf, floorf)
DSQ_DEFINE_MATH(double, f64, exp, log, floor)

#endif /* DSQ_MATH_H */
