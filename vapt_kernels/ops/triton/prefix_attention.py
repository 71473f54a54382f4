"""Triton kernels for ``prefix_attention``: flash attention of the token queries over a key/value
prefix kept in its own tensors (docs/design.md §1.2; the kernels' design: §2.2).

Shapes: ``B`` batch, ``H`` heads, ``T`` tokens, ``D`` head dim, ``Np`` prefix keys, ``Bp`` prefix
batch (``B``, or 1 for static prompts broadcast over the batch).

* ``q, k, v``: ``(B, H, T, D)``, any strides with a unit last stride (views of the fused QKV
  projection). ``k_prefix, v_prefix``: ``(Bp, H, Np, D)``, batch stride 0 when ``Bp == 1``.
* ``out``, ``dq, dk, dv``: ``(B, H, T, D)`` laid out as ``(B, T, H, D)``. ``lse`` (natural log) and
  ``delta = rowsum(dout * out)``: ``(B, H, T)`` float32, contiguous.

Kernel arguments, by name: ``<x>_ptr`` is tensor ``x`` (``kp``, ``vp``: the prefix; ``o``/``out``,
``do``: the output and its gradient; ``dkp``, ``dvp``: per-batch prefix gradients ``(B, H, Np, D)``)
and ``stride_<x>b, stride_<x>h, stride_<x>t`` (``n`` for key rows) its batch, head and row strides;
``<x>_base`` is row 0 of ``x`` for the program's ``(b, h)``; ``stat_base`` the same row in ``lse`` and
``delta``. ``qk_scale`` is the softmax scale times log2(e): scores live in the log2 domain, so
``exp2`` replaces ``exp``. Constexprs: ``HEAD_DIM = D``; ``BLOCK_D``, ``D`` padded to a power of two
>= 16 (padded columns are masked); ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_NP``: queries, token keys and
prefix keys per program or loop step; ``UPCAST``: cast loaded tiles to float32 and round bfloat16
stores (the interpreter with bfloat16); ``DOT_PRECISION``: ``"ieee"`` for float32 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..library import empty_token_major, unit_last_stride
from .common import INTERPRETED, device_guard, round_to_bfloat16

_LOG2E = 1.4426950408889634
# Kernel arguments not specialised on (divisible by 16, equal to 1): one compiled kernel serves every
# head count and prompt count. Strides stay specialised: their divisibility allows vector loads.
_SHAPE_ARGS = ["H", "Np"]


# --------------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _program(n_blocks, H):
    """This program's block index and ``(b * H + h, b, h)``: every grid is 1-D, block index
    fastest, so neighbouring programs share one ``(b, h)`` and its keys stay in L2."""
    pid = tl.program_id(0)
    pid_bh = pid // n_blocks
    # int64: batch offsets of the (B, T, 3, H, D) projection exceed 2**31 elements at large B.
    return pid % n_blocks, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _query_block(T, H, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(b * H + h, b, h)`` of a program over a block of ``BLOCK_M`` queries, the queries' indices and
    the column indices."""
    pid_m, pid_bh, b, h = _program(tl.cdiv(T, BLOCK_M), H)
    return pid_bh, b, h, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)


@triton.jit
def _load_rows(base, offs_r, stride_r, n_rows, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """The ``(R, BLOCK_D)`` tile of rows ``offs_r`` of the ``(rows, D)`` matrix at ``base``, zero
    outside the ``HEAD_DIM`` columns and, with ``MASK_ROWS``, the rows ``>= n_rows``."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(base, offs_r, stride_r, x, n_rows, offs_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Stores the rows ``< n_rows`` and the ``HEAD_DIM`` columns of tile ``x``, cast to the matrix dtype."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    if UPCAST:
        if base.dtype.element_ty == tl.bfloat16:
            x = round_to_bfloat16(x.to(tl.float32))
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi, n_keys, qk_scale, offs_d,
                  MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Online-softmax update, with the keys ``lo .. hi`` (masked past ``n_keys`` with ``MASK_N``), of
    the float32 unnormalised output ``acc``, the running sum ``l_i`` of ``exp2(s - m_i)`` and the
    running max ``m_i`` of the scores."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kn, n_keys, offs_d, MASK_N, HEAD_DIM, BLOCK_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_N:
            s = tl.where(offs_n[None, :] < n_keys, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rescales what was accumulated under the old max (0 on the first block: m_i = -inf).
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, stride_vn, n_keys, offs_d, MASK_N, HEAD_DIM, BLOCK_D, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_kpb, stride_kph, stride_kpn, stride_vpb, stride_vph, stride_vpn, stride_ob, stride_oh, stride_ot,
    H, T, Np, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_NP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``out`` and ``lse`` of one block of ``BLOCK_M`` queries of one ``(b, h)``."""
    pid_bh, b, h, offs_m, offs_d = _query_block(T, H, BLOCK_M, BLOCK_D)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = _load_rows(q_base, offs_m, stride_qt, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)

    # fp32 softmax statistics and accumulator whatever the input dtype.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # The prefix keys (masked), then the token keys: full blocks unmasked, then the masked tail.
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q,
        kp_ptr + b * stride_kpb + h * stride_kph, vp_ptr + b * stride_vpb + h * stride_vph, stride_kpn, stride_vpn,
        0, Np, Np, qk_scale, offs_d,
        True, HEAD_DIM, BLOCK_D, BLOCK_NP, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    t_full = (T // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, t_full, T, qk_scale, offs_d,
        False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, t_full, T, T, qk_scale, offs_d,
        True, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION,
    )  # fmt: skip

    out = acc / l_i[:, None]
    out_base = out_ptr + b * stride_ob + h * stride_oh
    _store_rows(out_base, offs_m, stride_ot, out, T, offs_d, HEAD_DIM, UPCAST)
    # Back from log2 to natural log: lse = (m + log2 l) * ln 2.
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _dq_key_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, hi, n_keys, qk_scale, offs_d,
                 MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Adds ``sum_j ds_ij k_j`` over the keys ``lo .. hi`` (masked past ``n_keys`` with ``MASK_N``)
    to the float32 accumulator ``dq``, given the query rows' ``lse2`` (log2 domain) and ``delta``."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kn, n_keys, offs_d, MASK_N, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_rows(v_base, offs_n, stride_vn, n_keys, offs_d, MASK_N, HEAD_DIM, BLOCK_D, UPCAST)
        # p = exp(s - lse), evaluated in the log2 domain.
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
        if MASK_N:
            p = tl.where(offs_n[None, :] < n_keys, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _prefix_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_kpb, stride_kph, stride_kpn, stride_vpb, stride_vph, stride_vpn,
    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    H, T, Np, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_NP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``delta`` and ``dq`` of one block of ``BLOCK_M`` queries of one ``(b, h)``."""
    pid_bh, b, h, offs_m, offs_d = _query_block(T, H, BLOCK_M, BLOCK_D)
    row_ok = offs_m < T
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    out_base = out_ptr + b * stride_ob + h * stride_oh
    q = _load_rows(q_base, offs_m, stride_qt, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    do = _load_rows(do_base, offs_m, stride_dot, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    o = _load_rows(out_base, offs_m, stride_ot, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    # delta in fp32, computed here rather than in a launch of its own; stored for the dk/dv kernel,
    # which runs after this one on the same stream.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_base = pid_bh.to(tl.int64) * T
    tl.store(delta_ptr + row_base + offs_m, delta, mask=row_ok)
    # lse in the log2 domain (1.4427 = log2(e)), like the scores.
    lse2 = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # The prefix keys (masked), then the token keys: full blocks unmasked, then the masked tail.
    dq = _dq_key_loop(
        dq, q, do, lse2, delta,
        kp_ptr + b * stride_kpb + h * stride_kph, vp_ptr + b * stride_vpb + h * stride_vph, stride_kpn, stride_vpn,
        0, Np, Np, qk_scale, offs_d,
        True, HEAD_DIM, BLOCK_D, BLOCK_NP, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    t_full = (T // BLOCK_N) * BLOCK_N
    dq = _dq_key_loop(
        dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, 0, t_full, T, qk_scale, offs_d,
        False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_key_loop(
        dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, t_full, T, T, qk_scale, offs_d,
        True, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    _store_rows(dq_ptr + b * stride_dqb + h * stride_dqh, offs_m, stride_dqt, dq * scale, T, offs_d, HEAD_DIM, UPCAST)


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, q_base, do_base, stat_base, lse_ptr, delta_ptr, stride_qt, stride_dot,
                     lo, hi, T, qk_scale, offs_d, MASK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Adds the contributions of the queries ``lo .. hi`` (masked past ``T`` with ``MASK_M``) to the
    float32 accumulators ``dk`` (of ``ds^T q``, unscaled) and ``dv`` (of ``p^T dout``) of the key
    tile ``k``, ``v``.

    Works on transposed (key, query) tiles so that no large tile is transposed. Key rows past the
    valid keys are computed on zeros and dropped at the store.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, stride_qt, T, offs_d, MASK_M, HEAD_DIM, BLOCK_D, UPCAST)
        do = _load_rows(do_base, offs_m, stride_dot, T, offs_d, MASK_M, HEAD_DIM, BLOCK_D, UPCAST)
        if MASK_M:
            # lse = +inf past T makes p exactly 0 for those queries.
            lse = tl.load(lse_ptr + stat_base + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(delta_ptr + stat_base + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(lse_ptr + stat_base + offs_m)
            delta = tl.load(delta_ptr + stat_base + offs_m)
        # p^T = exp(s^T - lse), evaluated in the log2 domain (1.4427 = log2(e)).
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :] * 1.4426950408889634)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_key_block(k_base, v_base, dk_base, dv_base, stride_kn, stride_vn, stride_dkn, stride_dvn, start_n, n_keys,
                    q_base, do_base, stat_base, lse_ptr, delta_ptr, stride_qt, stride_dot, T, scale, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """``dk`` and ``dv`` of the keys ``start_n .. start_n + BLOCK_N`` (of ``n_keys``) over all queries."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_base, offs_n, stride_kn, n_keys, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    v = _load_rows(v_base, offs_n, stride_vn, n_keys, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    # fp32 accumulators whatever the input dtype.
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    t_full = (T // BLOCK_M) * BLOCK_M
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, q_base, do_base, stat_base, lse_ptr, delta_ptr, stride_qt, stride_dot, 0, t_full, T,
        qk_scale, offs_d, False, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, q_base, do_base, stat_base, lse_ptr, delta_ptr, stride_qt, stride_dot, t_full, T, T,
        qk_scale, offs_d, True, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    _store_rows(dk_base, offs_n, stride_dkn, dk * scale, n_keys, offs_d, HEAD_DIM, UPCAST)
    _store_rows(dv_base, offs_n, stride_dvn, dv, n_keys, offs_d, HEAD_DIM, UPCAST)


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _prefix_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dkp_ptr, dvp_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_kpb, stride_kph, stride_kpn, stride_vpb, stride_vph, stride_vpn, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    stride_dkpb, stride_dkph, stride_dkpn, stride_dvpb, stride_dvph, stride_dvpn,
    H, T, Np, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_NP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``dk``, ``dv`` of one key block of one ``(b, h)``: the token blocks, then the prefix blocks,
    whose per-batch gradients go to ``dkp``, ``dvp``."""
    n_tok_blocks = tl.cdiv(T, BLOCK_N)
    pid_n, pid_bh, b, h = _program(n_tok_blocks + tl.cdiv(Np, BLOCK_NP), H)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * T

    if pid_n < n_tok_blocks:
        _dkdv_key_block(
            k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
            dk_ptr + b * stride_dkb + h * stride_dkh, dv_ptr + b * stride_dvb + h * stride_dvh,
            stride_kt, stride_vt, stride_dkt, stride_dvt, pid_n * BLOCK_N, T,
            q_base, do_base, stat_base, lse_ptr, delta_ptr, stride_qt, stride_dot, T, scale, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    else:
        _dkdv_key_block(
            kp_ptr + b * stride_kpb + h * stride_kph, vp_ptr + b * stride_vpb + h * stride_vph,
            dkp_ptr + b * stride_dkpb + h * stride_dkph, dvp_ptr + b * stride_dvpb + h * stride_dvph,
            stride_kpn, stride_vpn, stride_dkpn, stride_dvpn, (pid_n - n_tok_blocks) * BLOCK_NP, Np,
            q_base, do_base, stat_base, lse_ptr, delta_ptr, stride_qt, stride_dot, T, scale, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_NP, UPCAST, DOT_PRECISION,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def launch_config(kernel: str, T: int, Np: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and stages of one kernel (``"fwd"``, ``"dq"`` or ``"dkdv"``) for ``T``
    tokens, ``Np`` prefix keys, head dim ``D`` and input ``dtype``, as keyword arguments of its
    launch: the one place they are chosen (the launchers and, through them, the offline compilation
    gate ``tests/test_gpu_static_triton.py`` call it)."""
    # tl.dot needs every dimension >= 16; padded head-dim columns are masked.
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        # IEEE fp32 products run on FMA units and hold whole tiles in registers: small tiles.
        if block_d <= 64:
            block_m, block_n = (32, 32) if kernel == "dkdv" else (64, 32)
        else:
            block_m, block_n = (16, 16) if kernel == "dkdv" else (32, 16)
        num_warps, num_stages = 8, 2
    elif kernel == "fwd":
        block_m = 128 if T > 64 and block_d <= 128 else 64
        block_n = 64 if block_d <= 128 else 32
        # A third stage's prefetched tiles spill registers at head dims above 64 on sm_80.
        num_warps, num_stages = (8 if block_m == 128 or block_d > 128 else 4), (3 if block_d <= 64 else 2)
    else:
        block_m = block_n = 64 if block_d <= 128 else 32
        num_warps, num_stages = (4 if block_d <= 64 else 8), 2
        if kernel == "dkdv" and block_d <= 64:
            # 64 queries a step next to the 64-key block spill registers on sm_80 at 4 warps.
            block_m = 32
    return dict(
        HEAD_DIM=D,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        # Prefix keys per step: Np padded to a power of two, so Np = 10 costs 16 columns.
        BLOCK_NP=min(block_n, max(16, triton.next_power_of_2(Np))),
        # The interpreter computes garbage for bf16 tl.dot; fp16 and fp32 run unchanged.
        UPCAST=INTERPRETED and dtype == torch.bfloat16,
        # TF32 would cost ~1e-3 relative error on fp32 inputs; 16-bit operands ignore the flag.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """The three leading strides of a 4-D tensor (the last one is 1)."""
    return t.stride(0), t.stride(1), t.stride(2)


def _prefix_strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """Leading strides of a prefix tensor; batch stride 0 when its batch of 1 is broadcast."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def prefix_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``[k_prefix ; k]`` and ``[v_prefix ; v]``.

    Args:
        q, k, v: ``(B, H, T, D)``, one dtype (float32/float16/bfloat16), any strides; a non-unit
            last stride costs a copy.
        k_prefix, v_prefix: ``(Bp, H, Np, D)`` with ``Bp`` equal to ``B`` or 1 (broadcast over the
            batch); any strides, including a batch stride of 0.
        scale: softmax scale applied to ``q . k``.

    Returns:
        ``out``: ``(B, H, T, D)`` in ``q.dtype`` with memory layout ``(B, T, H, D)``, and ``lse``:
        ``(B, H, T)`` float32, contiguous, ``log sum_j exp(scale * q . k_j)`` (natural log).
    """
    q, k, v, k_prefix, v_prefix = (unit_last_stride(t) for t in (q, k, v, k_prefix, v_prefix))
    B, H, T, D = q.shape
    Np = k_prefix.shape[2]
    out = empty_token_major(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    cfg = launch_config("fwd", T, Np, D, q.dtype)
    with device_guard(q):
        _prefix_attention_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](
            q, k, v, k_prefix, v_prefix, out, lse,
            *_strides3(q), *_strides3(k), *_strides3(v),
            *_prefix_strides3(k_prefix), *_prefix_strides3(v_prefix), *_strides3(out),
            H, T, Np, scale * _LOG2E, **cfg,
        )  # fmt: skip
    return out, lse


def prefix_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`prefix_attention_forward`.

    Args:
        dout: ``(B, H, T, D)`` gradient of ``out``, any strides.
        q, k, v, k_prefix, v_prefix, scale: the forward inputs.
        out: ``(B, H, T, D)`` forward output.
        lse: ``(B, H, T)`` float32 log-sum-exp from the forward pass.

    Returns:
        ``dq, dk, dv``: ``(B, H, T, D)`` in the input dtype with memory layout ``(B, T, H, D)``;
        ``dk_prefix, dv_prefix``: ``k_prefix``'s shape ``(Bp, H, Np, D)``, contiguous, input dtype,
        summed over the batch when ``Bp == 1``.
    """
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(
            f"dout {tuple(dout.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)} do not match q {tuple(q.shape)}"
        )
    dout, q, k, v, k_prefix, v_prefix, out = (unit_last_stride(t) for t in (dout, q, k, v, k_prefix, v_prefix, out))
    lse = lse.float().contiguous()
    B, H, T, D = q.shape
    Bp, _, Np, _ = k_prefix.shape
    dq, dk, dv = empty_token_major(q), empty_token_major(q), empty_token_major(q)
    if dq.numel() == 0:
        zeros = torch.zeros(k_prefix.shape, dtype=q.dtype, device=q.device)
        return dq, dk, dv, zeros, zeros.clone()
    # Per-batch prefix gradients: final when Bp == B, else fp32 partials summed below.
    partial_dtype = q.dtype if Bp == B else torch.float32
    dkp = torch.empty((B, H, Np, D), dtype=partial_dtype, device=q.device)
    dvp = torch.empty((B, H, Np, D), dtype=partial_dtype, device=q.device)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)

    with device_guard(q):
        cfg = launch_config("dq", T, Np, D, q.dtype)
        _prefix_attention_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](
            q, k, v, k_prefix, v_prefix, out, dout, lse, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v),
            *_prefix_strides3(k_prefix), *_prefix_strides3(v_prefix),
            *_strides3(out), *_strides3(dout), *_strides3(dq),
            H, T, Np, scale, scale * _LOG2E, **cfg,
        )  # fmt: skip
        cfg = launch_config("dkdv", T, Np, D, q.dtype)
        n_key_blocks = triton.cdiv(T, cfg["BLOCK_N"]) + triton.cdiv(Np, cfg["BLOCK_NP"])
        _prefix_attention_bwd_dkdv_kernel[(n_key_blocks * B * H,)](
            q, k, v, k_prefix, v_prefix, dout, lse, delta, dk, dv, dkp, dvp,
            *_strides3(q), *_strides3(k), *_strides3(v),
            *_prefix_strides3(k_prefix), *_prefix_strides3(v_prefix), *_strides3(dout),
            *_strides3(dk), *_strides3(dv), *_strides3(dkp), *_strides3(dvp),
            H, T, Np, scale, scale * _LOG2E, **cfg,
        )  # fmt: skip
    if Bp != B:
        dkp = dkp.sum(0, keepdim=True).to(q.dtype)
        dvp = dvp.sum(0, keepdim=True).to(q.dtype)
    return dq, dk, dv, dkp, dvp
