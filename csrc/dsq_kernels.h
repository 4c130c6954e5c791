/*
 * CPU kernels of dsq_ext: plain C11 over raw pointers and lengths.
 *
 * Each call handles one contiguous run of elements that share one set of
 * quantizer parameters (a whole tensor, one output channel, or a chunk of
 * either). Splitting the work into such runs, across threads, is the caller's
 * job (ops.cpp), so that the partition, and with it every reduced gradient, is
 * the same whatever the number of threads.
 *
 * grid is a dsq_grid (dsq_math.h), sort_bounds an int flag: the ops' options,
 * see Options in entry_points.h.
 */
#ifndef DSQ_KERNELS_H
#define DSQ_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The hard quantized value on the grid (free: l + Delta * round_half_up((clip(x, l, u) - l) / Delta));
 * the same for DSQ and uniform. */
void dsq_forward_f32(const float *x, float *y, int64_t n, float lower, float upper, int bits,
                     int grid);
void dsq_forward_f64(const double *x, double *y, int64_t n, double lower, double upper, int bits,
                     int grid);

/*
 * One fused pass over (x, g): writes dx = g * dy/dx and adds to sums[0..2]
 * the sums over the run of g * dy/dl, g * dy/du and g * dy/dalpha.
 * mode is DSQ_MODE_DSQ (1) or DSQ_MODE_UNIFORM (0, straight-through; alpha unused).
 * Partial sums are kept in the input's precision over a span (DSQ_SPAN
 * elements), then accumulated in double.
 */
void dsq_backward_f32(const float *g, const float *x, float *dx, int64_t n, float lower,
                      float upper, float alpha, int bits, int mode, int grid, double sums[3]);
void dsq_backward_f64(const double *g, const double *x, double *dx, int64_t n, double lower,
                      double upper, double alpha, int bits, int mode, int grid, double sums[3]);

/* bfloat16 storage (its 16 bits), computed in float32. */
void dsq_forward_bf16(const uint16_t *x, uint16_t *y, int64_t n, float lower, float upper, int bits,
                      int grid);
void dsq_backward_bf16(const uint16_t *g, const uint16_t *x, uint16_t *dx, int64_t n, float lower,
                       float upper, float alpha, int bits, int mode, int grid, double sums[3]);

/*
 * The scale (Delta) and zero point of the grid the kernels use, for n channels:
 * channel c has bounds lower[c * ls], upper[c * us] (a stride of 0 repeats a
 * per-tensor bound), used as sort_bounds says.
 */
void dsq_grid_params_f32(const float *lower, int64_t ls, const float *upper, int64_t us, int64_t n,
                         int bits, int grid, int sort_bounds, float *scale, float *zero_point);
void dsq_grid_params_f64(const double *lower, int64_t ls, const double *upper, int64_t us,
                         int64_t n, int bits, int grid, int sort_bounds, double *scale,
                         double *zero_point);

/* The fast float tanh the DSQ backward uses, exposed so that its error can be tested. */
void dsq_tanh_f32_array(const float *x, float *y, int64_t n);

/* The kernels work through a run in spans of this many elements: the backward's sums
 * are kept in the input's precision within a span, and bfloat16 is widened one span
 * at a time. A caller that cuts a run at multiples of it gets the same sums. */
#define DSQ_SPAN 1024

#ifdef __cplusplus
}
#endif

#endif /* DSQ_KERNELS_H */
