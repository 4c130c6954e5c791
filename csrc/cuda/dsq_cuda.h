/*
 * CUDA kernels of dsq_ext, behind a C interface over raw device pointers.
 *
 * A tensor is seen as `channels` runs of `inner` contiguous elements, each run
 * with one set of quantizer parameters (channels is 1 when every parameter is
 * per tensor). The kernels split every run into fixed chunks; the chunks, and
 * with them every reduced gradient, depend on the shape and dtype only, never
 * on the GPU, so the gradients are bit-identical run to run.
 *
 * Everything is enqueued on `stream`: no launcher synchronises or reads device
 * memory on the host. Launch errors are left for cudaGetLastError.
 */
#ifndef DSQ_CUDA_H
#define DSQ_CUDA_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Storage dtypes. float64 is computed in double, the others in float. */
enum dsq_cuda_dtype { DSQ_CUDA_F32 = 0, DSQ_CUDA_F64 = 1, DSQ_CUDA_F16 = 2, DSQ_CUDA_BF16 = 3 };

/* A quantizer parameter in the compute type (double for DSQ_CUDA_F64, else
 * float); channel c reads p[c * stride], so stride is 0 per tensor, 1 per channel. */
typedef struct {
    const void *p;
    int64_t stride;
} dsq_cuda_param;

/* Where a reduced gradient goes, in the parameter's own dtype (a dsq_cuda_dtype):
 * one value per channel when per_channel, else one value, the sum over all of x. */
typedef struct {
    void *p;
    int dtype;
    int per_channel;
} dsq_cuda_grad;

/* Number of chunks the backward splits x into; its partials buffer holds 3 doubles per chunk. */
int64_t dsq_cuda_chunks(int dtype, int64_t channels, int64_t inner);

/* The hard quantized value on the grid; the same for DSQ and uniform. sort_bounds and
 * grid (a dsq_grid): see Options in entry_points.h. */
void dsq_cuda_forward(int dtype, const void *x, void *y, int64_t channels, int64_t inner,
                      dsq_cuda_param lower, dsq_cuda_param upper, int bits, int sort_bounds,
                      int grid, cudaStream_t stream);

/*
 * One fused pass over (x, g): writes dx = g * dy/dx and the per-chunk sums of
 * g * dy/d{lower, upper, alpha} into partials (3 * dsq_cuda_chunks() doubles),
 * then a second kernel adds them up, per channel, in chunk order, into the
 * three gradients, each multiplied by grad_scale. mode is DSQ_MODE_DSQ or
 * DSQ_MODE_UNIFORM (dsq_math.h); in the uniform mode alpha.p and grad_alpha.p
 * may be NULL. grad_scale, sort_bounds and grid: see Options in entry_points.h.
 */
void dsq_cuda_backward(int dtype, int mode, const void *g, const void *x, void *dx,
                       int64_t channels, int64_t inner, dsq_cuda_param lower,
                       dsq_cuda_param upper, dsq_cuda_param alpha, int bits, int sort_bounds,
                       int grid, double grad_scale, double *partials,
                       dsq_cuda_grad grad_lower, dsq_cuda_grad grad_upper,
                       dsq_cuda_grad grad_alpha, cudaStream_t stream);

/* The scale and zero point of the grid the kernels use, for n channels (dsq_kernels.h's
 * dsq_grid_params_*): dtype DSQ_CUDA_F64 computes in double, the others in float; the
 * bounds and both outputs are device arrays of that type. */
void dsq_cuda_grid_params(int dtype, const void *lower, int64_t ls, const void *upper,
                          int64_t us, int64_t n, int bits, int grid, int sort_bounds, void *scale,
                          void *zero_point, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DSQ_CUDA_H */
