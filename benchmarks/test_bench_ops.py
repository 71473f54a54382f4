"""Op-level pytest-benchmark suite (``make bench-ops``): each backend's ops against the unfused
PyTorch they replace. ViT-S/16 shapes at batch 8 in float32 on CPU, ViT-B/16 at batch 128 on CUDA
(attention in bfloat16, as under autocast; the residual stream that ``norm_and_project`` reads
stays float32 there). ``benchmarks/ops_summary.py`` turns the JSON of a run into the target ratios
(``extra_info`` carries the bytes each op must move)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vapt_kernels import VAPTConfig, ops
from vapt_kernels.modules import PromptGenerator

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, D = (128, 12, 64) if DEVICE == "cuda" else (8, 6, 64)
ATTN_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N, P, NP, K = 196, 1, 10, 2
d = H * D
BACKENDS = [b for b, reason in ops.available_backends().items() if reason is None and b != "reference"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def attention_inputs():
    qkv = torch.randn(B, P + N, 3, H, D, device=DEVICE, dtype=ATTN_DTYPE, requires_grad=True)
    kvp = torch.randn(2, B, H, NP, D, device=DEVICE, dtype=ATTN_DTYPE, requires_grad=True)
    return qkv, kvp


@pytest.mark.parametrize("impl", ["cat+sdpa", *BACKENDS])
def test_prefix_attention_fwd_bwd(benchmark, impl):
    qkv, kvp = attention_inputs()
    dout = torch.randn(B, H, P + N, D, device=DEVICE, dtype=ATTN_DTYPE)

    def step():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        kp, vp = kvp.unbind(0)
        if impl == "cat+sdpa":
            out = F.scaled_dot_product_attention(q, torch.cat((kp, k), 2), torch.cat((vp, v), 2))
        else:
            out = ops.prefix_attention(q, k, v, kp, vp, D**-0.5, backend=impl)
        out.backward(dout)
        _sync()

    benchmark(step)


def test_preconcatenated_attention_fwd_bwd(benchmark):
    """The target for prefix attention: SDPA over keys/values already concatenated (N + Np long,
    contiguous), the concatenation itself not timed."""
    q = torch.randn(B, H, P + N, D, device=DEVICE, dtype=ATTN_DTYPE, requires_grad=True)
    k, v = (torch.randn(B, H, NP + P + N, D, device=DEVICE, dtype=ATTN_DTYPE, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def step():
        F.scaled_dot_product_attention(q, k, v).backward(dout)
        _sync()

    benchmark(step)


def test_token_attention_alone_fwd_bwd(benchmark):
    """The floor for prefix attention: SDPA over the token keys only."""
    qkv, _ = attention_inputs()
    dout = torch.randn(B, H, P + N, D, device=DEVICE, dtype=ATTN_DTYPE)

    def step():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        F.scaled_dot_product_attention(q, k, v).backward(dout)
        _sync()

    benchmark(step)


def projection_inputs():
    x = torch.randn(B, P + N, d, device=DEVICE, requires_grad=True)
    norm = [torch.ones(d, device=DEVICE), torch.zeros(d, device=DEVICE)]
    gen = PromptGenerator(d, NP, (14, 14), VAPTConfig(kernel_size=K), device=DEVICE)
    torch.nn.init.normal_(gen.token_proj.weight)
    return x, norm, gen


def test_prompt_projection_unfused(benchmark):
    """Official route: two LayerNorms, grouped conv on the grid, linear over positions."""
    x, norm, gen = projection_inputs()

    def step():
        h = F.layer_norm(x, (d,), *norm, 1e-6)
        xn = gen.norm(x[:, P:]).transpose(1, 2).reshape(B, d, 14, 14)
        y = F.conv2d(xn, gen.kernel.expand(d, 1, K, K), groups=d)
        g = F.linear(y.reshape(B, d, -1), gen.token_proj.weight)
        (h.sum() + g.sum()).backward()
        _sync()

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_and_project_fwd_bwd(benchmark, backend):
    """The op alone, gradients given: x and dh read, h and dx written once each at best."""
    x, norm, gen = projection_inputs()
    mix = gen.mix_matrix((14, 14)).detach().requires_grad_()
    dh, dg = torch.randn_like(x), torch.randn(B, NP, d, device=DEVICE)
    benchmark.extra_info["bytes"] = 5 * x.numel() * x.element_size()

    def step():
        h, g = ops.norm_and_project(x, *norm, 1e-6, gen.norm.weight, gen.norm.bias, 1e-5, mix, P, backend=backend)
        torch.autograd.backward((h, g), (dh, dg))
        _sync()

    benchmark(step)


def test_copy(benchmark):
    """Memory bandwidth baseline: a device-to-device copy of a block input."""
    x = torch.randn(B, P + N, d, device=DEVICE)
    y = torch.empty_like(x)
    benchmark.extra_info["bytes"] = 2 * x.numel() * x.element_size()

    def step():
        y.copy_(x)
        _sync()

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_projection_fused(benchmark, backend):
    """Folded matrix + norm_and_project (the matrix is rebuilt every step, as in training)."""
    x, norm, gen = projection_inputs()

    def step():
        mix = gen.mix_matrix((14, 14))
        h, g = ops.norm_and_project(x, *norm, 1e-6, gen.norm.weight, gen.norm.bias, 1e-5, mix, P, backend=backend)
        (h.sum() + g.sum()).backward()
        _sync()

    benchmark(step)
