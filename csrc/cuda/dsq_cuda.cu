// CUDA kernels: loops over the inline math of dsq_math.h, the same functions
// the CPU kernels call. No ATen here, so this file compiles in seconds.
//
// Work split: each channel's run of `inner` elements is cut into chunks of
// kThreads * kUnroll 16-byte groups (4096 float32 or 16-bit elements, 2048
// float64). A block handles one chunk at a time; thread t takes groups
// t, t + kThreads, ... of it. The backward sums each thread's gradients in the
// compute type (16 elements at most, 8 for float64), combines
// them across the block in double in a fixed tree (warp shuffles, then shared
// memory), and writes one partial per chunk; a second kernel adds the
// partials per channel in a fixed order. Nothing depends on the number of
// SMs or on which block ran which chunk, and there are no atomics, so the
// reduced gradients are deterministic.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "../dsq_math.h"
#include "dsq_cuda.h"

namespace {

// Threads per block. Fixed: the order of the block reduction depends on it.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename S>
struct Sizes {
    static constexpr int kVec = 16 / int(sizeof(S));  // elements per 16-byte group
    // 16-byte groups per thread per chunk, all loaded before any is used; two
    // for the 16-bit types, whose eight elements a group already keep many registers busy.
    static constexpr int kUnroll = sizeof(S) == 2 ? 2 : 4;
    static constexpr int kChunk = kThreads * kUnroll * kVec;
    // Backward blocks per SM that the register budget must allow (4 caps a thread
    // at 64): no spills for these types; float64's double math would spill.
    static constexpr int kMinBlocks = sizeof(S) == 8 ? 1 : 4;
};

// Storage type S <-> compute type T. The 16-bit types round to nearest even,
// as the CPU path's c10::Half / c10::BFloat16 conversions do.
template <typename S>
struct Storage;
template <>
struct Storage<float> {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Storage<double> {
    typedef double T;
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Storage<__half> {
    typedef float T;
    static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Storage<__nv_bfloat16> {
    typedef float T;
    static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 store(float v) {
        return __float2bfloat16_rn(v);
    }
};

// A type, or an int, as a value: what dispatch_dtype and dispatch_grid pass to the
// generic lambdas of their callers, which take it back with decltype.
template <typename S>
struct Type {
    typedef S type;
};
template <int V>
using Int = std::integral_constant<int, V>;

// The one place a dsq_cuda_dtype becomes its storage type S: returns f(Type<S>()), or
// a default value for a number that is no dsq_cuda_dtype (ops_cuda.cpp passes none).
// Host and device code both call it. The pragma stops nvcc from warning that the
// host callers' lambdas are host functions: each instance runs on its caller's side.
#pragma nv_exec_check_disable
template <typename F>
__host__ __device__ __forceinline__ auto dispatch_dtype(int dtype, const F& f)
    -> decltype(f(Type<float>())) {
    switch (dtype) {
        case DSQ_CUDA_F32: return f(Type<float>());
        case DSQ_CUDA_F64: return f(Type<double>());
        case DSQ_CUDA_F16: return f(Type<__half>());
        case DSQ_CUDA_BF16: return f(Type<__nv_bfloat16>());
    }
    return decltype(f(Type<float>()))();
}

// Which element functions of dsq_math.h a chunk runs (its path): the free grid, the
// affine and symmetric grids (k.pinned), or either on x times k.xscale (halved bounds,
// for a u - l that overflows; rare). Chosen per channel, outside the element loops. A
// kernel inlines only its grid's two (see path_of), which share their coefficients, so
// the rare one adds a multiply, not registers.
enum Path { kFree = 0, kPinned = 1, kFreeScaled = 2, kPinnedScaled = 3 };

// dsq_math.h's functions for the compute type T.
template <typename T>
struct Math;
template <>
struct Math<float> {
    typedef dsq_coef_f32 Coef;
    typedef dsq_grad_f32 Grad;
    static __device__ __forceinline__ Coef make(float l, float u, float a, int bits, int grid) {
        return dsq_coef_make_f32(l, u, a, bits, grid);
    }
    template <int P>
    static __device__ __forceinline__ float forward(const Coef& k, float x) {
        if (P == kFree) return dsq_elem_forward_f32(k, x);
        if (P == kPinned) return dsq_elem_forward_pinned_f32(k, x);
        if (P == kFreeScaled) return dsq_elem_forward_f32(k, x * k.xscale) / k.xscale;
        return dsq_elem_forward_pinned_f32(k, x * k.xscale) / k.xscale;
    }
    template <int P>
    static __device__ __forceinline__ Grad backward(const Coef& k, int mode, float x, float g) {
        if (P == kFree) return dsq_elem_backward_f32(k, mode, x, g);
        if (P == kPinned) return dsq_elem_backward_pinned_f32(k, mode, x, g);
        if (P == kFreeScaled) return dsq_elem_backward_f32(k, mode, x * k.xscale, g);
        return dsq_elem_backward_pinned_f32(k, mode, x * k.xscale, g);
    }
    static __device__ __forceinline__ void grid_export(const Coef& k, float* scale, float* zp) {
        dsq_grid_export_f32(k, scale, zp);
    }
    static __device__ __forceinline__ bool sort_bounds(bool on, float* l, float* u) {
        return dsq_sort_bounds_f32(on, l, u);
    }
};
template <>
struct Math<double> {
    typedef dsq_coef_f64 Coef;
    typedef dsq_grad_f64 Grad;
    static __device__ __forceinline__ Coef make(double l, double u, double a, int bits,
                                                int grid) {
        return dsq_coef_make_f64(l, u, a, bits, grid);
    }
    template <int P>
    static __device__ __forceinline__ double forward(const Coef& k, double x) {
        if (P == kFree) return dsq_elem_forward_f64(k, x);
        if (P == kPinned) return dsq_elem_forward_pinned_f64(k, x);
        if (P == kFreeScaled) return dsq_elem_forward_f64(k, x * k.xscale) / k.xscale;
        return dsq_elem_forward_pinned_f64(k, x * k.xscale) / k.xscale;
    }
    template <int P>
    static __device__ __forceinline__ Grad backward(const Coef& k, int mode, double x,
                                                    double g) {
        if (P == kFree) return dsq_elem_backward_f64(k, mode, x, g);
        if (P == kPinned) return dsq_elem_backward_pinned_f64(k, mode, x, g);
        if (P == kFreeScaled) return dsq_elem_backward_f64(k, mode, x * k.xscale, g);
        return dsq_elem_backward_pinned_f64(k, mode, x * k.xscale, g);
    }
    static __device__ __forceinline__ void grid_export(const Coef& k, double* scale, double* zp) {
        dsq_grid_export_f64(k, scale, zp);
    }
    static __device__ __forceinline__ bool sort_bounds(bool on, double* l, double* u) {
        return dsq_sort_bounds_f64(on, l, u);
    }
};

template <typename S>
struct alignas(16) Vec {
    S v[Sizes<S>::kVec];
};

// One quantizer as the kernels read it: its parameters in the compute type T, each
// with its stride (dsq_cuda_param), and its options (Options, entry_points.h).
template <typename T>
struct Quantizer {
    const T* lower;
    const T* upper;
    const T* alpha;  // NULL in the uniform mode
    int64_t ls, us, as;
    bool sort_bounds;
    int grid;  // a dsq_grid
};

// Chunk t: its channel and where its elements are.
struct Chunk {
    int64_t channel;
    int64_t start;  // first element
    int len;
};

template <typename S>
__device__ __forceinline__ Chunk chunk_of(int64_t t, int64_t inner, int64_t channel_chunks) {
    const int64_t c = t / channel_chunks;
    const int64_t off = (t - c * channel_chunks) * Sizes<S>::kChunk;
    const int64_t rest = inner - off;
    return {c, c * inner + off, rest < Sizes<S>::kChunk ? int(rest) : Sizes<S>::kChunk};
}

// Channel c's coefficients; *swapped tells whether sort_bounds swapped its bounds.
template <typename T>
__device__ __forceinline__ typename Math<T>::Coef make_coef(const Quantizer<T>& q, int64_t c,
                                                            int bits, bool* swapped) {
    const T a = q.alpha ? q.alpha[c * q.as] : T(DSQ_ALPHA_MAX);
    T l = q.lower[c * q.ls], u = q.upper[c * q.us];
    *swapped = Math<T>::sort_bounds(q.sort_bounds, &l, &u);
    return Math<T>::make(l, u, a, bits, q.grid);
}

// The path a channel's chunks take in a kernel compiled for grid G (DSQ_GRID_FREE, or
// not). The free grid's kernels take kFree or kFreeScaled; the integer grids' take
// kPinned or kPinnedScaled, and kFree for a degenerate or NaN range (never scaled:
// an overflowing u - l is neither).
template <int G, typename Coef>
__device__ __forceinline__ int path_of(const Coef& k) {
    const bool scaled = k.xscale != decltype(k.xscale)(1);
    if (G == DSQ_GRID_FREE) return scaled ? kFreeScaled : kFree;
    if (!k.pinned) return kFree;
    return scaled ? kPinnedScaled : kPinned;
}

// One chunk of the forward, with the element functions of path P.
template <typename S, int P>
__device__ __forceinline__ void forward_chunk(const typename Math<typename Storage<S>::T>::Coef& k,
                                              const Chunk& ck, const S* __restrict__ x,
                                              S* __restrict__ y, bool vec_ok) {
    typedef typename Storage<S>::T T;
    typedef Storage<S> St;
    constexpr int V = Sizes<S>::kVec;
    const S* xs = x + ck.start;
    S* ys = y + ck.start;
    if (vec_ok && ck.len == Sizes<S>::kChunk) {
        Vec<S> v[Sizes<S>::kUnroll];
#pragma unroll
        for (int u = 0; u < Sizes<S>::kUnroll; ++u)
            v[u] = *reinterpret_cast<const Vec<S>*>(xs + (u * kThreads + threadIdx.x) * V);
#pragma unroll
        for (int u = 0; u < Sizes<S>::kUnroll; ++u) {
#pragma unroll
            for (int j = 0; j < V; ++j)
                v[u].v[j] = St::store(Math<T>::template forward<P>(k, St::load(v[u].v[j])));
            *reinterpret_cast<Vec<S>*>(ys + (u * kThreads + threadIdx.x) * V) = v[u];
        }
        return;
    }
    for (int e = threadIdx.x * V; e < ck.len; e += kThreads * V) {
        if (vec_ok && e + V <= ck.len) {
            Vec<S> v = *reinterpret_cast<const Vec<S>*>(xs + e);
#pragma unroll
            for (int j = 0; j < V; ++j)
                v.v[j] = St::store(Math<T>::template forward<P>(k, St::load(v.v[j])));
            *reinterpret_cast<Vec<S>*>(ys + e) = v;
        } else {
            for (int j = e; j < e + V && j < ck.len; ++j)
                ys[j] = St::store(Math<T>::template forward<P>(k, St::load(xs[j])));
        }
    }
}

// Both kernels loop over chunks (grid-stride), so the per-channel coefficients
// (divisions; a log and an exp for the backward) are derived once per block
// and channel, not once per chunk. G is DSQ_GRID_FREE or not (affine and
// symmetric share their element functions).
template <typename S, int G>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const S* __restrict__ x, S* __restrict__ y, int64_t inner,
                   int64_t channel_chunks, int64_t chunks, Quantizer<typename Storage<S>::T> q,
                   int bits, bool vec_ok) {
    typedef typename Storage<S>::T T;
    typename Math<T>::Coef k;
    int path = kFree;
    int64_t cur = -1;
    for (int64_t t = blockIdx.x; t < chunks; t += gridDim.x) {
        const Chunk ck = chunk_of<S>(t, inner, channel_chunks);
        if (ck.channel != cur) {
            bool swapped;
            k = make_coef<T>(q, ck.channel, bits, &swapped);
            path = path_of<G>(k);
            cur = ck.channel;
        }
        if (G == DSQ_GRID_FREE) {
            if (path == kFree)
                forward_chunk<S, kFree>(k, ck, x, y, vec_ok);
            else
                forward_chunk<S, kFreeScaled>(k, ck, x, y, vec_ok);
        } else {
            if (path == kPinned)
                forward_chunk<S, kPinned>(k, ck, x, y, vec_ok);
            else if (path == kPinnedScaled)
                forward_chunk<S, kPinnedScaled>(k, ck, x, y, vec_ok);
            else
                forward_chunk<S, kFree>(k, ck, x, y, vec_ok);
        }
    }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sums s[0..2] over the block in a fixed order; the result is valid in thread 0.
// Every thread of the block must call it.
__device__ __forceinline__ void block_sum3(double s[3]) {
    __shared__ double part[3][kWarps];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        s[i] = warp_sum(s[i]);
        if (lane == 0) part[i][warp] = s[i];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int i = 0; i < 3; ++i) s[i] = warp_sum(lane < kWarps ? part[i][lane] : 0.0);
    }
    // part is reused by the block's next call.
    __syncthreads();
}

// The thread's share of one chunk: dx for its elements, and their gradient sums
// added to sl, su, sa in element order (the same order on the vector and the
// scalar path, so the alignment of x never changes a sum).
template <typename S, int MODE, int P>
__device__ __forceinline__ void backward_elem(const typename Math<typename Storage<S>::T>::Coef& k,
                                              S xv, S gv, S* dx, typename Storage<S>::T& sl,
                                              typename Storage<S>::T& su,
                                              typename Storage<S>::T& sa) {
    typedef typename Storage<S>::T T;
    const typename Math<T>::Grad d =
        Math<T>::template backward<P>(k, MODE, Storage<S>::load(xv), Storage<S>::load(gv));
    *dx = Storage<S>::store(d.dx);
    sl += d.dl;
    su += d.du;
    sa += d.da;
}

// The thread's share of one chunk of the backward, with the element functions of path P.
template <typename S, int MODE, int P>
__device__ __forceinline__ void backward_chunk(
    const typename Math<typename Storage<S>::T>::Coef& k, const Chunk& ck,
    const S* __restrict__ g, const S* __restrict__ x, S* __restrict__ dx, bool vec_ok,
    typename Storage<S>::T& sl, typename Storage<S>::T& su, typename Storage<S>::T& sa) {
    constexpr int V = Sizes<S>::kVec;
    const S* xs = x + ck.start;
    const S* gs = g + ck.start;
    S* ds = dx + ck.start;
    if (vec_ok && ck.len == Sizes<S>::kChunk) {
        Vec<S> xv[Sizes<S>::kUnroll], gv[Sizes<S>::kUnroll];
#pragma unroll
        for (int u = 0; u < Sizes<S>::kUnroll; ++u) {
            const int e = (u * kThreads + threadIdx.x) * V;
            xv[u] = *reinterpret_cast<const Vec<S>*>(xs + e);
            gv[u] = *reinterpret_cast<const Vec<S>*>(gs + e);
        }
#pragma unroll
        for (int u = 0; u < Sizes<S>::kUnroll; ++u) {
            Vec<S> dv;
#pragma unroll
            for (int j = 0; j < V; ++j)
                backward_elem<S, MODE, P>(k, xv[u].v[j], gv[u].v[j], &dv.v[j], sl, su, sa);
            *reinterpret_cast<Vec<S>*>(ds + (u * kThreads + threadIdx.x) * V) = dv;
        }
        return;
    }
    for (int e = threadIdx.x * V; e < ck.len; e += kThreads * V) {
        if (vec_ok && e + V <= ck.len) {
            const Vec<S> xv = *reinterpret_cast<const Vec<S>*>(xs + e);
            const Vec<S> gv = *reinterpret_cast<const Vec<S>*>(gs + e);
            Vec<S> dv;
#pragma unroll
            for (int j = 0; j < V; ++j)
                backward_elem<S, MODE, P>(k, xv.v[j], gv.v[j], &dv.v[j], sl, su, sa);
            *reinterpret_cast<Vec<S>*>(ds + e) = dv;
        } else {
            for (int j = e; j < e + V && j < ck.len; ++j)
                backward_elem<S, MODE, P>(k, xs[j], gs[j], &ds[j], sl, su, sa);
        }
    }
}

template <typename S, int MODE, int G>
__global__ void __launch_bounds__(kThreads, Sizes<S>::kMinBlocks)
    backward_kernel(const S* __restrict__ g, const S* __restrict__ x, S* __restrict__ dx,
                    int64_t inner, int64_t channel_chunks, int64_t chunks,
                    Quantizer<typename Storage<S>::T> q, int bits, bool vec_ok,
                    double* __restrict__ partials) {
    typedef typename Storage<S>::T T;
    typename Math<T>::Coef k;
    bool swapped = false;
    int path = kFree;
    int64_t cur = -1;
    for (int64_t t = blockIdx.x; t < chunks; t += gridDim.x) {
        const Chunk ck = chunk_of<S>(t, inner, channel_chunks);
        if (ck.channel != cur) {
            k = make_coef<T>(q, ck.channel, bits, &swapped);
            path = path_of<G>(k);
            cur = ck.channel;
        }
        T sl = 0, su = 0, sa = 0;
        if (G == DSQ_GRID_FREE) {
            if (path == kFree)
                backward_chunk<S, MODE, kFree>(k, ck, g, x, dx, vec_ok, sl, su, sa);
            else
                backward_chunk<S, MODE, kFreeScaled>(k, ck, g, x, dx, vec_ok, sl, su, sa);
        } else {
            if (path == kPinned)
                backward_chunk<S, MODE, kPinned>(k, ck, g, x, dx, vec_ok, sl, su, sa);
            else if (path == kPinnedScaled)
                backward_chunk<S, MODE, kPinnedScaled>(k, ck, g, x, dx, vec_ok, sl, su, sa);
            else
                backward_chunk<S, MODE, kFree>(k, ck, g, x, dx, vec_ok, sl, su, sa);
        }
        double s[3] = {double(sl), double(su), double(sa)};
        block_sum3(s);
        if (threadIdx.x == 0) {
            // Slot 0 is always the parameter `lower`: a swapped lower was used as the upper.
            partials[3 * t + 0] = swapped ? s[1] : s[0];
            partials[3 * t + 1] = swapped ? s[0] : s[1];
            partials[3 * t + 2] = s[2];
        }
    }
}

// grid_params: one thread per channel, the kernels' own coefficients.
template <typename T>
__global__ void grid_params_kernel(const T* __restrict__ lower, int64_t ls,
                                   const T* __restrict__ upper, int64_t us, int64_t n, int bits,
                                   int grid, bool sort_bounds, T* __restrict__ scale,
                                   T* __restrict__ zero_point) {
    for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < n;
         c += int64_t(gridDim.x) * blockDim.x) {
        T l = lower[c * ls], u = upper[c * us];
        Math<T>::sort_bounds(sort_bounds, &l, &u);
        const typename Math<T>::Coef k = Math<T>::make(l, u, T(DSQ_ALPHA_MAX), bits, grid);
        Math<T>::grid_export(k, scale + c, zero_point + c);
    }
}

// Where the backward's three reduced gradients go (lower, upper, alpha).
struct ReducedGrads {
    dsq_cuda_grad g[3];
};

__device__ __forceinline__ void store_grad(const dsq_cuda_grad& g, int64_t i, double v) {
    // Through float for the 16-bit types, as the CPU path's double -> Half/BFloat16 copy does.
    dispatch_dtype(g.dtype, [&](auto type) {
        typedef typename decltype(type)::type S;
        static_cast<S*>(g.p)[i] = Storage<S>::store(typename Storage<S>::T(v));
    });
}

// Output block b < pc_blocks sums channel b's chunk partials into the
// per-channel gradients; the block after them, if any, sums every chunk into
// the per-tensor gradients (a per-tensor parameter next to per-channel ones).
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const double* __restrict__ partials, int64_t channel_chunks, int64_t chunks,
                  int64_t pc_blocks, int64_t out_blocks, double scale, ReducedGrads grads) {
    for (int64_t b = blockIdx.x; b < out_blocks; b += gridDim.x) {
        const bool pc = b < pc_blocks;
        const int64_t begin = pc ? b * channel_chunks : 0;
        const int64_t end = pc ? begin + channel_chunks : chunks;
        double s[3] = {0.0, 0.0, 0.0};
        for (int64_t t = begin + threadIdx.x; t < end; t += kThreads) {
            s[0] += partials[3 * t + 0];
            s[1] += partials[3 * t + 1];
            s[2] += partials[3 * t + 2];
        }
        block_sum3(s);
        if (threadIdx.x == 0) {
            for (int i = 0; i < 3; ++i) {
                const dsq_cuda_grad& g = grads.g[i];
                if (g.p != nullptr && (g.per_channel != 0) == pc)
                    store_grad(g, pc ? b : 0, s[i] * scale);
            }
        }
    }
}

// Enough blocks to fill the GPU once; more would only re-derive coefficients.
// Which block runs which chunk changes no result.
int launch_blocks(int per_sm, int64_t work) {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        sms = 0;
    const int64_t full = int64_t(sms > 0 ? sms : 1) * per_sm;
    return int(work < full ? work : full);
}

template <typename Kernel>
int blocks_per_sm(Kernel kernel) {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess)
        n = 0;
    return n > 0 ? n : 1;
}

template <typename S>
int64_t chunks_per_channel(int64_t inner) {
    return (inner + Sizes<S>::kChunk - 1) / Sizes<S>::kChunk;
}

// The 16-byte path needs every chunk to start on a 16-byte boundary in every array.
template <typename S>
bool aligned(int64_t channels, int64_t inner, const void* a, const void* b, const void* c) {
    const uintptr_t bits = uintptr_t(a) | uintptr_t(b) | uintptr_t(c);
    return bits % 16 == 0 && (channels == 1 || inner % Sizes<S>::kVec == 0);
}

template <typename T>
Quantizer<T> make_quantizer(dsq_cuda_param l, dsq_cuda_param u, dsq_cuda_param a,
                            int sort_bounds, int grid) {
    return {static_cast<const T*>(l.p), static_cast<const T*>(u.p), static_cast<const T*>(a.p),
            l.stride, u.stride, a.stride, sort_bounds != 0, grid};
}

// The kernels are compiled twice per dtype (and mode): for the free grid, whose loops
// are the only ones it runs, and for the affine and symmetric grids, which share theirs.
constexpr int kPinnedGrids = DSQ_GRID_AFFINE;

// Calls f(Int<G>()) with G the grid whose kernels serve `grid`.
template <typename F>
void dispatch_grid(int grid, const F& f) {
    if (grid == DSQ_GRID_FREE)
        f(Int<DSQ_GRID_FREE>());
    else
        f(Int<kPinnedGrids>());
}

template <typename S, int G>
void forward(const void* x, void* y, int64_t channels, int64_t inner, dsq_cuda_param lower,
             dsq_cuda_param upper, int bits, int sort_bounds, int grid, cudaStream_t stream) {
    typedef typename Storage<S>::T T;
    const int64_t channel_chunks = chunks_per_channel<S>(inner);
    const int64_t chunks = channels * channel_chunks;
    if (chunks <= 0) return;
    // Occupancy of the first device used; it only sizes the launch.
    static const int per_sm = blocks_per_sm(forward_kernel<S, G>);
    const int blocks = launch_blocks(per_sm, chunks);
    forward_kernel<S, G><<<blocks, kThreads, 0, stream>>>(
        static_cast<const S*>(x), static_cast<S*>(y), inner, channel_chunks, chunks,
        make_quantizer<T>(lower, upper, dsq_cuda_param{nullptr, 0}, sort_bounds, grid), bits,
        aligned<S>(channels, inner, x, y, y));
}

template <typename S, int MODE, int G>
void backward(const void* g, const void* x, void* dx, int64_t channels, int64_t inner,
              dsq_cuda_param lower, dsq_cuda_param upper, dsq_cuda_param alpha, int bits,
              int sort_bounds, int grid, double scale, double* partials,
              const ReducedGrads& grads, cudaStream_t stream) {
    typedef typename Storage<S>::T T;
    const int64_t channel_chunks = chunks_per_channel<S>(inner);
    const int64_t chunks = channels * channel_chunks;
    if (chunks <= 0) return;
    static const int per_sm = blocks_per_sm(backward_kernel<S, MODE, G>);
    const int blocks = launch_blocks(per_sm, chunks);
    backward_kernel<S, MODE, G><<<blocks, kThreads, 0, stream>>>(
        static_cast<const S*>(g), static_cast<const S*>(x), static_cast<S*>(dx), inner,
        channel_chunks, chunks, make_quantizer<T>(lower, upper, alpha, sort_bounds, grid), bits,
        aligned<S>(channels, inner, g, x, dx), partials);

    bool any_pc = false, any_pt = false;
    for (const dsq_cuda_grad& gr : grads.g) {
        if (gr.p == nullptr) continue;
        any_pc |= gr.per_channel != 0;
        any_pt |= gr.per_channel == 0;
    }
    const int64_t pc_blocks = any_pc ? channels : 0;
    const int64_t out_blocks = pc_blocks + (any_pt ? 1 : 0);
    if (out_blocks == 0) return;
    static const int reduce_per_sm = blocks_per_sm(reduce_kernel);
    const int reduce_blocks = launch_blocks(reduce_per_sm, out_blocks);
    reduce_kernel<<<reduce_blocks, kThreads, 0, stream>>>(partials, channel_chunks, chunks,
                                                          pc_blocks, out_blocks, scale, grads);
}

template <typename T>
void grid_params(const void* lower, int64_t ls, const void* upper, int64_t us, int64_t n,
                 int bits, int grid, int sort_bounds, void* scale, void* zero_point,
                 cudaStream_t stream) {
    if (n <= 0) return;
    const int blocks = int(n / kThreads + 1 < 1024 ? n / kThreads + 1 : 1024);
    grid_params_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(lower), ls, static_cast<const T*>(upper), us, n, bits, grid,
        sort_bounds != 0, static_cast<T*>(scale), static_cast<T*>(zero_point));
}

}  // namespace

extern "C" {

int64_t dsq_cuda_chunks(int dtype, int64_t channels, int64_t inner) {
    return dispatch_dtype(dtype, [&](auto type) -> int64_t {
        return channels * chunks_per_channel<typename decltype(type)::type>(inner);
    });
}

void dsq_cuda_forward(int dtype, const void* x, void* y, int64_t channels, int64_t inner,
                      dsq_cuda_param lower, dsq_cuda_param upper, int bits, int sort_bounds,
                      int grid, cudaStream_t stream) {
    dispatch_dtype(dtype, [&](auto type) {
        typedef typename decltype(type)::type S;
        dispatch_grid(grid, [&](auto g) {
            forward<S, decltype(g)::value>(x, y, channels, inner, lower, upper, bits,
                                           sort_bounds, grid, stream);
        });
    });
}

void dsq_cuda_backward(int dtype, int mode, const void* g, const void* x, void* dx,
                       int64_t channels, int64_t inner, dsq_cuda_param lower,
                       dsq_cuda_param upper, dsq_cuda_param alpha, int bits, int sort_bounds,
                       int grid, double grad_scale, double* partials, dsq_cuda_grad grad_lower,
                       dsq_cuda_grad grad_upper, dsq_cuda_grad grad_alpha, cudaStream_t stream) {
    const ReducedGrads grads = {{grad_lower, grad_upper, grad_alpha}};
    dispatch_dtype(dtype, [&](auto type) {
        typedef typename decltype(type)::type S;
        dispatch_grid(grid, [&](auto gk) {
            constexpr int G = decltype(gk)::value;
            if (mode == DSQ_MODE_DSQ)
                backward<S, DSQ_MODE_DSQ, G>(g, x, dx, channels, inner, lower, upper, alpha,
                                             bits, sort_bounds, grid, grad_scale, partials,
                                             grads, stream);
            else
                backward<S, DSQ_MODE_UNIFORM, G>(g, x, dx, channels, inner, lower, upper, alpha,
                                                 bits, sort_bounds, grid, grad_scale, partials,
                                                 grads, stream);
        });
    });
}

void dsq_cuda_grid_params(int dtype, const void* lower, int64_t ls, const void* upper,
                          int64_t us, int64_t n, int bits, int grid, int sort_bounds, void* scale,
                          void* zero_point, cudaStream_t stream) {
    // In dtype's compute type: double for DSQ_CUDA_F64, float for the others.
    dispatch_dtype(dtype, [&](auto type) {
        grid_params<typename Storage<typename decltype(type)::type>::T>(
            lower, ls, upper, us, n, bits, grid, sort_bounds, scale, zero_point, stream);
    });
}

}  // extern "C"
