// A CPU emulator for the CUDA subset the kernels in this folder use, so their code runs (slowly)
// without a GPU: tests/test_kernels_gpu.py compiles each .cu with g++ against this header and drives
// the real Python wrappers through it (kernels/_emu.py). Not a CUDA implementation: only what the
// kernels here need, with the semantics they rely on.
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another.
// __syncthreads() and the two halves of a warp shuffle are barriers: a fiber that reaches one yields
// until every live fiber of its block (warp) has arrived. A fiber that returns early leaves the
// barriers it would have joined (as an exited GPU thread does). __shared__ becomes `static`: shared by
// the fibers of the running block. Atomics need nothing (one OS thread).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

namespace emu {
struct D3 { unsigned x, y, z; };
struct Fiber { ucontext_t ctx; bool done; D3 tid; };
struct Barrier { int arrived = 0; long gen = 0; };

inline D3 tid, bid, bdim, gdim;
inline std::vector<Fiber> fibers;
inline std::vector<char> stacks;
inline std::vector<uint64_t> slots;  // one shuffle slot per thread
inline std::vector<Barrier> warp_bar;
inline std::vector<int> warp_live;
inline Barrier block_bar;
inline int block_live = 0, cur = 0;
inline ucontext_t sched;
inline std::vector<unsigned char> dyn;  // the launch's dynamic shared memory (reused by each block)
inline std::function<void()> body;
constexpr size_t kStack = 64 * 1024;

inline void yield() { swapcontext(&fibers[cur].ctx, &sched); }

inline void release_if_complete(Barrier& b, int live) {
    if (b.arrived > 0 && b.arrived >= live) { b.arrived = 0; b.gen++; }
}

inline int deadlocked = 0;  // a barrier some live thread never reached: reported to Python after the launch

inline void wait(Barrier& b, const int& live) {
    const long gen = b.gen;
    b.arrived++;
    release_if_complete(b, live);
    long spins = 0;
    while (b.gen == gen) {
        yield();
        // A correct kernel releases every barrier within a scheduler round or two.
        if (++spins > 100000L) { deadlocked = 1; return; }
    }
}

inline void trampoline() {
    body();
    Fiber& f = fibers[cur];
    f.done = true;
    const int w = cur / 32;
    block_live--;
    warp_live[w]--;
    release_if_complete(block_bar, block_live);
    release_if_complete(warp_bar[w], warp_live[w]);
    swapcontext(&f.ctx, &sched);
}

inline void run_block() {
    const int n = bdim.x * bdim.y * bdim.z, nw = (n + 31) / 32;
    fibers.assign(n, Fiber{});
    if (stacks.size() < n * kStack) stacks.resize(n * kStack);
    slots.assign(n, 0);
    warp_bar.assign(nw, Barrier{});
    warp_live.assign(nw, 0);
    block_bar = Barrier{};
    block_live = n;
    for (int i = 0; i < n; ++i) {
        warp_live[i / 32]++;
        Fiber& f = fibers[i];
        f.tid = D3{unsigned(i % bdim.x), unsigned((i / bdim.x) % bdim.y), unsigned(i / (bdim.x * bdim.y))};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks.data() + i * kStack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
    }
    for (int left = n; left > 0;) {
        left = 0;
        for (int i = 0; i < n; ++i) {
            if (fibers[i].done) continue;
            cur = i;
            tid = fibers[i].tid;
            swapcontext(&sched, &fibers[i].ctx);
            if (!fibers[i].done) left++;
        }
    }
}

template <typename... P, size_t... I>
void call(void (*k)(P...), void** a, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_reference_t<P>*>(a[I])...);
}

template <typename... P>
void launch(void (*k)(P...), unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
            unsigned smem, void** a) {
    dyn.assign(smem + 16, 0);
    gdim = D3{gx, gy, gz};
    bdim = D3{bx, by, bz};
    body = [k, a] { call(k, a, std::index_sequence_for<P...>{}); };
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                bid = D3{x, y, z};
                run_block();
            }
}
}  // namespace emu

#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dyn.data())
#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define blockDim (::emu::bdim)
#define gridDim (::emu::gdim)

inline void __syncthreads() { emu::wait(emu::block_bar, emu::block_live); }

template <typename T> T __shfl_xor_sync(unsigned, T v, int o) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    const int i = emu::cur, w = i / 32, src = w * 32 + ((i % 32) ^ o);
    std::memcpy(&emu::slots[i], &v, sizeof(T));
    emu::wait(emu::warp_bar[w], emu::warp_live[w]);
    T r;
    std::memcpy(&r, &emu::slots[src], sizeof(T));
    emu::wait(emu::warp_bar[w], emu::warp_live[w]);
    return r;
}

inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline float atomicAdd(float* p, float v) { const float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { const double o = *p; *p = o + v; return o; }
