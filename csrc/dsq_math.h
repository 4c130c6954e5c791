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
 * That is the "free" grid: levels l + k Delta. The "affine" and "symmetric"
 * grids put 0.0 on a level, with an integer zero point z, so that integer
 * runtimes hold them (ONNX QuantizeLinear / DequantizeLinear):
 *
 *   affine     Delta = (u - l) / N, z = clamp(rne(-l / Delta), 0, N), levels 0..N
 *   symmetric  Delta = max(-l, u) / Qp, Qp = 2^(b-1) - 1, z = Qp, levels 0..2 Qp
 *   t = x / Delta (IEEE division), q = clamp(rne(t) + z, 0, levels), y = (q - z) Delta
 *
 * exactly as QuantizeLinear, a clip and DequantizeLinear compute it. The soft
 * staircase and the straight-through estimator use v = t + z; the gradients of
 * l and u go through Delta (z counts as a constant), see DSQ_MATH.md.
 *
 * Guards, all chosen so that no input produces a NaN or Inf that was not
 * already in x, g or a parameter:
 *   - u <= l, or a Delta that underflows to 0, is "degenerate" on every grid:
 *     every output is l, dy/dx = 0, x <= l feeds dl and x > l feeds du.
 *   - a NaN or infinite bound makes y and every gradient NaN (the grid has no value).
 *   - u - l that overflows although l and u are finite (-2e38, 2e38 in float32):
 *     the op is computed on x, l and u halved (exact: a power of two) and y
 *     doubled, which gives the values of an unbounded exponent range.
 *   - alpha is clamped into [max(DSQ_ALPHA_MIN, 2 / (1 + exp(DSQ_K_MAX * Delta))), 0.5]
 *     (k = L / Delta <= 1000, 0.5 winning when the k bound exceeds it); a clamped
 *     alpha gets zero gradient.
 *   - NaN in x propagates to y, to dy/dx and to every reduced gradient (the
 *     comparisons below are written so that NaN is never clipped away).
 */
#ifndef DSQ_MATH_H
#define DSQ_MATH_H

#include <math.h>

/* Always inlined: the CPU kernels' loops are compiled once per instruction set
 * (dsq_kernels.c), and a function GCC leaves out of line (it starts to once the file
 * holds a few more loops) is compiled for the baseline one only, without FMA: slower,
 * and other bits than the same formula inlined in another loop. */
#ifdef __CUDACC__
#define DSQ_FN static __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define DSQ_FN static inline __attribute__((always_inline))
#else
#define DSQ_FN static inline
#endif

/* The floor keeps L = log(2/alpha - 1) <= 7.6 and the peak of dy/dx (s L / 2) <= 3.8. */
#define DSQ_ALPHA_MIN 1e-3
#define DSQ_ALPHA_MAX 0.5
#define DSQ_K_MAX 1000.0

enum dsq_mode { DSQ_MODE_UNIFORM = 0, DSQ_MODE_DSQ = 1 };
/* The level grids (the ops' `grid` argument); see the top of this file. */
enum dsq_grid { DSQ_GRID_FREE = 0, DSQ_GRID_AFFINE = 1, DSQ_GRID_SYMMETRIC = 2 };

/*
 * tanh for float as a [13/6] rational function on [-7.9053, 7.9053] (the
 * coefficients of Eigen's and XLA's fast float tanh), saturating outside it.
 * Branch-free so that it vectorises; NaN propagates. Its error against the
 * exact tanh is measured in tests/test_ops.py::test_fast_tanh_error_bound.
 */
DSQ_FN float dsq_tanh_f32(float z) {
    const float clamp = 7.90531110763549805f;
    float a = z > clamp ? clamp : z; /* one-sided clamps, as in dsq_elem_forward */
    a = a < -clamp ? -clamp : a;
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
 * DSQ_DEFINE_MATH(T, SFX, EXP, LOG, FLOOR, RINT) defines, for the real type T:
 *   dsq_coef_SFX                        the scalars derived once per tensor or channel
 *   dsq_coef_make_SFX(l, u, alpha, b, grid)
 *                                       derives them
 *   dsq_elem_forward[_pinned|_any]_SFX(k, x)
 *                                       the hard quantized value
 *   dsq_elem_backward[_pinned|_any]_SFX(k, mode, x, g)
 *                                       g * dy/dx and g * dy/d{l, u, alpha}
 * The plain functions are the free grid, _pinned the affine and symmetric ones
 * (k.pinned), _any either plus the halved bounds of an overflowing u - l
 * (k.xscale != 1). The kernels pick one per run of elements that share k, and
 * pass grid and mode as constants, so the free grid's loops are those it
 * always had. Everything is passed and returned by value: after inlining, the
 * compiler keeps the coefficients in registers and vectorises the loops.
 */
#define DSQ_DEFINE_MATH(T, SFX, EXP, LOG, FLOOR, RINT)                                              \
    typedef struct {                                                                                \
        T l, u;     /* bounds; u == l when degenerate */                                            \
        T delta;    /* (u - l) / N (symmetric: max(-l, u) / Qp); 0 when degenerate */               \
        T div;      /* what v divides by: delta, or 1 when degenerate (then xc - l == 0) */         \
        T nlev;     /* N (symmetric: 2 Qp), the highest level index */                              \
        T inv_n;    /* 1 / N */                                                                     \
        T L, s, c;  /* DSQ shape: log(2/alpha - 1), 1/(1 - alpha), 2/(alpha (2 - alpha)) */         \
        T A;        /* s L / 2; 0 when degenerate */                                                \
        T ste;      /* dy/dx of the uniform mode: 1, or 0 when degenerate */                        \
        T da_scale; /* Delta s / 2, or 0 when alpha was clamped */                                  \
        T z;        /* zero point: an integer (affine, symmetric), or -l / Delta (free) */          \
        T cl, cu;   /* dy/dl and dy/du per unit of dy/dDelta (affine and symmetric grids) */        \
        T xscale;   /* 1, or 1/2 when u - l overflows: the op runs on x, l, u times xscale */       \
        int pinned; /* the affine or symmetric formulas apply (not degenerate, no NaN bound) */     \
    } dsq_coef_##SFX;                                                                               \
                                                                                                    \
    typedef struct {                                                                                \
        T dx, dl, du, da; /* g times dy/dx, dy/dl, dy/du, dy/dalpha */                              \
    } dsq_grad_##SFX;                                                                               \
                                                                                                    \
    /* The per-channel scalars; grid is a dsq_grid. Every backend derives them here, and so */      \
    /* does the grid_params op, so the exported scale and zero point are the kernels' own. */       \
    DSQ_FN dsq_coef_##SFX dsq_coef_make_##SFX(T lower, T upper, T alpha, int bits, int grid) {      \
        dsq_coef_##SFX k;                                                                           \
        const T n = (T)((1 << bits) - 1);                                                           \
        k.xscale = (T)1;                                                                            \
        /* x - x == 0 exactly when x is finite (no fast-math: never folded) */                      \
        if (!((upper - lower) - (upper - lower) == (T)0) && lower - lower == (T)0 &&                \
            upper - upper == (T)0) {                                                                \
            lower *= (T)0.5;                                                                        \
            upper *= (T)0.5;                                                                        \
            k.xscale = (T)0.5;                                                                      \
        }                                                                                           \
        /* a NaN or infinite bound: the grid has no value */                                        \
        const int nan_bound = !(lower - lower == (T)0 && upper - upper == (T)0);                    \
        const T nan_value = (lower - lower) + (upper - upper); /* NaN when nan_bound */             \
        T delta, nlev = n, z = (T)0;                                                                \
        k.cl = (T)0;                                                                                \
        k.cu = (T)0;                                                                                \
        if (grid == DSQ_GRID_SYMMETRIC) {                                                           \
            /* the wider bound sets the scale and gets its gradient; a tie splits it, */            \
            /* as torch.maximum's gradient does */                                                  \
            const T qp = (T)((1 << (bits - 1)) - 1);                                                \
            const T m = -lower > upper ? -lower : upper;                                            \
            delta = m / qp;                                                                         \
            nlev = (T)2 * qp;                                                                       \
            z = qp;                                                                                 \
            const T wl = -lower > upper ? (T)1 : (-lower < upper ? (T)0 : (T)0.5);                  \
            k.cl = -wl / qp;                                                                        \
            k.cu = ((T)1 - wl) / qp;                                                                \
        } else {                                                                                    \
            delta = (upper - lower) / n;                                                            \
            k.cl = -(T)1 / n;                                                                       \
            k.cu = (T)1 / n;                                                                        \
        }                                                                                           \
        const int degenerate = !(delta > (T)0) || !(upper > lower);                                 \
        if (degenerate) {                                                                           \
            delta = (T)0;                                                                           \
            upper = lower;                                                                          \
            z = (T)0;                                                                               \
            nlev = n;                                                                               \
        } else if (grid == DSQ_GRID_AFFINE) {                                                       \
            z = RINT(-lower / delta);                                                               \
            z = z < (T)0 ? (T)0 : (z > n ? n : z);                                                  \
        } else if (grid == DSQ_GRID_FREE) {                                                         \
            z = -lower / delta;                                                                     \
        }                                                                                           \
        k.l = lower;                                                                                \
        k.u = upper;                                                                                \
        k.delta = delta;                                                                            \
        k.div = degenerate ? (T)1 : delta;                                                          \
        k.nlev = nlev;                                                                              \
        k.inv_n = (T)1 / n;                                                                         \
        k.z = z;                                                                                    \
        k.pinned = grid != DSQ_GRID_FREE && !degenerate && !nan_bound;                              \
        /* k = L / Delta <= K_MAX  <=>  alpha >= 2 / (1 + exp(K_MAX Delta)) */                      \
        const T hi = (T)DSQ_ALPHA_MAX;                                                              \
        const T dtrue = k.xscale == (T)1 ? delta : delta / k.xscale;                                \
        T lo = (T)2 / ((T)1 + EXP((T)DSQ_K_MAX * dtrue));                                           \
        if (lo < (T)DSQ_ALPHA_MIN) lo = (T)DSQ_ALPHA_MIN;                                           \
        if (lo > hi) lo = hi;                                                                       \
        /* written so that a NaN alpha stays NaN instead of being clamped away */                   \
        const int live = alpha >= lo && alpha <= hi;                                                \
        const T a = alpha < lo ? lo : (alpha > hi ? hi : alpha);                                    \
        k.s = (T)1 / ((T)1 - a);                                                                    \
        k.L = LOG((T)2 / a - (T)1);                                                                 \
        k.c = (T)2 / (a * ((T)2 - a));                                                              \
        k.A = degenerate ? (T)0 : k.s * k.L / (T)2;                                                 \
        k.ste = degenerate ? (T)0 : (T)1;                                                           \
        k.da_scale = live ? dtrue * k.s / (T)2 : (T)0;                                              \
        if (alpha != alpha) k.da_scale = alpha; /* NaN alpha: NaN gradient */                       \
        if (nan_bound) {                                                                            \
            /* NaN everywhere, through the free formulas below */                      \
            k.l = k.u = k.delta = k.div = k.z = nan_value;                                          \
            k.A = k.ste = k.da_scale = k.cl = k.cu = nan_value;                                     \
        }                                                                                           \
        return k;                                                                                   \
    }                                                                                               \
                                                                                                    \
    /* sort_bounds: learned bounds that crossed (lower above upper) are used swapped. */            \
    /* Returns whether it swapped, so that the caller can send the reduced gradients */             \
    /* back to the parameters they belong to. The one place this rule lives. */                     \
    DSQ_FN int dsq_sort_bounds_##SFX(const int sort_bounds, T *l, T *u) {                           \
        const int swap = sort_bounds && *u < *l;                                                    \
        if (swap) {                                                                                 \
            const T t = *l;                                                                         \
            *l = *u;                                                                                \
            *u = t;                                                                                 \
        }                                                                                           \
        return swap;                                                                                \
    }                                                                                               \
                                                                                                    \
    /* The scale and zero point of the grid the kernels use (for the grid_params op): */            \
    /* Delta of the unhalved bounds, and z; both 0 for a degenerate range. */                       \
    DSQ_FN void dsq_grid_export_##SFX(const dsq_coef_##SFX k, T *scale, T *zero_point) {            \
        *scale = k.xscale == (T)1 ? k.delta : k.delta / k.xscale;                                   \
        *zero_point = k.z;                                                                          \
    }                                                                                               \
                                                                                                    \
    /* The free grid. */                                                                            \
    DSQ_FN T dsq_elem_forward_##SFX(const dsq_coef_##SFX k, T x) {                                  \
        /* not fmin/fmax: those would turn a NaN x into a bound. Each clamp is a select of */       \
        /* its own: `a < b ? b : a` keeps a NaN a, as x86's max instruction does (it returns */     \
        /* its second operand when either is NaN), so it compiles to one vmaxps / vminps; */         \
        /* nested, the two compiled to mask compares and blends, twice the time in cache. */        \
        T xc = x < k.l ? k.l : x;                                                                   \
        xc = xc > k.u ? k.u : xc;                                                                   \
        T v = (xc - k.l) / k.div;                                                                   \
        v = v > k.nlev ? k.nlev : v;                                                                \
        T i = FLOOR(v);                                                                             \
        i = i > k.nlev - (T)1 ? k.nlev - (T)1 : i;                                                  \
        /* exact: v - floor(v) and the 1/2 are exact, so this is round half up */                   \
        const T q = i + (v - i - (T)0.5 >= (T)0 ? (T)1 : (T)0);                                     \
        return k.l + k.delta * q;                                                                   \
    }                                                                                               \
                                                                                                    \
    /* The affine and symmetric grids (k.pinned): QuantizeLinear, clip, DequantizeLinear. */        \
    /* Neither line has a product to fuse into an FMA, so every compiler gives the same bits. */    \
    DSQ_FN T dsq_elem_forward_pinned_##SFX(const dsq_coef_##SFX k, T x) {                           \
        T q = RINT(x / k.delta) + k.z;                                                              \
        q = q < (T)0 ? (T)0 : q; /* two one-sided clamps, as in dsq_elem_forward */                 \
        q = q > k.nlev ? k.nlev : q;                                                                \
        return (q - k.z) * k.delta;                                                                 \
    }                                                                                               \
                                                                                                    \
    /* Either grid, and the halved bounds of an overflowing u - l: the slow path. */                \
    DSQ_FN T dsq_elem_forward_any_##SFX(const dsq_coef_##SFX k, T x) {                              \
        const T xs = x * k.xscale;                                                                  \
        const T y = k.pinned ? dsq_elem_forward_pinned_##SFX(k, xs) : dsq_elem_forward_##SFX(k, xs); \
        return y / k.xscale;                                                                        \
    }                                                                                               \
                                                                                                    \
    /* D (dy/dx inside) and the alpha term at position r inside the interval */                     \
    DSQ_FN void dsq_shape_##SFX(const dsq_coef_##SFX k, const int mode, T r, T *d, T *da) {         \
        if (mode == DSQ_MODE_DSQ) {                                                                 \
            const T th = dsq_tanh_##SFX(k.L * r);                                                   \
            const T sech2 = (T)1 - th * th;                                                         \
            *d = k.A * sech2;                                                                       \
            *da = k.da_scale * (k.s * th - k.c * r * sech2);                                        \
        } else {                                                                                    \
            *d = k.ste + (r - r); /* r - r: 0, or NaN for a NaN x (never folded: no fast-math) */   \
            *da = (T)0;                                                                             \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    DSQ_FN dsq_grad_##SFX dsq_elem_backward_##SFX(const dsq_coef_##SFX k, const int mode, T x, T g) { \
        const int below = x < k.l;                                                                  \
        const int above = x > k.u;                                                                  \
        T xc = x < k.l ? k.l : x; /* one-sided clamps, as in dsq_elem_forward */                    \
        xc = xc > k.u ? k.u : xc;                                                                   \
        T v = (xc - k.l) / k.div;                                                                   \
        v = v > k.nlev ? k.nlev : v;                                                                \
        T i = FLOOR(v);                                                                             \
        i = i > k.nlev - (T)1 ? k.nlev - (T)1 : i;                                                  \
        const T r = v - i - (T)0.5;                                                                 \
        const T q = i + (r >= (T)0 ? (T)1 : (T)0);                                                  \
        T d, da;                                                                                    \
        dsq_shape_##SFX(k, mode, r, &d, &da);                                                       \
        const T gin = (below || above) ? (T)0 : g;                                                  \
        const T vn = v * k.inv_n;                                                                   \
        const T qn = q * k.inv_n;                                                                   \
        dsq_grad_##SFX out;                                                                         \
        out.dx = gin * d;                                                                           \
        out.dl = (below ? g : (T)0) + gin * ((T)1 - qn - d * ((T)1 - vn));                          \
        out.du = (above ? g : (T)0) + gin * (qn - d * vn);                                          \
        out.da = gin * da;                                                                          \
        return out;                                                                                 \
    }                                                                                               \
                                                                                                    \
    /* The affine and symmetric grids: the free formulas at l' = -z Delta, u' = (nlev - z) Delta, */ \
    /* chained through Delta: dy/dDelta = -z below, nlev - z above, (q - z) - D x / Delta inside. */ \
    DSQ_FN dsq_grad_##SFX dsq_elem_backward_pinned_##SFX(const dsq_coef_##SFX k, const int mode,    \
                                                         T x, T g) {                                \
        const T t = x / k.delta;                                                                    \
        const T v = t + k.z;                                                                        \
        const int below = v < (T)0;                                                                 \
        const int above = v > k.nlev;                                                               \
        T vc = v < (T)0 ? (T)0 : v;                                                                 \
        vc = vc > k.nlev ? k.nlev : vc;                                                             \
        T i = FLOOR(vc);                                                                            \
        i = i > k.nlev - (T)1 ? k.nlev - (T)1 : i;                                                  \
        const T r = vc - i - (T)0.5;                                                                \
        /* the forward's level (round half to even), not i + [r >= 0] */                            \
        T q = RINT(t) + k.z;                                                                        \
        q = q < (T)0 ? (T)0 : q;                                                                    \
        q = q > k.nlev ? k.nlev : q;                                                                \
        T d, da;                                                                                    \
        dsq_shape_##SFX(k, mode, r, &d, &da);                                                       \
        const T gin = (below || above) ? (T)0 : g;                                                  \
        const T gd = g * (below ? -k.z : (above ? k.nlev - k.z : (q - k.z) - d * t));               \
        dsq_grad_##SFX out;                                                                         \
        out.dx = gin * d;                                                                           \
        out.dl = k.cl * gd;                                                                         \
        out.du = k.cu * gd;                                                                         \
        out.da = gin * da;                                                                          \
        return out;                                                                                 \
    }                                                                                               \
                                                                                                    \
    DSQ_FN dsq_grad_##SFX dsq_elem_backward_any_##SFX(const dsq_coef_##SFX k, const int mode, T x,  \
                                                      T g) {                                        \
        const T xs = x * k.xscale;                                                                  \
        return k.pinned ? dsq_elem_backward_pinned_##SFX(k, mode, xs, g)                            \
                        : dsq_elem_backward_##SFX(k, mode, xs, g);                                  \
    }

DSQ_DEFINE_MATH(float, f32, expf, logf, floorf, rintf)
DSQ_DEFINE_MATH(double, f64, exp, log, floor, rint)

#endif /* DSQ_MATH_H */
