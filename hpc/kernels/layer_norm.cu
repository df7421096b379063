// LayerNorm over the last dimension D of x [M, D]: y = (x - mean) * rstd * w + b, rstd = 1/sqrt(var + eps)
// (biased variance, like F.layer_norm). Statistics in Acc<T> (fp32 for bf16/fp16, fp64 for fp64);
// mean and rstd are saved ([M], Acc<T>) for the backward:
//   xhat = (x - mean) * rstd, gw = g * w
//   dx = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat)),  dw = sum_r g * xhat,  db = sum_r g
// w, b may be nullptr (no affine). One block per row; the row lives in registers (NPT per thread) when
// D <= NPT * blockDim.x, else the *_stream kernels re-read it.

template <typename T, int NPT>
__global__ void __launch_bounds__(512) ln_fwd_reg(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                           T* __restrict__ y, typename Acc<T>::type* __restrict__ mean_out,
                           typename Acc<T>::type* __restrict__ rstd_out, int D, typename Acc<T>::type eps) {
    typedef typename Acc<T>::type A;
    __shared__ A s1[32], s2[32];
    const i64 r = blockIdx.x;
    const T* row = x + r * (i64)D;
    A v[NPT];
    A sum = A(0);
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        v[j] = c < D ? to_acc(row[c]) : A(0);
        sum += v[j];
    }
    const A mean = row_sum(sum, s1) / A(D);
    A sq = A(0);
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        const A d = v[j] - mean;
        if (c < D) sq += d * d;  // two-pass variance from registers: no cancellation
    }
    const A rstd = rsqrt_acc(row_sum(sq, s2) / A(D) + eps);
    T* yrow = y + r * (i64)D;
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < D) {
            A o = (v[j] - mean) * rstd;
            if (w != nullptr) o *= to_acc(w[c]);
            if (b != nullptr) o += to_acc(b[c]);
            yrow[c] = from_acc<T>(o);
        }
    }
    if (threadIdx.x == 0) {
        mean_out[r] = mean;
        rstd_out[r] = rstd;
    }
}

template <typename T>
__global__ void __launch_bounds__(512) ln_fwd_stream(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                              T* __restrict__ y, typename Acc<T>::type* __restrict__ mean_out,
                              typename Acc<T>::type* __restrict__ rstd_out, int D, typename Acc<T>::type eps) {
    typedef typename Acc<T>::type A;
    __shared__ A s1[32], s2[32];
    const i64 r = blockIdx.x;
    const T* row = x + r * (i64)D;
    A sum = A(0);
    for (int c = threadIdx.x; c < D; c += blockDim.x) sum += to_acc(row[c]);
    const A mean = row_sum(sum, s1) / A(D);
    A sq = A(0);
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        const A d = to_acc(row[c]) - mean;
        sq += d * d;
    }
    const A rstd = rsqrt_acc(row_sum(sq, s2) / A(D) + eps);
    T* yrow = y + r * (i64)D;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        A o = (to_acc(row[c]) - mean) * rstd;
        if (w != nullptr) o *= to_acc(w[c]);
        if (b != nullptr) o += to_acc(b[c]);
        yrow[c] = from_acc<T>(o);
    }
    if (threadIdx.x == 0) {
        mean_out[r] = mean;
        rstd_out[r] = rstd;
    }
}

// Backward, persistent: block k handles rows k, k + gridDim.x, ...; each thread owns the same columns
// in every row, so it keeps its dw/db partial sums in registers and writes them once to
// pw/pb[blockIdx.x, :] (col_reduce then sums the gridDim.x partials in a fixed order: deterministic).
template <typename T, int NPT>
__global__ void __launch_bounds__(512) ln_bwd_reg(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ w,
                           const typename Acc<T>::type* __restrict__ mean, const typename Acc<T>::type* __restrict__ rstd,
                           T* __restrict__ gx, typename Acc<T>::type* __restrict__ pw,
                           typename Acc<T>::type* __restrict__ pb, i64 M, int D) {
    typedef typename Acc<T>::type A;
    __shared__ A s1[32], s2[32];
    A wv[NPT], dw[NPT], db[NPT];
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        wv[j] = (w != nullptr && c < D) ? to_acc(w[c]) : A(1);
        dw[j] = A(0);
        db[j] = A(0);
    }
    for (i64 r = blockIdx.x; r < M; r += gridDim.x) {
        const T* xrow = x + r * (i64)D;
        const T* grow = g + r * (i64)D;
        const A mu = mean[r], rs = rstd[r];
        A xh[NPT], gw[NPT];
        A a1 = A(0), a2 = A(0);
#pragma unroll
        for (int j = 0; j < NPT; ++j) {
            const int c = threadIdx.x + j * blockDim.x;
            if (c < D) {
                const A gv = to_acc(grow[c]);
                xh[j] = (to_acc(xrow[c]) - mu) * rs;
                gw[j] = gv * wv[j];
                dw[j] += gv * xh[j];
                db[j] += gv;
            } else {
                xh[j] = A(0);
                gw[j] = A(0);
            }
            a1 += gw[j] * xh[j];
            a2 += gw[j];
        }
        const A c1 = row_sum(a1, s1) / A(D), c2 = row_sum(a2, s2) / A(D);
        T* gxrow = gx + r * (i64)D;
#pragma unroll
        for (int j = 0; j < NPT; ++j) {
            const int c = threadIdx.x + j * blockDim.x;
            if (c < D) gxrow[c] = from_acc<T>(rs * (gw[j] - c2 - xh[j] * c1));
        }
    }
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < D) {
            if (pw != nullptr) pw[(i64)blockIdx.x * D + c] = dw[j];
            if (pb != nullptr) pb[(i64)blockIdx.x * D + c] = db[j];
        }
    }
}

// Any D: three passes over the row; the partial sums live in pw/pb[blockIdx.x, :] (zeroed by the
// caller), each element of which only this block and this thread touch, so += is race-free.
template <typename T>
__global__ void __launch_bounds__(512) ln_bwd_stream(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ w,
                              const typename Acc<T>::type* __restrict__ mean,
                              const typename Acc<T>::type* __restrict__ rstd, T* __restrict__ gx,
                              typename Acc<T>::type* __restrict__ pw, typename Acc<T>::type* __restrict__ pb,
                              i64 M, int D) {
    typedef typename Acc<T>::type A;
    __shared__ A s1[32], s2[32];
    for (i64 r = blockIdx.x; r < M; r += gridDim.x) {
        const T* xrow = x + r * (i64)D;
        const T* grow = g + r * (i64)D;
        const A mu = mean[r], rs = rstd[r];
        A a1 = A(0), a2 = A(0);
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            const A gv = to_acc(grow[c]);
            const A xh = (to_acc(xrow[c]) - mu) * rs;
            const A gw = gv * (w != nullptr ? to_acc(w[c]) : A(1));
            a1 += gw * xh;
            a2 += gw;
            if (pw != nullptr) pw[(i64)blockIdx.x * D + c] += gv * xh;
            if (pb != nullptr) pb[(i64)blockIdx.x * D + c] += gv;
        }
        const A c1 = row_sum(a1, s1) / A(D), c2 = row_sum(a2, s2) / A(D);
        T* gxrow = gx + r * (i64)D;
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            const A xh = (to_acc(xrow[c]) - mu) * rs;
            const A gw = to_acc(grow[c]) * (w != nullptr ? to_acc(w[c]) : A(1));
            gxrow[c] = from_acc<T>(rs * (gw - c2 - xh * c1));
        }
    }
}
