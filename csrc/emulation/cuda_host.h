// Host emulation of the CUDA execution model, so that the device sources in csrc/cuda/*.cuh compile
// with g++ (-DVAPT_CUDA_EMULATION) and run on a CPU: the same kernel text is tested in CI, under
// AddressSanitizer and UBSan, on machines without a GPU.
//
// Model:
// * A launch runs its blocks one after another. A block is one fiber (ucontext) per CUDA thread,
//   each with its own stack, so registers are ordinary locals. A fiber runs until it reaches a
//   block barrier or a warp collective, then yields to the block's scheduler, which resumes the
//   runnable fibers in a pseudo-random order each round (seeded by VAPT_EMU_SEED), so that
//   results that depend on the order of threads between barriers show up as wrong answers.
// * Shared memory: static `__shared__` arrays become function statics (one copy, reused by the
//   blocks in turn, as on a device nothing is promised about its content at block start); the
//   dynamic buffer (VAPT_EXTERN_SHARED) is allocated per block at its exact size (so ASan
//   catches overruns) and filled with 0xff bytes (NaN in every float type) before the block runs,
//   so reads of never-written shared memory poison the results.
// * __syncthreads(): a barrier over the block's live fibers; threads that have returned no longer
//   count, as on the device.
// * Warp collectives (__shfl_*_sync, __syncwarp, mma m16n8k16, ldmatrix) wait for all 32 lanes
//   of the warp; the last lane to arrive computes every lane's result from every lane's input.
// * mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: the fragments are gathered
//   with the layouts of the PTX ISA (section "Matrix Fragments for mma.m16n8k16 with floating
//   point type"), the product is computed in fp32 from the exact fp16/bf16 values, and each lane
//   gets its own four accumulator registers back.
// * ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16: every lane gives the address of one row,
//   as documented; each lane gets its four registers.
// * cp.async.cg 16 bytes: queued per thread; cp.async.commit_group closes a group and
//   cp.async.wait_group N performs every copy but those of the newest N groups, so reading a tile
//   before waiting for it reads the stale buffer (and fails a test).
//
// Not emulated faithfully, by design:
// * Collectives need the full warp: a mask other than all 32 lanes aborts with a message (the
//   kernels here never use partial masks); divergent collectives (lanes at different ones, or some
//   at a block barrier) are reported as a deadlock and abort.
// * Memory is sequentially consistent between fibers, and a fiber only yields at barriers and
//   collectives: a race between two threads that the scheduling order does not expose goes
//   unseen. There is no memory model for global memory between blocks (blocks run in order).
// * The tensor-core product's internal rounding and summation order are not documented; here the
//   16 products are summed in fp32 in k order, then added to the accumulator.
// * Atomics, cooperative groups, clusters, texture memory and __trap with a device backtrace are
//   not provided. Math functions are glibc's (exp2f, log2f, and __expf/__fdividef computed
//   exactly), while the device's are within their documented ulp bounds: last-bit differences
//   from a GPU run are expected, larger ones are not.

#pragma once

#ifndef VAPT_CUDA_EMULATION
#error "cuda_host.h is the host emulation of CUDA; compile with -DVAPT_CUDA_EMULATION"
#endif

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <math.h>  // exp2f, log2f, fmaxf, ... in the global namespace, as CUDA has them
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__SANITIZE_ADDRESS__)
#define VAPT_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define VAPT_EMU_ASAN 1
#endif
#endif
#ifdef VAPT_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

// ------------------------------------------------------------------------------------------------
// Keywords
// ------------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One copy per kernel instantiation, shared by the fibers of the running block.
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace vapt_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "vapt CUDA emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 64 * 1024;  // ASan clears a stack's shadow on every switch: keep it small

// A payload a lane hands to a warp collective, or gets back from it.
struct Slot {
  alignas(16) unsigned char bytes[48];
  int aux;
};

struct Warp {
  int lanes = 0;     // threads of the block in this warp
  int arrived = 0;   // lanes waiting in the current collective
  unsigned gen = 0;  // collectives completed
  const char* kind = nullptr;
  Slot in[kWarpSize], out[kWarpSize];
};

struct CpAsync {
  void* dst;
  const void* src;
  int src_bytes;  // 0 or 16; the rest of the 16 bytes is zero-filled
};

enum class State { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;  // kStackBytes, above one guard page
  State state = State::kReady;
  unsigned wait_gen = 0;
  dim3 thread;
  int linear = 0;
  std::vector<std::vector<CpAsync>> groups;  // committed cp.async groups, oldest first
  std::vector<CpAsync> open;                 // cp.async since the last commit
#ifdef VAPT_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// The running launch: one block at a time.
struct Launch {
  dim3 grid, block, block_idx;
  unsigned char* dynamic_shared = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  std::function<void()> body;
#ifdef VAPT_EMU_ASAN
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
#endif
};

inline Launch& launch_state() {
  static Launch launch;
  return launch;
}

inline Fiber& self() {
  Fiber* f = launch_state().current;
  if (f == nullptr) fail("a device function ran outside a kernel launch");
  return *f;
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber.
inline void yield_to_scheduler(bool finished = false) {
  Launch& L = launch_state();
  Fiber& f = self();
#ifdef VAPT_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, L.scheduler_stack, L.scheduler_stack_size);
#endif
  swapcontext(&f.context, &L.scheduler);
#ifdef VAPT_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &L.scheduler_stack, &L.scheduler_stack_size);
#endif
  (void)finished;
}

inline void run_copies(std::vector<CpAsync>& copies) {
  for (const CpAsync& c : copies) {
    std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
  }
  copies.clear();
}

inline void fiber_entry() {
  Launch& L = launch_state();
#ifdef VAPT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &L.scheduler_stack, &L.scheduler_stack_size);
#endif
  L.body();
  Fiber& f = self();
  for (auto& g : f.groups) run_copies(g);  // copies still in flight land eventually
  f.groups.clear();
  run_copies(f.open);
  f.state = State::kDone;
  yield_to_scheduler(/*finished=*/true);
  fail("a finished fiber was resumed");
}

// Thread i of the block, at the start of the kernel. (getcontext returns twice, so it lives in a
// function of its own, where no local of the scheduler loop can be clobbered.)
__attribute__((noinline)) inline void start_fiber(Fiber& f, int i, dim3 block) {
  f.state = State::kReady;
  f.linear = i;
  f.thread = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_entry, 0);
}

inline uint64_t seed() {
  const char* s = std::getenv("VAPT_EMU_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 0x5eed;
}

// Runs `body` once per thread of every block of `grid` x `block`.
inline void run(dim3 grid, dim3 block, size_t dynamic_shared_bytes, std::function<void()> body) {
  Launch& L = launch_state();
  if (L.fibers != nullptr) fail("kernel launches do not nest");
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024) fail("a block has 1 to 1024 threads");
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<Fiber> fibers(threads);
  for (Fiber& f : fibers) {
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    f.stack = static_cast<unsigned char*>(mem) + page;
  }
  L.grid = grid;
  L.block = block;
  L.fibers = &fibers;
  L.body = std::move(body);
  L.warps.assign((threads + kWarpSize - 1) / kWarpSize, Warp{});
  for (size_t w = 0; w < L.warps.size(); ++w) {
    L.warps[w].lanes = std::min(kWarpSize, threads - static_cast<int>(w) * kWarpSize);
  }
  std::vector<unsigned char> shared(dynamic_shared_bytes);
  std::mt19937_64 rng(seed());
  std::vector<int> order(threads);

  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        L.block_idx = dim3(bx, by, bz);
        std::fill(shared.begin(), shared.end(), static_cast<unsigned char>(0xff));
        L.dynamic_shared = shared.data();
        for (int i = 0; i < threads; ++i) start_fiber(fibers[i], i, block);
        for (Warp& w : L.warps) {
          w.arrived = 0;
          w.kind = nullptr;
        }
        int done = 0;
        while (done < threads) {
          for (int i = 0; i < threads; ++i) order[i] = i;
          std::shuffle(order.begin(), order.end(), rng);
          bool progressed = false;
          for (int i : order) {
            Fiber& f = fibers[i];
            const bool runnable = f.state == State::kReady ||
                                  (f.state == State::kWarp && L.warps[i / kWarpSize].gen != f.wait_gen);
            if (!runnable) continue;
            f.state = State::kReady;
            L.current = &f;
#ifdef VAPT_EMU_ASAN
            __sanitizer_start_switch_fiber(&L.scheduler_fake_stack, f.stack, kStackBytes);
#endif
            swapcontext(&L.scheduler, &f.context);
#ifdef VAPT_EMU_ASAN
            __sanitizer_finish_switch_fiber(L.scheduler_fake_stack, nullptr, nullptr);
#endif
            L.current = nullptr;
            progressed = true;
            if (f.state == State::kDone) ++done;
          }
          if (progressed || done == threads) continue;
          // Nobody can run: release a barrier that every live thread reached, else it is a deadlock.
          bool all_at_barrier = true;
          for (const Fiber& f : fibers) all_at_barrier &= f.state == State::kBarrier || f.state == State::kDone;
          if (!all_at_barrier) {
            fail("deadlock: threads wait in a warp collective that not every lane reached (divergence, a lane "
                 "that returned, or lanes at a __syncthreads)");
          }
          for (Fiber& f : fibers) {
            if (f.state == State::kBarrier) f.state = State::kReady;
          }
        }
      }
    }
  }
  L.fibers = nullptr;
  L.dynamic_shared = nullptr;
  L.body = nullptr;
  for (Fiber& f : fibers) munmap(static_cast<unsigned char*>(f.stack) - page, kStackBytes + page);
}

// Lane `lane` of the calling warp enters a collective of `kind`: `deposit` fills its input slot;
// the last lane to arrive runs `complete(warp)`, which fills every lane's output slot. Returns
// this lane's output slot (valid until this lane enters its next collective).
template <typename Deposit, typename Complete>
inline const Slot& collective(const char* kind, unsigned mask, Deposit&& deposit, Complete&& complete) {
  Launch& L = launch_state();
  Fiber& f = self();
  Warp& w = L.warps[f.linear / kWarpSize];
  const unsigned full = w.lanes == kWarpSize ? 0xffffffffu : (1u << w.lanes) - 1u;
  if ((mask & full) != full) fail("warp collectives with a partial lane mask are not emulated");
  const int lane = f.linear % kWarpSize;
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (std::strcmp(w.kind, kind) != 0) {
    fail("lanes of one warp reached different collectives");
  }
  deposit(w.in[lane]);
  if (++w.arrived == w.lanes) {
    complete(w);
    w.arrived = 0;
    ++w.gen;
  } else {
    f.state = State::kWarp;
    f.wait_gen = w.gen;
    yield_to_scheduler();
  }
  return w.out[lane];
}

template <typename T>
inline T shuffle(unsigned mask, T value, int arg, int width, int mode) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffles move values of up to 16 bytes");
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) fail("shuffle width must be a power of 2 <= 32");
  const Slot& out = collective(
      "shfl", mask,
      [&](Slot& s) {
        std::memcpy(s.bytes, &value, sizeof(T));
        const int lane = self().linear % kWarpSize, base = lane / width * width, pos = lane % width;
        int src = lane;
        if (mode == 0) src = base + ((pos ^ arg) & (width - 1));                // xor
        if (mode == 1) src = base + (arg & (width - 1));                        // indexed
        if (mode == 2) src = pos + arg < width ? lane + arg : lane;             // down
        if (mode == 3) src = pos - arg >= 0 ? lane - arg : lane;                // up
        s.aux = src;
      },
      [](Warp& w) {
        for (int l = 0; l < w.lanes; ++l) {
          const int src = w.in[l].aux < w.lanes ? w.in[l].aux : l;
          std::memcpy(w.out[l].bytes, w.in[src].bytes, sizeof(w.in[src].bytes));
        }
      });
  T result;
  std::memcpy(&result, out.bytes, sizeof(T));
  return result;
}

inline void syncwarp(unsigned mask) {
  collective("syncwarp", mask, [](Slot&) {}, [](Warp&) {});
}

inline void syncthreads() {
  Fiber& f = self();
  f.state = State::kBarrier;
  yield_to_scheduler();
}

inline unsigned char* dynamic_shared() { return launch_state().dynamic_shared; }

// ---- tensor-core and memory instructions (wrapped by csrc/cuda/mma.cuh) ----

// Element e (0 low, 1 high) of a register holding two 16-bit values, as fp32.
template <typename Elem>
inline float half_of(uint32_t reg, int e) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * e));
  Elem x;
  std::memcpy(&x, &bits, 2);
  return static_cast<float>(x);
}

// d = a * b + c for one m16n8k16 tile; a, b, c, d are this lane's fragment registers.
template <typename Elem>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  const Slot& out = collective(
      "mma.m16n8k16", 0xffffffffu,
      [&](Slot& s) {
        std::memcpy(s.bytes, a, 16);
        std::memcpy(s.bytes + 16, b, 8);
        std::memcpy(s.bytes + 24, c, 16);
      },
      [](Warp& w) {
        if (w.lanes != kWarpSize) fail("mma needs a full warp");
        float A[16][16], B[16][8], C[16][8];
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int group = lane / 4, tig = lane % 4;
          uint32_t ra[4], rb[2];
          float rc[4];
          std::memcpy(ra, w.in[lane].bytes, 16);
          std::memcpy(rb, w.in[lane].bytes + 16, 8);
          std::memcpy(rc, w.in[lane].bytes + 24, 16);
          // A: a_i, i in [0, 8): row group (+8 for i in {2,3,6,7}), column 2*tig + i%2 (+8 for i >= 4).
          for (int i = 0; i < 8; ++i) {
            const int row = group + ((i / 2) % 2) * 8, col = tig * 2 + i % 2 + (i / 4) * 8;
            A[row][col] = half_of<Elem>(ra[i / 2], i % 2);
          }
          // B: b_i, i in [0, 4): row (k) 2*tig + i%2 (+8 for i >= 2), column (n) group.
          for (int i = 0; i < 4; ++i) B[tig * 2 + i % 2 + (i / 2) * 8][group] = half_of<Elem>(rb[i / 2], i % 2);
          // C, D: c_i, i in [0, 4): row group (+8 for i >= 2), column 2*tig + i%2.
          for (int i = 0; i < 4; ++i) C[group + (i / 2) * 8][tig * 2 + i % 2] = rc[i];
        }
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int group = lane / 4, tig = lane % 4;
          float rd[4];
          for (int i = 0; i < 4; ++i) {
            const int row = group + (i / 2) * 8, col = tig * 2 + i % 2;
            float sum = 0.0f;
            for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
            rd[i] = C[row][col] + sum;
          }
          std::memcpy(w.out[lane].bytes, rd, 16);
        }
      });
  std::memcpy(d, out.bytes, 16);
}

// ldmatrix .x4 (.trans): lane l gives the address of row l%8 of 8x8 matrix l/8 (16 bytes each);
// register i of lane l gets, of matrix i, row l/4, columns 2*(l%4) and 2*(l%4)+1 (the transpose's,
// i.e. rows 2*(l%4) and 2*(l%4)+1 of column l/4, with .trans).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  const Slot& out = collective(
      trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", 0xffffffffu,
      [&](Slot& s) {
        if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix row addresses must be 16-byte aligned");
        std::memcpy(s.bytes, &row, sizeof(row));
      },
      [trans](Warp& w) {
        if (w.lanes != kWarpSize) fail("ldmatrix needs a full warp");
        const uint16_t* rows[kWarpSize];
        for (int l = 0; l < kWarpSize; ++l) std::memcpy(&rows[l], w.in[l].bytes, sizeof(rows[l]));
        for (int l = 0; l < kWarpSize; ++l) {
          uint32_t regs[4];
          for (int m = 0; m < 4; ++m) {
            uint16_t e[2];
            for (int j = 0; j < 2; ++j) {
              e[j] = trans ? rows[m * 8 + 2 * (l % 4) + j][l / 4] : rows[m * 8 + l / 4][2 * (l % 4) + j];
            }
            regs[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
          }
          std::memcpy(w.out[l].bytes, regs, 16);
        }
      });
  std::memcpy(r, out.bytes, 16);
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("cp.async of 16 bytes needs 16-byte aligned addresses");
  }
  self().open.push_back(CpAsync{dst, src, src_bytes});
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

inline void cp_async_wait(int pending) {
  Fiber& f = self();
  while (static_cast<int>(f.groups.size()) > pending) {
    run_copies(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

}  // namespace vapt_emu

// ------------------------------------------------------------------------------------------------
// Built-in variables and functions
// ------------------------------------------------------------------------------------------------

#define threadIdx (::vapt_emu::self().thread)
#define blockIdx (::vapt_emu::launch_state().block_idx)
#define blockDim (::vapt_emu::launch_state().block)
#define gridDim (::vapt_emu::launch_state().grid)
#define warpSize 32

inline void __syncthreads() { vapt_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { vapt_emu::syncwarp(mask); }
[[noreturn]] inline void __trap() { vapt_emu::fail("__trap() in a kernel"); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return vapt_emu::shuffle(mask, v, lane_mask, width, 0);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return vapt_emu::shuffle(mask, v, src_lane, width, 1);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return vapt_emu::shuffle(mask, v, static_cast<int>(delta), width, 2);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return vapt_emu::shuffle(mask, v, static_cast<int>(delta), width, 3);
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
// CUDA's integer min/max overloads (the float ones are fminf/fmaxf from math.h).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// The host's `kernel<<<grid, block, shared_bytes>>>(args...)`.
template <typename... Params, typename... Args>
void vapt_emu_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared_bytes, Args&&... args) {
  vapt_emu::run(grid, block, dynamic_shared_bytes, [&]() { kernel(args...); });
}
