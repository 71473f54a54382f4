"""Triton kernels for ``prefix_attention``: flash attention of the token queries over a key/value
prefix that lives in its own tensors.

Shapes: ``B`` batch, ``H`` heads, ``T`` tokens, ``D`` head dim, ``Np`` prefix (prompt) keys,
``Bp`` prefix batch (``B``, or 1 for static prompts broadcast over the batch).

* ``q, k, v``: ``(B, H, T, D)``, any strides with a unit last stride (they are permuted views of the
  fused QKV projection, so no copy is made).
* ``k_prefix, v_prefix``: ``(Bp, H, Np, D)``; a batch stride of 0 (``.expand``) is fine.
* ``out`` and ``dq, dk, dv``: logical ``(B, H, T, D)`` with memory layout ``(B, T, H, D)``, so the
  block's ``out.transpose(1, 2).reshape(B, T, H * D)`` is free.
* ``lse``: ``(B, H, T)`` float32, natural log; ``delta = rowsum(dout * out)``: ``(B, H, T)`` float32.

Why separate tensors and not ``cat((k_prefix, k))``: the concatenation copies all keys and values
of every block, forward and backward. Here each program walks the prefix keys first (masked, in
blocks of ``next_pow2(Np)`` so ``Np = 10`` costs 16 columns, not a full key block), then the token
keys in unmasked full blocks, then one masked tail block: the main loop carries no key mask (and no
mask at all when ``D`` is a power of two >= 16).

Kernels (every grid is 1-D, block index fastest, so neighbouring programs share one ``(b, h)`` and
its keys stay in L2; 1-D also avoids the 65535 limit of a second grid axis):

* ``_prefix_attention_fwd_kernel``: one program per (query block, ``b * H + h``); online softmax in the
  log2 domain with float32 running max, sum and accumulator.
* ``_prefix_attention_bwd_dq_kernel``: one program per (query block, ``b * H + h``); computes ``delta``
  for its rows first (so no separate preprocessing launch), stores it for the next kernel, then
  loops over the prefix and token keys accumulating ``dq``.
* ``_prefix_attention_bwd_dkdv_kernel``: one program per (key block, ``b * H + h``) where the key
  blocks are the token blocks followed by the prefix blocks; each loops over all query blocks. The
  prefix blocks write per-batch gradients ``(B, H, Np, D)``: straight into ``dk_prefix`` when
  ``Bp == B``, into a float32 buffer summed over the batch by the launcher when ``Bp == 1``. Every
  output element has exactly one writer: no atomics.

Precision: scores, softmax statistics and all accumulators are float32; on the GPU ``tl.dot`` takes
fp16/bf16 operands (tensor cores) and the probabilities are rounded to the input dtype before the
second product, as in flash attention. float32 inputs use IEEE products (no TF32). Triton's CPU
interpreter mishandles bf16 (its ``tl.dot`` returns garbage, and its conversion to bf16 truncates), so when
interpreting, bf16 tiles are cast to float32 right after loading and rounded to nearest before bf16 stores
(``UPCAST``); fp16 and fp32 run the GPU code path there unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# Kernel arguments not specialised on (divisible by 16, equal to 1): one compiled kernel serves every
# head count and prompt count. Strides stay specialised: their divisibility allows vector loads.
_SHAPE_ARGS = ["H", "Np"]


# --------------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(
    base,  # pointer to row 0 of a (rows, D) matrix with unit column stride
    offs_r,  # (R,) row indices
    stride_r,  # row stride
    n_rows,  # number of valid rows
    offs_d,  # (BLOCK_D,) column indices
    MASK_ROWS: tl.constexpr,  # mask rows >= n_rows (False: every row is valid)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    UPCAST: tl.constexpr,  # cast to fp32 after loading (interpreter with bf16)
):
    """Loads an (R, BLOCK_D) tile, zero outside the valid rows and the ``HEAD_DIM`` columns."""
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
def round_to_bfloat16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), still as float32. The
    interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest); converting
    a value rounded here is exact, so interpreted stores round as compiled ones do."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN kept as it is


@triton.jit
def _store_rows(
    base,  # pointer to row 0 of a (rows, D) matrix with unit column stride
    offs_r,  # (R,) row indices
    stride_r,  # row stride
    x,  # (R, BLOCK_D) values
    n_rows,  # number of valid rows
    offs_d,  # (BLOCK_D,) column indices
    HEAD_DIM: tl.constexpr,  # D
    UPCAST: tl.constexpr,  # interpreter with bf16: round bf16 stores to nearest first
):
    """Stores the valid rows and ``HEAD_DIM`` columns of a tile, cast to the matrix dtype."""
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
def _fwd_key_loop(
    acc,  # (BLOCK_M, BLOCK_D) fp32 unnormalised output
    l_i,  # (BLOCK_M,) fp32 running sum of exp2(s - m_i)
    m_i,  # (BLOCK_M,) fp32 running max of the log2-domain scores
    q,  # (BLOCK_M, BLOCK_D) query tile
    k_base,  # pointer to key row 0 of this (b, h): (n_keys, D)
    v_base,  # pointer to value row 0 of this (b, h): (n_keys, D)
    stride_kn,  # key row stride
    stride_vn,  # value row stride
    lo,  # first key of the loop (a multiple of BLOCK_N)
    hi,  # end of the loop
    n_keys,  # valid keys (masks the rows past it when MASK_N)
    qk_scale,  # softmax scale * log2(e)
    offs_d,  # (BLOCK_D,) column indices
    MASK_N: tl.constexpr,  # mask keys >= n_keys (False: the block is full)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_N: tl.constexpr,  # keys per step
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 (interpreter with bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    """Online-softmax update of ``(acc, l_i, m_i)`` with the keys ``lo .. hi``."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kn, n_keys, offs_d, MASK_N, HEAD_DIM, BLOCK_D, UPCAST)
        # Scores in the log2 domain, so exp2 replaces exp.
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
    q_ptr,  # (B, H, T, D) queries
    k_ptr,  # (B, H, T, D) token keys
    v_ptr,  # (B, H, T, D) token values
    kp_ptr,  # (Bp, H, Np, D) prefix keys
    vp_ptr,  # (Bp, H, Np, D) prefix values
    out_ptr,  # (B, H, T, D) output, input dtype, memory layout (B, T, H, D)
    lse_ptr,  # (B, H, T) fp32 contiguous, natural-log log-sum-exp
    stride_qb, stride_qh, stride_qt,  # q strides (batch, head, token)
    stride_kb, stride_kh, stride_kt,  # k strides
    stride_vb, stride_vh, stride_vt,  # v strides
    stride_kpb, stride_kph, stride_kpn,  # k_prefix strides; batch stride 0 when broadcast
    stride_vpb, stride_vph, stride_vpn,  # v_prefix strides; batch stride 0 when broadcast
    stride_ob, stride_oh, stride_ot,  # out strides
    H,  # heads
    T,  # tokens (queries and token keys)
    Np,  # prefix keys
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # token keys per step
    BLOCK_NP: tl.constexpr,  # prefix keys per step
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 (interpreter with bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    n_mblocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    pid_bh = pid // n_mblocks
    # int64: batch offsets of the (B, T, 3, H, D) projection exceed 2**31 elements at large B.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = _load_rows(q_base, offs_m, stride_qt, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)

    # fp32 softmax statistics and accumulator whatever the input dtype.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

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
def _dq_key_loop(
    dq,  # (BLOCK_M, BLOCK_D) fp32 accumulator of ds @ k (unscaled)
    q,  # (BLOCK_M, BLOCK_D) query tile
    do,  # (BLOCK_M, BLOCK_D) output-gradient tile
    lse2,  # (BLOCK_M,) fp32 log-sum-exp in the log2 domain
    delta,  # (BLOCK_M,) fp32 rowsum(dout * out)
    k_base,  # pointer to key row 0 of this (b, h): (n_keys, D)
    v_base,  # pointer to value row 0 of this (b, h): (n_keys, D)
    stride_kn,  # key row stride
    stride_vn,  # value row stride
    lo,  # first key of the loop (a multiple of BLOCK_N)
    hi,  # end of the loop
    n_keys,  # valid keys (masks the columns past it when MASK_N)
    qk_scale,  # softmax scale * log2(e)
    offs_d,  # (BLOCK_D,) column indices
    MASK_N: tl.constexpr,  # mask keys >= n_keys (False: the block is full)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_N: tl.constexpr,  # keys per step
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 (interpreter with bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    """Adds ``sum_j ds_ij k_j`` over the keys ``lo .. hi`` to ``dq``."""
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
    q_ptr,  # (B, H, T, D) queries
    k_ptr,  # (B, H, T, D) token keys
    v_ptr,  # (B, H, T, D) token values
    kp_ptr,  # (Bp, H, Np, D) prefix keys
    vp_ptr,  # (Bp, H, Np, D) prefix values
    out_ptr,  # (B, H, T, D) forward output
    do_ptr,  # (B, H, T, D) output gradient
    lse_ptr,  # (B, H, T) fp32 contiguous, natural-log log-sum-exp
    delta_ptr,  # (B, H, T) fp32 contiguous, written here: rowsum(dout * out)
    dq_ptr,  # (B, H, T, D) query gradient, input dtype
    stride_qb, stride_qh, stride_qt,  # q strides (batch, head, token)
    stride_kb, stride_kh, stride_kt,  # k strides
    stride_vb, stride_vh, stride_vt,  # v strides
    stride_kpb, stride_kph, stride_kpn,  # k_prefix strides; batch stride 0 when broadcast
    stride_vpb, stride_vph, stride_vpn,  # v_prefix strides; batch stride 0 when broadcast
    stride_ob, stride_oh, stride_ot,  # out strides
    stride_dob, stride_doh, stride_dot,  # dout strides
    stride_dqb, stride_dqh, stride_dqt,  # dq strides
    H,  # heads
    T,  # tokens
    Np,  # prefix keys
    scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # token keys per step
    BLOCK_NP: tl.constexpr,  # prefix keys per step
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 (interpreter with bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    n_mblocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    pid_bh = pid // n_mblocks
    # int64: batch offsets of the (B, T, 3, H, D) projection exceed 2**31 elements at large B.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    out_base = out_ptr + b * stride_ob + h * stride_oh
    q = _load_rows(q_base, offs_m, stride_qt, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    do = _load_rows(do_base, offs_m, stride_dot, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    o = _load_rows(out_base, offs_m, stride_ot, T, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    # delta in fp32; stored for the dk/dv kernel, which runs after this one on the same stream.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_base = pid_bh.to(tl.int64) * T
    tl.store(delta_ptr + row_base + offs_m, delta, mask=row_ok)
    # lse in the log2 domain (1.4427 = log2(e)), like the scores.
    lse2 = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
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
def _dkdv_query_loop(
    dk,  # (BLOCK_N, BLOCK_D) fp32 accumulator of ds^T @ q (unscaled)
    dv,  # (BLOCK_N, BLOCK_D) fp32 accumulator of p^T @ dout
    k,  # (BLOCK_N, BLOCK_D) key tile
    v,  # (BLOCK_N, BLOCK_D) value tile
    q_base,  # pointer to query row 0 of this (b, h): (T, D)
    do_base,  # pointer to output-gradient row 0 of this (b, h): (T, D)
    stat_base,  # offset of row 0 of this (b, h) in lse and delta
    lse_ptr,  # (B, H, T) fp32 natural-log log-sum-exp
    delta_ptr,  # (B, H, T) fp32 rowsum(dout * out)
    stride_qt,  # query row stride
    stride_dot,  # output-gradient row stride
    lo,  # first query of the loop (a multiple of BLOCK_M)
    hi,  # end of the loop
    T,  # valid queries (masks the rows past it when MASK_M)
    qk_scale,  # softmax scale * log2(e)
    offs_d,  # (BLOCK_D,) column indices
    MASK_M: tl.constexpr,  # mask queries >= T (False: the block is full)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_M: tl.constexpr,  # queries per step
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 (interpreter with bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    """Adds the contributions of the queries ``lo .. hi`` to ``dk`` and ``dv``.

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
def _dkdv_key_block(
    k_base,  # pointer to key row 0 of this (b, h): (n_keys, D)
    v_base,  # pointer to value row 0 of this (b, h): (n_keys, D)
    dk_base,  # pointer to key-gradient row 0 of this (b, h): (n_keys, D)
    dv_base,  # pointer to value-gradient row 0 of this (b, h): (n_keys, D)
    stride_kn, stride_vn, stride_dkn, stride_dvn,  # row strides of k, v, dk, dv
    start_n,  # first key of the block
    n_keys,  # valid keys
    q_base,  # pointer to query row 0 of this (b, h): (T, D)
    do_base,  # pointer to output-gradient row 0 of this (b, h): (T, D)
    stat_base,  # offset of row 0 of this (b, h) in lse and delta
    lse_ptr,  # (B, H, T) fp32 natural-log log-sum-exp
    delta_ptr,  # (B, H, T) fp32 rowsum(dout * out)
    stride_qt,  # query row stride
    stride_dot,  # output-gradient row stride
    T,  # tokens (queries)
    scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys of the block
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 (interpreter with bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    """``dk`` and ``dv`` of the keys ``start_n .. start_n + BLOCK_N`` over all queries."""
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
    q_ptr,  # (B, H, T, D) queries
    k_ptr,  # (B, H, T, D) token keys
    v_ptr,  # (B, H, T, D) token values
    kp_ptr,  # (Bp, H, Np, D) prefix keys
    vp_ptr,  # (Bp, H, Np, D) prefix values
    do_ptr,  # (B, H, T, D) output gradient
    lse_ptr,  # (B, H, T) fp32 contiguous, natural-log log-sum-exp
    delta_ptr,  # (B, H, T) fp32 contiguous, rowsum(dout * out)
    dk_ptr,  # (B, H, T, D) token-key gradient, input dtype
    dv_ptr,  # (B, H, T, D) token-value gradient, input dtype
    dkp_ptr,  # (B, H, Np, D) per-batch prefix-key gradient (input dtype, or fp32 partials to sum)
    dvp_ptr,  # (B, H, Np, D) per-batch prefix-value gradient (input dtype, or fp32 partials to sum)
    stride_qb, stride_qh, stride_qt,  # q strides (batch, head, token)
    stride_kb, stride_kh, stride_kt,  # k strides
    stride_vb, stride_vh, stride_vt,  # v strides
    stride_kpb, stride_kph, stride_kpn,  # k_prefix strides; batch stride 0 when broadcast
    stride_vpb, stride_vph, stride_vpn,  # v_prefix strides; batch stride 0 when broadcast
    stride_dob, stride_doh, stride_dot,  # dout strides
    stride_dkb, stride_dkh, stride_dkt,  # dk strides
    stride_dvb, stride_dvh, stride_dvt,  # dv strides
    stride_dkpb, stride_dkph, stride_dkpn,  # dkp strides
    stride_dvpb, stride_dvph, stride_dvpn,  # dvp strides
    H,  # heads
    T,  # tokens
    Np,  # prefix keys
    scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # token keys per program
    BLOCK_NP: tl.constexpr,  # prefix keys per program
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 (interpreter with bf16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    n_tok_blocks = tl.cdiv(T, BLOCK_N)
    n_blocks = n_tok_blocks + tl.cdiv(Np, BLOCK_NP)
    pid = tl.program_id(0)
    pid_n = pid % n_blocks
    pid_bh = pid // n_blocks
    # int64: batch offsets of the (B, T, 3, H, D) projection exceed 2**31 elements at large B.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
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

# With TRITON_INTERPRET=1 set before import, @triton.jit returns interpreter functions instead.
INTERPRETED = not isinstance(_prefix_attention_fwd_kernel, triton.runtime.JITFunction)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last stride is 1 (what the kernels index), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_like_out(q: torch.Tensor) -> torch.Tensor:
    """Uninitialised ``(B, H, T, D)`` tensor with the ``(B, T, H, D)`` memory layout."""
    B, H, T, D = q.shape
    return torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU the current one (Triton launches on the current device and stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_config(kernel: str, T: int, Np: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and stages of one kernel: a fixed heuristic (no autotuning, which the
    interpreter cannot run), the one place they are chosen (the launchers and the offline
    compilation gate, ``tests/test_gpu_static_triton.py``, call it), checked there for sm_80 and
    sm_90: no register spills, shared memory within a block's limit, no TF32 for float32 inputs.

    Args:
        kernel: ``"fwd"``, ``"dq"`` or ``"dkdv"``.
        T, Np, D: tokens, prefix keys, head dim.
        dtype: input dtype.

    Returns:
        The meta-parameters and launch options of the kernel, as keyword arguments.
    """
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
    q, k, v, k_prefix, v_prefix = (_unit_last_stride(t) for t in (q, k, v, k_prefix, v_prefix))
    B, H, T, D = q.shape
    Np = k_prefix.shape[2]
    out = _empty_like_out(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    cfg = _launch_config("fwd", T, Np, D, q.dtype)
    with _device_guard(q):
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
    dout, q, k, v, k_prefix, v_prefix, out = (
        _unit_last_stride(t) for t in (dout, q, k, v, k_prefix, v_prefix, out)
    )
    lse = lse.float().contiguous()
    B, H, T, D = q.shape
    Bp, _, Np, _ = k_prefix.shape
    dq, dk, dv = _empty_like_out(q), _empty_like_out(q), _empty_like_out(q)
    if dq.numel() == 0:
        zeros = torch.zeros(k_prefix.shape, dtype=q.dtype, device=q.device)
        return dq, dk, dv, zeros, zeros.clone()
    # Per-batch prefix gradients: final when Bp == B, else fp32 partials summed below.
    partial_dtype = q.dtype if Bp == B else torch.float32
    dkp = torch.empty((B, H, Np, D), dtype=partial_dtype, device=q.device)
    dvp = torch.empty((B, H, Np, D), dtype=partial_dtype, device=q.device)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)

    with _device_guard(q):
        cfg = _launch_config("dq", T, Np, D, q.dtype)
        _prefix_attention_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](
            q, k, v, k_prefix, v_prefix, out, dout, lse, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v),
            *_prefix_strides3(k_prefix), *_prefix_strides3(v_prefix),
            *_strides3(out), *_strides3(dout), *_strides3(dq),
            H, T, Np, scale, scale * _LOG2E, **cfg,
        )  # fmt: skip
        cfg = _launch_config("dkdv", T, Np, D, q.dtype)
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
