// Schema of the VAPT ops (docs/design.md §2.1). Kernels live in cpu/ and cuda/, one file per op, each
// registered for its dispatch key with TORCH_LIBRARY_IMPL; fakes and autograd are registered from
// Python (vapt_kernels/ops/native.py).
//
// Shapes: B batch, T = P + N tokens (P prefix tokens, N patches), d channels, Np prompts,
// H heads of width D. "stats" tensors are float32 (float64 for float64 inputs).

#include <torch/library.h>

TORCH_LIBRARY(vapt, m) {
  // h = LN_1(x) (B, T, d) and g = mix @ LN_g(x[:, P:]) (B, Np, d) in x's dtype, from one read of x.
  // mix: (Np, N) or per-channel (Np, N, d), stats dtype. Weights/biases: (d,) in x's dtype.
  // mean, rstd1, rstd_g: (B, T) stats, the row statistics both LayerNorms share.
  // Many tasks: with task, an int64 (B,) index in [0, K), mix is stacked per task, (K, Np, N) or
  // (K, Np, N, d), and gen_weight/gen_bias are (K, d); image b uses task[b]'s slices.
  m.def(
      "norm_and_project_fwd(Tensor x, Tensor? norm1_weight, Tensor? norm1_bias, float eps1, "
      "Tensor? gen_weight, Tensor? gen_bias, float eps_g, Tensor mix, int num_prefix, Tensor? task=None) "
      "-> (Tensor h, Tensor g, Tensor mean, Tensor rstd1, Tensor rstd_g)");
  // dx = both LayerNorm backward terms; weight/bias gradients (d,) and dmix (mix's shape) in stats
  // dtype, always computed (a weight that is None counts as ones; its gradient is then unused).
  // With task: dgen_weight, dgen_bias (K, d) and dmix (K, ...), each task's slice summed over its
  // own images in a fixed order (zero for a task without images).
  m.def(
      "norm_and_project_bwd(Tensor dh, Tensor dg, Tensor x, Tensor? norm1_weight, Tensor? gen_weight, "
      "Tensor? gen_bias, Tensor mix, Tensor mean, Tensor rstd1, Tensor rstd_g, int num_prefix, "
      "Tensor? task=None) "
      "-> (Tensor dx, Tensor dnorm1_weight, Tensor dnorm1_bias, Tensor dgen_weight, Tensor dgen_bias, "
      "Tensor dmix)");
  // Softmax attention of q (B, H, T, D) over [k_prefix ; k], [v_prefix ; v] without concatenating.
  // k_prefix/v_prefix: (B or 1, H, Np, D). out: (B, H, T, D) laid out as (B, T, H, D);
  // lse: (B, H, T) stats, natural-log log-sum-exp of the scaled scores.
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, float scale) "
      "-> (Tensor out, Tensor lse)");
  // dq, dk, dv laid out like out; dk_prefix, dv_prefix with k_prefix's shape (summed over the batch
  // when the prefix is broadcast), contiguous.
  m.def(
      "prefix_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, "
      "Tensor out, Tensor lse, float scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dk_prefix, Tensor dv_prefix)");
}
