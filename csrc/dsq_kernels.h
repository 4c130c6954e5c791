/*
 * CPU kernels of dsq_ext: plain C11 over raw pointers and lengths.
 *
 * Each call handles one contiguous run of elements that share one set of
 * quantizer parameters (a whole tensor, one output channel, or a block of
 * either). Splitting the work into such runs, across threads, is the caller's
 * job (ops.cpp), so that the partition, and with it every reduced gradient, is
 * the same whatever the number of threads.
 */
#ifndef DSQ_KERNELS_H
#define DSQ_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* y = l + Delta * round_half_up((clip(x, l, u) - l) / Delta); the same for DSQ and uniform. */
void dsq_forward_f32(const float *x, float *y, int64_t n, float lower, float upper, int bits);
void dsq_forward_f64(const double *x, double *y, int64_t n, double lower, double upper, int bits);

/*
 * One fused pass over (x, g): writes dx = g * dy/dx and adds to sums[0..2]
 * the sums over the run of g * dy/dl, g * dy/du and g * dy/dalpha.
 * mode is DSQ_MODE_DSQ (1) or DSQ_MODE_UNIFORM (0, straight-through; alpha unused).
 * Partial sums are kept in the input's precision over at most DSQ_SUB_BLOCK
 * elements, then accumulated in double.
 */
void dsq_backward_f32(const float *g, const float *x, float *dx, int64_t n, float lower,
                      float upper, float alpha, int bits, int mode, double sums[3]);
void dsq_backward_f64(const double *g, const double *x, double *dx, int64_t n, double lower,
                      double upper, double alpha, int bits, int mode, double sums[3]);

/* bfloat16 storage (its 16 bits), computed in float32. */
void dsq_forward_bf16(const uint16_t *x, uint16_t *y, int64_t n, float lower, float upper, int bits);
void dsq_backward_bf16(const uint16_t *g, const uint16_t *x, uint16_t *dx, int64_t n, float lower,
                       float upper, float alpha, int bits, int mode, double sums[3]);

/* The fast float tanh the DSQ backward uses, exposed so that its error can be tested. */
void dsq_tanh_f32_array(const float *x, float *y, int64_t n);

#define DSQ_SUB_BLOCK 1024

#ifdef __cplusplus
}
#endif

#endif /* DSQ_KERNELS_H */
