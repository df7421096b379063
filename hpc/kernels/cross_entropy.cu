// Softmax cross-entropy over rows of logits [B, C] with class-index targets, ignore_index and label
// smoothing s (F.cross_entropy semantics):
//   loss_r = lse_r - (1 - s) * x[r, t_r] - (s / C) * sum_c x[r, c]           (0 when t_r == ignore_index)
//   dloss_r / dx[r, c] = softmax_c - (1 - s) * [c == t_r] - s / C            (0 when ignored)
// One block per row. The loss and the gradient come out of the same kernel: the row is read once from
// device memory (into registers: NPT values per thread) and the gradient written once, times
// scale[r * scale_stride] (1/count for 'mean', 1 for 'sum' in the forward; the upstream gradient when
// recomputed in backward). A target outside [0, C) that is not ignore_index gives a NaN loss and a NaN
// gradient row (PyTorch raises instead; a device-side error here would need a sync to report).
// Unused outputs are nullptr: loss (backward recompute), grad (no gradient wanted).

template <typename T, typename A>
__device__ __forceinline__ void ce_epilogue(const T* __restrict__ row, i64 r, int C, i64 t, i64 ignore_index,
                                            A smoothing, A m, A s, A sx, A* __restrict__ loss,
                                            T* __restrict__ grad, const A* __restrict__ scale, i64 scale_stride,
                                            bool& ignored, bool& bad, A& gscale, A& inv_s) {
    ignored = (t == ignore_index);
    bad = !ignored && (t < 0 || t >= C);
    if (loss != nullptr && threadIdx.x == 0) {
        A l = A(0);
        if (bad) l = qnan<A>();
        else if (!ignored) {
            const A lse = m + log_acc(s);
            l = lse - (A(1) - smoothing) * to_acc(row[t]) - (smoothing / A(C)) * sx;
        }
        loss[r] = l;
    }
    gscale = (grad == nullptr || ignored) ? A(0) : (bad ? qnan<A>() : scale[r * scale_stride]);
    inv_s = A(1) / s;
}

template <typename A> __device__ __forceinline__ A ce_grad(A x, A m, A inv_s, int c, i64 t, A smoothing, int C) {
    const A p = exp_acc(x - m) * inv_s;
    return p - smoothing / A(C) - (c == t ? A(1) - smoothing : A(0));
}

// Row held in registers: C <= NPT * blockDim.x.
template <typename T, int NPT>
__global__ void __launch_bounds__(512) ce_fwd_reg(const T* __restrict__ logits, const i64* __restrict__ target, int C,
                           i64 ignore_index, typename Acc<T>::type smoothing, typename Acc<T>::type* __restrict__ loss,
                           T* __restrict__ grad, const typename Acc<T>::type* __restrict__ scale, i64 scale_stride) {
    typedef typename Acc<T>::type A;
    __shared__ A s1[32], s2[32];
    const i64 r = blockIdx.x;
    const T* row = logits + r * (i64)C;
    A v[NPT];
    A m = neg_inf<A>(), sx = A(0);
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        v[j] = c < C ? to_acc(row[c]) : neg_inf<A>();
        if (c < C) { m = max(m, v[j]); sx += v[j]; }
    }
    m = row_max(m, s1);
    A s = A(0);
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < C) s += exp_acc(v[j] - m);
    }
    s = row_sum(s, s1);
    sx = row_sum(sx, s2);
    const i64 t = target[r];
    bool ignored, bad;
    A gscale, inv_s;
    ce_epilogue(row, r, C, t, ignore_index, smoothing, m, s, sx, loss, grad, scale, scale_stride, ignored, bad,
                gscale, inv_s);
    if (grad == nullptr) return;
    T* grow = grad + r * (i64)C;
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < C) grow[c] = from_acc<T>(ignored ? A(0) : ce_grad(v[j], m, inv_s, c, t, smoothing, C) * gscale);
    }
}

// Any C: one streaming pass with an online log-sum-exp, then a second pass for the gradient (which
// usually finds the row in L2).
template <typename T>
__global__ void __launch_bounds__(512) ce_fwd_stream(const T* __restrict__ logits, const i64* __restrict__ target, int C,
                              i64 ignore_index, typename Acc<T>::type smoothing,
                              typename Acc<T>::type* __restrict__ loss, T* __restrict__ grad,
                              const typename Acc<T>::type* __restrict__ scale, i64 scale_stride) {
    typedef typename Acc<T>::type A;
    __shared__ A s1[32], s2[32], s3[32];
    const i64 r = blockIdx.x;
    const T* row = logits + r * (i64)C;
    Lse<A> st;
    st.m = neg_inf<A>();
    st.s = A(0);
    A sx = A(0);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const A x = to_acc(row[c]);
        st.add(x);
        sx += x;
    }
    A m = st.m, s = st.s;
    row_lse(m, s, s1, s2);
    sx = row_sum(sx, s3);
    const i64 t = target[r];
    bool ignored, bad;
    A gscale, inv_s;
    ce_epilogue(row, r, C, t, ignore_index, smoothing, m, s, sx, loss, grad, scale, scale_stride, ignored, bad,
                gscale, inv_s);
    if (grad == nullptr) return;
    T* grow = grad + r * (i64)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        grow[c] = from_acc<T>(ignored ? A(0) : ce_grad(to_acc(row[c]), m, inv_s, c, t, smoothing, C) * gscale);
}

// Rows too long for registers but short enough for shared memory (C * sizeof(T) bytes of dynamic shared
// memory, up to ~227 KB on Hopper): the row is copied there on its one read from device memory, and the
// later passes (sum of exp, gradient) read shared memory. Costs occupancy (one or two blocks per SM).
template <typename T>
__global__ void __launch_bounds__(512) ce_fwd_smem(const T* __restrict__ logits, const i64* __restrict__ target,
                                                   int C, i64 ignore_index, typename Acc<T>::type smoothing,
                                                   typename Acc<T>::type* __restrict__ loss, T* __restrict__ grad,
                                                   const typename Acc<T>::type* __restrict__ scale, i64 scale_stride) {
    typedef typename Acc<T>::type A;
    DYN_SHARED(T, buf);
    __shared__ A s1[32], s2[32];
    const i64 r = blockIdx.x;
    const T* row = logits + r * (i64)C;
    A m = neg_inf<A>(), sx = A(0);
#pragma unroll 8
    for (int c = threadIdx.x; c < C; c += blockDim.x) {  // plain loads: many in flight per thread
        const T xv = row[c];
        buf[c] = xv;
        const A x = to_acc(xv);
        m = max(m, x);
        sx += x;
    }
    m = row_max(m, s1);  // its barriers also make buf visible to the whole block
    A s = A(0);
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += exp_acc(to_acc(buf[c]) - m);
    s = row_sum(s, s1);
    sx = row_sum(sx, s2);
    const i64 t = target[r];
    bool ignored, bad;
    A gscale, inv_s;
    ce_epilogue(row, r, C, t, ignore_index, smoothing, m, s, sx, loss, grad, scale, scale_stride, ignored, bad,
                gscale, inv_s);
    if (grad == nullptr) return;
    T* grow = grad + r * (i64)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        grow[c] = from_acc<T>(ignored ? A(0) : ce_grad(to_acc(buf[c]), m, inv_s, c, t, smoothing, C) * gscale);
}

// g *= s[0], in place, unless s[0] == 1 (the usual loss.backward()): the test runs on the device, so the
// common case costs one launch and no pass over g, and the host never waits for the value.
template <typename T>
__global__ void scale_inplace(T* __restrict__ g, i64 n, const typename Acc<T>::type* __restrict__ s) {
    typedef typename Acc<T>::type A;
    const A sv = s[0];
    if (sv == A(1)) return;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        g[i] = from_acc<T>(to_acc(g[i]) * sv);
}
