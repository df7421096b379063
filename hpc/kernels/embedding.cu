// Embedding: out[i, :] = w[idx[i], :] for n indices into w [V, D]; backward scatter-adds g [n, D] into
// gw [V, D]. An index outside [0, V) gives a NaN row forward and is skipped backward (PyTorch raises;
// reporting it from the device would need a sync).

// Grid-stride over VEC-element groups of the output; VEC > 1 only when D % VEC == 0 and w, out are
// 16-byte aligned (the wrapper checks), so a group never straddles a row.
template <typename T, int VEC>
__global__ void emb_fwd(const i64* __restrict__ idx, const T* __restrict__ w, T* __restrict__ out, i64 n, i64 V,
                        i64 D) {
    typedef typename Acc<T>::type A;
    const i64 Dg = D / VEC;
    const i64 total = n * Dg;
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / Dg, dg = e - i * Dg;
        const i64 row = idx[i];
        Vec<T, VEC> val;
        if (row >= 0 && row < V) {
            val = reinterpret_cast<const Vec<T, VEC>*>(w + row * D)[dg];
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) val.v[j] = from_acc<T>(qnan<A>());
        }
        reinterpret_cast<Vec<T, VEC>*>(out + i * D)[dg] = val;
    }
}

// Non-deterministic backward: float atomics into acc [V, D] of Acc<T> (the caller converts to T when
// T is a 16-bit type). Summation order depends on scheduling, so results vary in the last bits.
template <typename T>
__global__ void emb_bwd_atomic(const i64* __restrict__ idx, const T* __restrict__ g,
                               typename Acc<T>::type* __restrict__ acc, i64 n, i64 V, i64 D) {
    const i64 total = n * D;
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / D, d = e - i * D;
        const i64 row = idx[i];
        if (row >= 0 && row < V) atomicAdd(acc + row * D + d, to_acc(g[e]));
    }
}

// Deterministic backward over indices sorted stably (sorted[p] = idx[perm[p]]): one warp per sorted
// position p that starts a segment of equal indices sums that segment's gradient rows in position
// order (fixed, so bitwise reproducible) in Acc<T> registers, CH columns per lane per pass, and writes
// gw[row, :] once. No atomics: each row of gw has exactly one writer. gw rows not indexed keep the
// zeros the caller allocated. A very long segment (one hot index) is summed by one warp: correct, but
// the tail of the launch waits for it.
template <typename T, int CH>
__global__ void emb_bwd_sorted(const i64* __restrict__ sorted, const i64* __restrict__ perm,
                               const T* __restrict__ g, T* __restrict__ gw, i64 n, i64 V, i64 D) {
    typedef typename Acc<T>::type A;
    const int lane = threadIdx.x & 31;
    const i64 warp = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 p = warp; p < n; p += nwarps) {
        const i64 row = sorted[p];
        if ((p > 0 && sorted[p - 1] == row) || row < 0 || row >= V) continue;  // not a segment start
        for (i64 d0 = 0; d0 < D; d0 += 32 * CH) {
            A acc[CH];
#pragma unroll
            for (int j = 0; j < CH; ++j) acc[j] = A(0);
            for (i64 q = p; q < n && sorted[q] == row; ++q) {
                const T* grow = g + perm[q] * D;
#pragma unroll
                for (int j = 0; j < CH; ++j) {
                    const i64 d = d0 + j * 32 + lane;
                    if (d < D) acc[j] += to_acc(grow[d]);
                }
            }
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                const i64 d = d0 + j * 32 + lane;
                if (d < D) gw[row * D + d] = from_acc<T>(acc[j]);
            }
        }
    }
}
