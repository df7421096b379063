// One-launch optimizer steps over flat buffers (all parameters of a model in one tensor), the same
// update as torch.optim.Adam / AdamW / SGD. Scalars that depend on the step count (bias corrections)
// are computed on the host from a host-side counter, so nothing here makes the host wait.
// Grid-stride over VEC-element groups (VEC > 1 only when every buffer is 16-byte aligned), then a
// scalar tail for the last n % VEC elements.

template <typename A>
__device__ __forceinline__ void adam_one(A& p, A g, A& m, A& v, A lr, A beta1, A beta2, A eps, A wd, int adamw,
                                         A step_size, A sqrt_bc2) {
    if (wd != A(0)) {
        if (adamw) p = p * (A(1) - lr * wd);
        else g = g + wd * p;
    }
    // torch's lerp: weight w = 1 - beta1; m + w * (g - m) when w < 0.5, else g - (g - m) * (1 - w)
    const A wgt = A(1) - beta1;
    m = wgt < A(0.5) ? m + wgt * (g - m) : g - (g - m) * (A(1) - wgt);
    v = beta2 * v + (A(1) - beta2) * g * g;
    const A denom = sqrt(v) / sqrt_bc2 + eps;
    p = p - step_size * (m / denom);
}

template <typename T, int VEC>
__global__ void adam_step(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                          i64 n, T lr, T beta1, T beta2, T eps, T wd, int adamw, T step_size, T sqrt_bc2) {
    const i64 ng = n / VEC;
    const i64 tid = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = tid; i < ng; i += stride) {
        Vec<T, VEC> pv = reinterpret_cast<Vec<T, VEC>*>(p)[i];
        const Vec<T, VEC> gv = reinterpret_cast<const Vec<T, VEC>*>(g)[i];
        Vec<T, VEC> mv = reinterpret_cast<Vec<T, VEC>*>(m)[i];
        Vec<T, VEC> vv = reinterpret_cast<Vec<T, VEC>*>(v)[i];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            adam_one<T>(pv.v[j], gv.v[j], mv.v[j], vv.v[j], lr, beta1, beta2, eps, wd, adamw, step_size, sqrt_bc2);
        reinterpret_cast<Vec<T, VEC>*>(p)[i] = pv;
        reinterpret_cast<Vec<T, VEC>*>(m)[i] = mv;
        reinterpret_cast<Vec<T, VEC>*>(v)[i] = vv;
    }
    for (i64 i = ng * VEC + tid; i < n; i += stride)
        adam_one<T>(p[i], g[i], m[i], v[i], lr, beta1, beta2, eps, wd, adamw, step_size, sqrt_bc2);
}

template <typename A>
__device__ __forceinline__ void sgd_one(A& p, A g, A* buf, A lr, A momentum, A dampening, A wd, int nesterov,
                                        int first) {
    if (wd != A(0)) g = g + wd * p;
    if (buf != nullptr) {
        A b = first ? g : momentum * (*buf) + (A(1) - dampening) * g;
        *buf = b;
        g = nesterov ? g + momentum * b : b;
    }
    p = p - lr * g;
}

// buf == nullptr: plain SGD (momentum 0).
template <typename T, int VEC>
__global__ void sgd_step(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, i64 n, T lr, T momentum,
                         T dampening, T wd, int nesterov, int first) {
    const i64 ng = n / VEC;
    const i64 tid = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = tid; i < ng; i += stride) {
        Vec<T, VEC> pv = reinterpret_cast<Vec<T, VEC>*>(p)[i];
        const Vec<T, VEC> gv = reinterpret_cast<const Vec<T, VEC>*>(g)[i];
        Vec<T, VEC> bv;
        if (buf != nullptr) bv = reinterpret_cast<Vec<T, VEC>*>(buf)[i];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            sgd_one<T>(pv.v[j], gv.v[j], buf != nullptr ? &bv.v[j] : nullptr, lr, momentum, dampening, wd, nesterov,
                       first);
        reinterpret_cast<Vec<T, VEC>*>(p)[i] = pv;
        if (buf != nullptr) reinterpret_cast<Vec<T, VEC>*>(buf)[i] = bv;
    }
    for (i64 i = ng * VEC + tid; i < n; i += stride)
        sgd_one<T>(p[i], g[i], buf != nullptr ? buf + i : nullptr, lr, momentum, dampening, wd, nesterov, first);
}
