// Shared device helpers, prepended by kernels/_runtime.py to every .cu source before NVRTC compiles it.
//
// Storage types: float, double, __half, __nv_bfloat16. Arithmetic happens in Acc<T>::type: float for
// the 16- and 32-bit types, double for double (so the float64 gradchecks test the same code paths).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

// A block's dynamic shared memory as a T array (the emulator defines its own).
#ifndef DYN_SHARED
#define DYN_SHARED(T, name)                                          \
    extern __shared__ __align__(16) unsigned char name##_raw_[];     \
    T* name = reinterpret_cast<T*>(name##_raw_)
#endif

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// VEC contiguous elements moved as one 16-byte (or smaller) access; callers guarantee alignment.
template <typename T, int VEC> struct __align__(sizeof(T) * VEC) Vec { T v[VEC]; };

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float rsqrt_acc(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_acc(double x) { return 1.0 / sqrt(x); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }
template <typename A> __device__ __forceinline__ A qnan();
template <> __device__ __forceinline__ float qnan<float>() { return __int_as_float(0x7fffffff); }
template <> __device__ __forceinline__ double qnan<double>() { return __longlong_as_double(0x7fffffffffffffffLL); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the threadIdx.x dimension of a block whose blockDim.x is a multiple of 32 (<= 1024).
// Every thread of the block must call it (it has barriers when blockDim.x > 32); all get the total.
// `smem` holds 32 A per threadIdx.y row. The leading barrier makes back-to-back calls safe.
template <typename A> __device__ __forceinline__ A row_sum(A v, A* smem) {
    v = warp_sum(v);
    if (blockDim.x == 32) return v;
    A* s = smem + 32 * threadIdx.y;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) s[wid] = v;
    __syncthreads();
    v = (lane < nw) ? s[lane] : A(0);
    return warp_sum(v);  // every warp reduces the same 32 partials: no third barrier needed
}

template <typename A> __device__ __forceinline__ A row_max(A v, A* smem) {
    v = warp_max(v);
    if (blockDim.x == 32) return v;
    A* s = smem + 32 * threadIdx.y;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) s[wid] = v;
    __syncthreads();
    v = (lane < nw) ? s[lane] : neg_inf<A>();
    return warp_max(v);
}

// Online log-sum-exp state (running max m, sum s of exp(x - m)); merging handles -inf maxima.
template <typename A> struct Lse {
    A m, s;
    __device__ __forceinline__ void add(A x) {
        if (x > m) { s = s * exp_acc(m - x) + A(1); m = x; }  // exp(-inf) = 0 covers the first element
        else if (x > neg_inf<A>()) s += exp_acc(x - m);       // -inf adds 0 (and -inf - -inf is NaN)
        else if (x != x) { m = x; s = x; }                    // a NaN poisons the row, like PyTorch
    }
};

template <typename A> __device__ __forceinline__ void lse_merge(A& m, A& s, A m2, A s2) {
    const A mm = max(m, m2);
    if (mm == neg_inf<A>()) { m = mm; s = A(0); return; }
    s = s * exp_acc(m - mm) + s2 * exp_acc(m2 - mm);
    m = mm;
}

// Log-sum-exp over threadIdx.x (same rules as row_sum); every thread gets (max, sum).
template <typename A> __device__ __forceinline__ void row_lse(A& m, A& s, A* smem_m, A* smem_s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const A m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    if (blockDim.x == 32) return;
    A* sm = smem_m + 32 * threadIdx.y;
    A* ss = smem_s + 32 * threadIdx.y;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) { sm[wid] = m; ss[wid] = s; }
    __syncthreads();
    m = (lane < nw) ? sm[lane] : neg_inf<A>();
    s = (lane < nw) ? ss[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const A m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
}

// out[c] = sum over g < G of partial[g * N + c], in a fixed order (deterministic column reduction of
// per-block partial sums written by the backward kernels of bias_act and layer_norm).
template <typename T>
__global__ void col_reduce(const typename Acc<T>::type* __restrict__ partial, T* __restrict__ out, int G, i64 N) {
    typedef typename Acc<T>::type A;
    for (i64 c = blockIdx.x * (i64)blockDim.x + threadIdx.x; c < N; c += (i64)gridDim.x * blockDim.x) {
        A s = A(0);
        for (int g = 0; g < G; ++g) s += partial[(i64)g * N + c];
        out[c] = from_acc<T>(s);
    }
}
