// Fused bias + activation: y = act(x + b), b broadcast over the last dimension N of x ([M, N]).
// ACT: 0 = ReLU, 1 = GELU (erf form, F.gelu), 2 = GELU (tanh form, F.gelu(approximate="tanh")).
// The sum x + b and the activation are computed in Acc<T> (fp32 for bf16/fp16), rounded once on store.

__device__ __forceinline__ float erf_acc(float x) { return erff(x); }
__device__ __forceinline__ double erf_acc(double x) { return erf(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

template <int ACT, typename A> __device__ __forceinline__ A act_f(A z) {
    if (ACT == 0) return z < A(0) ? A(0) : z;  // NaN stays NaN, like torch.relu
    if (ACT == 1) return A(0.5) * z * (A(1) + erf_acc(z * A(0.70710678118654752440)));
    const A u = A(0.79788456080286535588) * (z + A(0.044715) * z * z * z);
    return A(0.5) * z * (A(1) + tanh_acc(u));
}

// d act / dz
template <int ACT, typename A> __device__ __forceinline__ A act_d(A z) {
    if (ACT == 0) return z > A(0) ? A(1) : A(0);  // torch: grad * (y > 0)
    if (ACT == 1) {
        const A cdf = A(0.5) * (A(1) + erf_acc(z * A(0.70710678118654752440)));
        const A pdf = A(0.39894228040143267794) * exp_acc(A(-0.5) * z * z);
        return cdf + z * pdf;
    }
    const A k = A(0.79788456080286535588), c = A(0.044715);
    const A t = tanh_acc(k * (z + c * z * z * z));
    return A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * k * (A(1) + A(3) * c * z * z);
}

// Grid-stride over VEC-element groups; VEC > 1 only when N % VEC == 0 and x, y, b are 16-byte aligned
// (the wrapper checks), so a group never straddles a row and its bias entries are contiguous.
template <typename T, int ACT, int VEC>
__global__ void bias_act_fwd(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y, i64 n, i64 N,
                             int has_bias) {
    typedef typename Acc<T>::type A;
    const i64 ngroups = n / VEC;
    const Vec<T, VEC>* xv = reinterpret_cast<const Vec<T, VEC>*>(x);
    Vec<T, VEC>* yv = reinterpret_cast<Vec<T, VEC>*>(y);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < ngroups; i += (i64)gridDim.x * blockDim.x) {
        const Vec<T, VEC> in = xv[i];
        const i64 c0 = (i * VEC) % N;
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            A z = to_acc(in.v[j]);
            if (has_bias) z += to_acc(b[c0 + j]);
            out.v[j] = from_acc<T>(act_f<ACT>(z));
        }
        yv[i] = out;
    }
}

// Backward: gx = g * act'(x + b), and per-block partial column sums of gx for the bias gradient.
// Block (bx, by), bx * by <= 1024, by a power of two: threadIdx.x walks columns (coalesced),
// threadIdx.y and blockIdx.y stride over rows. partial is [gridDim.y, N] (nullptr: no bias grad);
// col_reduce sums it in a fixed order, so the bias gradient is deterministic.
template <typename T, int ACT>
__global__ void bias_act_bwd(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ b,
                             T* __restrict__ gx, typename Acc<T>::type* __restrict__ partial, i64 M, i64 N,
                             int has_bias) {
    typedef typename Acc<T>::type A;
    __shared__ A red[1024];
    const i64 c = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    A acc = A(0);
    if (c < N) {
        const A bc = has_bias ? to_acc(b[c]) : A(0);
#pragma unroll 4
        for (i64 r = blockIdx.y * (i64)blockDim.y + threadIdx.y; r < M; r += (i64)gridDim.y * blockDim.y) {
            const i64 k = r * N + c;
            const A d = to_acc(g[k]) * act_d<ACT>(to_acc(x[k]) + bc);
            gx[k] = from_acc<T>(d);
            acc += d;
        }
    }
    if (partial == nullptr) return;  // uniform across the block: no barrier is skipped by some threads only
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    red[tid] = acc;
    __syncthreads();
    for (int s = blockDim.y >> 1; s > 0; s >>= 1) {
        if (threadIdx.y < s) red[tid] += red[tid + s * blockDim.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && c < N) partial[(i64)blockIdx.y * N + c] = red[threadIdx.x];
}
