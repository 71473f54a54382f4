// Host driver that runs the CUDA prefix attention kernels (csrc/cuda/prefix_attention_device.cuh)
// under the host emulation (cuda_host.h), for tests/test_cuda_emulation.py:
//
//   driver attention IN OUT   IN: int32 {dtype (0 fp32, 1 fp16, 2 bf16), B, H, T, Np, D, Bp,
//                             backward}, float32 scale, then float32 q, k, v (B, H, T, D), k_prefix,
//                             v_prefix (Bp, H, Np, D) and, with backward, dout (B, H, T, D).
//                             OUT: float32 out, lse, and with backward dq, dk, dv, dk_prefix,
//                             dv_prefix, all contiguous.
//   driver selftest OUT       the emulator's own checks (see selftest()).
//
// The tensors are laid out as the model lays them out: q, k, v as views of one (B, T, 3, H, D)
// projection, the outputs (B, T, H, D) viewed as (B, H, T, D), a broadcast prefix with batch
// stride 0. Outputs start as NaN, so an element a kernel forgets to write fails the test. The
// launch sequence is the launcher's (prefix_attention_kernel.cu).

#include "cuda_host.h"
#include "driver_io.h"

#include "../cuda/prefix_attention_device.cuh"

#include <cstdio>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace vapt::attention;
using vapt_emu::io::read_floats;
using vapt_emu::io::to;
using vapt_emu::io::write_floats;

struct Header {
  int32_t dtype, B, H, T, Np, D, Bp, backward;
  float scale;
};

// The (B, H, rows, D) tensor `t` (any strides) as contiguous float32.
template <typename T>
std::vector<float> gather(const Tensor4& t, int B, int H, int rows, int D) {
  std::vector<float> out(static_cast<size_t>(B) * H * rows * D);
  size_t i = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < D; ++c)
          out[i++] = vapt::mma::to_float(static_cast<const T*>(t.ptr)[b * t.sb + h * t.sh + r * t.st + c]);
  return out;
}

bool aligned16(const void* p, std::initializer_list<int64_t> strides, int elem) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t s : strides) {
    if (s * elem % 16 != 0) return false;
  }
  return true;
}

template <typename T>
void attention(const Header& hd, FILE* in, FILE* out_file) {
  const int B = hd.B, H = hd.H, T_ = hd.T, Np = hd.Np, D = hd.D, Bp = hd.Bp;
  const size_t n_tok = static_cast<size_t>(B) * H * T_ * D, n_pre = static_cast<size_t>(Bp) * H * Np * D;
  const std::vector<float> q = read_floats(in, n_tok), k = read_floats(in, n_tok), v = read_floats(in, n_tok);
  const std::vector<float> kp = read_floats(in, n_pre), vp = read_floats(in, n_pre);

  // q, k, v as views of one (B, T, 3, H, D) buffer.
  std::vector<T> qkv(3 * n_tok);
  const int64_t tok_stride = 3LL * H * D;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T_; ++t)
        for (int c = 0; c < D; ++c) {
          const size_t src = ((static_cast<size_t>(b) * H + h) * T_ + t) * D + c;
          const size_t dst = static_cast<size_t>(b) * T_ * tok_stride + t * tok_stride + h * D + c;
          qkv[dst] = vapt::mma::from_float<T>(q[src]);
          qkv[dst + H * D] = vapt::mma::from_float<T>(k[src]);
          qkv[dst + 2 * H * D] = vapt::mma::from_float<T>(v[src]);
        }
  std::vector<T> kp_t = to<T>(kp), vp_t = to<T>(vp);
  const T nan = vapt::mma::from_float<T>(std::numeric_limits<float>::quiet_NaN());
  const float fnan = std::numeric_limits<float>::quiet_NaN();
  const auto bthd = [&](std::vector<T>& buf) {  // (B, T, H, D) memory viewed as (B, H, T, D)
    buf.assign(n_tok, nan);
    return Tensor4{buf.data(), static_cast<int64_t>(T_) * H * D, D, static_cast<int64_t>(H) * D};
  };
  const int64_t prefix_sb = Bp == 1 ? 0 : static_cast<int64_t>(H) * Np * D;

  Params p{};
  p.q = Tensor4{qkv.data(), T_ * tok_stride, D, tok_stride};
  p.k = Tensor4{qkv.data() + H * D, T_ * tok_stride, D, tok_stride};
  p.v = Tensor4{qkv.data() + 2 * H * D, T_ * tok_stride, D, tok_stride};
  p.kp = Tensor4{kp_t.data(), prefix_sb, static_cast<int64_t>(Np) * D, D};
  p.vp = Tensor4{vp_t.data(), prefix_sb, static_cast<int64_t>(Np) * D, D};
  std::vector<T> out, dout_t, dq, dk, dv;
  p.out = bthd(out);
  std::vector<float> lse(static_cast<size_t>(B) * H * T_, fnan);
  p.lse = lse.data();
  p.heads = H;
  p.tokens = T_;
  p.prompts = Np;
  p.D = D;
  p.scale = hd.scale;
  p.scale_log2 = static_cast<float>(static_cast<double>(hd.scale) * 1.4426950408889634);
  const int elem = sizeof(T);
  p.vec = elem == 2 && D % 8 == 0 && aligned16(qkv.data(), {H * D, tok_stride}, elem) &&
          aligned16(kp_t.data(), {static_cast<int64_t>(Np) * D, D}, elem) &&
          aligned16(vp_t.data(), {static_cast<int64_t>(Np) * D, D}, elem);
  const int64_t bh = static_cast<int64_t>(B) * H;
  const auto dims = [](const Grid& g) { return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y)); };

  if constexpr (sizeof(T) == 4) {
    const Grid g = fp32_rows_grid(bh, T_);
    vapt_emu_launch(prefix_attention_fwd_fp32_kernel, dims(g), dim3(g.threads), g.smem_bytes, p);
  } else {
    with_padded_head_dim(D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      const Grid g = fwd_grid(bh, T_, D);
      vapt_emu_launch(prefix_attention_fwd_kernel<T, DP>, dims(g), dim3(g.threads), g.smem_bytes, p);
    });
  }
  write_floats(out_file, gather<T>(p.out, B, H, T_, D));
  write_floats(out_file, lse);
  if (!hd.backward) return;

  const std::vector<float> dout = read_floats(in, n_tok);
  dout_t = to<T>(dout);
  p.dout = Tensor4{dout_t.data(), static_cast<int64_t>(H) * T_ * D, static_cast<int64_t>(T_) * D, D};
  p.dq = bthd(dq);
  p.dk = bthd(dk);
  p.dv = bthd(dv);
  std::vector<float> delta(static_cast<size_t>(B) * H * T_, fnan);
  std::vector<float> dkp_part(static_cast<size_t>(B) * H * Np * D, fnan), dvp_part(dkp_part.size(), fnan);
  p.delta = delta.data();
  p.dkp_part = dkp_part.data();
  p.dvp_part = dvp_part.data();
  p.vec = p.vec && aligned16(dout_t.data(), {static_cast<int64_t>(T_) * D, D}, elem);

  if constexpr (sizeof(T) == 4) {
    const Grid gq = fp32_rows_grid(bh, T_), gkv = fp32_rows_grid(bh, Np + T_);
    vapt_emu_launch(prefix_attention_dq_fp32_kernel, dims(gq), dim3(gq.threads), gq.smem_bytes, p);
    vapt_emu_launch(prefix_attention_dkdv_fp32_kernel, dims(gkv), dim3(gkv.threads), gkv.smem_bytes, p);
  } else {
    with_padded_head_dim(D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      const Grid gq = dq_grid(bh, T_, D), gkv = dkdv_grid(bh, Np, T_, D);
      vapt_emu_launch(prefix_attention_dq_kernel<T, DP>, dims(gq), dim3(gq.threads), gq.smem_bytes, p);
      vapt_emu_launch(prefix_attention_dkdv_kernel<T, DP>, dims(gkv), dim3(gkv.threads), gkv.smem_bytes, p);
    });
  }
  write_floats(out_file, gather<T>(p.dq, B, H, T_, D));
  write_floats(out_file, gather<T>(p.dk, B, H, T_, D));
  write_floats(out_file, gather<T>(p.dv, B, H, T_, D));
  // Per-image fp32 prefix partials -> the prefix's shape (summed over the batch when broadcast),
  // rounded to the input dtype as the launcher does.
  for (std::vector<float>* part : {&dkp_part, &dvp_part}) {
    std::vector<float> summed(n_pre, 0.0f);
    for (int b = 0; b < B; ++b)
      for (size_t i = 0; i < n_pre / Bp; ++i) summed[(Bp == 1 ? 0 : b * (n_pre / Bp)) + i] += (*part)[b * (n_pre / Bp) + i];
    for (float& x : summed) x = vapt::mma::to_float(vapt::mma::from_float<T>(x));
    write_floats(out_file, summed);
  }
}

// ------------------------------------------------------------------------------------------------
// The emulator's own checks. Inputs are small integers / 4, exact in fp16; the Python side
// rebuilds them with the same formulas.
// ------------------------------------------------------------------------------------------------

float a_value(int i, int j) { return static_cast<float>((i * 7 + j * 3) % 11 - 5) / 4.0f; }
float b_value(int k, int n) { return static_cast<float>((k * 5 + n * 2) % 9 - 4) / 4.0f; }
float c_value(int i, int n) { return static_cast<float>(i - n) / 8.0f; }

// One warp: D = A B + C for A 16x16, B 16x8, the fragments built element by element with the PTX
// ISA's layout formulas (written out here independently of the emulator), the result scattered
// back with the accumulator layout. d: 16x8 row-major.
__global__ void mma_check_kernel(float* d) {
  using vapt::mma::half_t;
  const int lane = threadIdx.x % 32, group = lane / 4, tig = lane % 4;
  uint32_t a[4], b[2];
  float c[4];
  for (int r = 0; r < 4; ++r) {
    const int row = group + (r % 2) * 8, col = tig * 2 + (r / 2) * 8;
    a[r] = vapt::mma::pack2<half_t>(a_value(row, col), a_value(row, col + 1));
  }
  for (int r = 0; r < 2; ++r) {
    const int k = tig * 2 + r * 8;
    b[r] = vapt::mma::pack2<half_t>(b_value(k, group), b_value(k + 1, group));
  }
  for (int i = 0; i < 4; ++i) c[i] = c_value(group + (i / 2) * 8, tig * 2 + i % 2);
  vapt::mma::mma_16816<half_t>(c, a, b);
  for (int i = 0; i < 4; ++i) d[(group + (i / 2) * 8) * 8 + tig * 2 + i % 2] = c[i];
}

// One warp: the kernels' ldmatrix paths. A (16x16) and B (16x16, as B[k][n] and as its transpose)
// in shared memory; d1 = A B with B through b_frag_cols (ldmatrix .trans), d2 = A B with B^T
// through b_frag_rows; both 16x16 row-major.
__global__ void ldmatrix_check_kernel(float* d1, float* d2) {
  using vapt::mma::half_t;
  constexpr int P = 24;  // pitch in elements: rows 48 bytes apart, 16-byte aligned
  __shared__ __align__(16) half_t a_s[16 * P];
  __shared__ __align__(16) half_t b_s[16 * P];
  __shared__ __align__(16) half_t bt_s[16 * P];
  const int lane = threadIdx.x % 32, group = lane / 4, tig = lane % 4;
  for (int i = lane; i < 256; i += 32) {
    const int r = i / 16, c = i % 16;
    a_s[r * P + c] = half_t(a_value(r, c));
    b_s[r * P + c] = half_t(b_value(r, c));
    bt_s[c * P + r] = half_t(b_value(r, c));
  }
  __syncwarp();
  uint32_t a[4], bc[4], br[4];
  a_frag<P>(a, a_s, 0, 0);
  b_frag_cols<P>(bc, b_s, 0, 0);
  b_frag_rows<P>(br, bt_s, 0, 0);
  float x[2][4] = {}, y[2][4] = {};
  mma_pair<half_t>(x[0], x[1], a, bc);
  mma_pair<half_t>(y[0], y[1], a, br);
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i / 2) * 8, col = n * 8 + tig * 2 + i % 2;
      d1[row * 16 + col] = x[n][i];
      d2[row * 16 + col] = y[n][i];
    }
}

// Two warps: per thread i (value 3i + 1) the xor-5, indexed ((7 lane) % 32), down-3 and up-2
// shuffles, and a block-wide barrier check (every thread reads its neighbour's slot of a static
// shared array written before the barrier). out: 64 x 5 int32.
__global__ void shuffle_check_kernel(int* out) {
  __shared__ int slots[64];
  const int i = threadIdx.x, lane = i % 32, value = 3 * i + 1;
  slots[i] = value;
  __syncthreads();
  out[i * 5 + 0] = __shfl_xor_sync(0xffffffffu, value, 5);
  out[i * 5 + 1] = __shfl_sync(0xffffffffu, value, (7 * lane) % 32);
  out[i * 5 + 2] = __shfl_down_sync(0xffffffffu, value, 3);
  out[i * 5 + 3] = __shfl_up_sync(0xffffffffu, value, 2);
  out[i * 5 + 4] = slots[(i + 1) % 64];
}

void selftest(FILE* out_file) {
  std::vector<float> d(16 * 8), d1(256), d2(256);
  std::vector<int> shuffles(64 * 5);
  vapt_emu_launch(mma_check_kernel, dim3(1), dim3(32), 0, d.data());
  vapt_emu_launch(ldmatrix_check_kernel, dim3(1), dim3(32), 0, d1.data(), d2.data());
  vapt_emu_launch(shuffle_check_kernel, dim3(1), dim3(64), 0, shuffles.data());
  write_floats(out_file, d);
  write_floats(out_file, d1);
  write_floats(out_file, d2);
  std::fwrite(shuffles.data(), sizeof(int), shuffles.size(), out_file);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "selftest") {
    FILE* out = std::fopen(argv[2], "wb");
    selftest(out);
    std::fclose(out);
    return 0;
  }
  return vapt_emu::io::driver_main<Header>(argc, argv, "attention", "attention IN OUT | selftest OUT",
                                           [](auto zero, const Header& hd, FILE* in, FILE* out) {
                                             attention<decltype(zero)>(hd, in, out);
                                           });
}
