"""Batch-1 steps as single compiled loop nests (numba), for CPU tensors.

A fused step (models/*_fused.py) still runs a dozen or more tensor ops per layer, each a
dispatch of a few microseconds over vectors of a few hundred floats: at batch 1 that
dispatch, not the arithmetic, is the step's cost. Here a layer's whole step is one call to
machine code: the matrix-vector products as axpy loops over transposed weights (contiguous,
so they vectorise), everything else fused into the loops over channels. Each kernel computes
the maths of its fused step over the same derived weights:

- `selective_block_step`, `rms_head`: one selective SSM block (`selective_fused.block_step`)
  and the RMSNorm-folded head;

      x, z   = in_t-projection of u / hypot(‖u‖, √(D·eps))   (RMSNorm folded into in_t)
      x_conv = silu(conv taps · [conv_state, x] + conv_bias)
      dt, B, C = x_conv @ x_t ; dt = softplus(dt @ dt_t + dt_bias)
      h      = exp(dt·A) · h + dt·x_conv·B
      out    = u + ((h · C) + D·x_conv) · silu(z) @ out_t

- `lru_layer_step`, `norm_head`: one LRU layer (`lru_fused.model_step`'s loop body) and the
  normalised head;

      u = Norm(x) ; [h_re', h_im', y] = [h_re, h_im, u] @ transition_t
      [a, b] = gelu(y) @ glu_t + glu_bias ; x' = x + a · sigmoid(b)

Batch rows are independent and run one after another: the matrix-vector loops read every
weight once per row, so past a few rows torch's batched matmuls win (`KERNEL_MAX_BATCH`,
bench/fused_step.py). Compiled on first use for each dtype (seconds) and cached on disk
(`compiled`); `nogil`, so server threads step concurrently.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Batches up to this many rows take a kernel; larger ones the torch step, whose batched
# matmuls read each weight once for all rows (bench/fused_step.py: digits-lru's kernel 3.3x
# its torch ops at batch 1 and 1.4x at 4, charlm-selective's 2.0x and 1.2x; both level at
# about 8 rows on this CPU).
KERNEL_MAX_BATCH = 4

# Reordered sums (vectorised dot products) and fused multiply-adds; not "no NaN/inf", so a
# non-finite state propagates as torch's ops would propagate it.
_FAST_MATH = {"reassoc", "contract", "nsz", "arcp"}


def compiled(function):
    """`function` compiled by numba (no GIL held while it runs), its machine code cached on
    disk where numba finds a writable place (beside this file, or the user's cache
    directory); where none is (a read-only filesystem), compiled afresh in each process
    rather than failing at import, which is where numba's cache raises."""
    options = {"nogil": True, "fastmath": _FAST_MATH}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(**options)(function)


@compiled
def _vector_times_matrix(x, w_t, out):  # x [I], w_t [I, O] -> out [O] = x @ w_t
    """Four rows of w_t per pass over `out`: a quarter of the loads and stores of `out` that
    one row per pass costs (1.4x faster at [192, 768]: bench on this CPU, BLAS's sgemv level)."""
    rows, columns = w_t.shape
    out[:] = 0.0
    whole = rows - rows % 4
    for i in range(0, whole, 4):
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        r0, r1, r2, r3 = w_t[i], w_t[i + 1], w_t[i + 2], w_t[i + 3]
        for j in range(columns):
            out[j] += x0 * r0[j] + x1 * r1[j] + x2 * r2[j] + x3 * r3[j]
    for i in range(whole, rows):
        xi, row = x[i], w_t[i]
        for j in range(columns):
            out[j] += xi * row[j]


@compiled
def _silu(v):
    return v / (1.0 + math.exp(-v))


@compiled
def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


@compiled
def _gelu(v):  # the exact (erf) GELU, F.gelu's default
    return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))


@compiled
def _normalise(x, weight, bias, rms, eps, out):
    """out [H] = LayerNorm(x) (biased variance, as torch) or, with `rms`, RMSNorm(x)."""
    size = x.shape[0]
    mean = 0.0
    if not rms:
        for i in range(size):
            mean += x[i]
        mean /= size
    variance = 0.0
    for i in range(size):
        centred = x[i] - mean
        variance += centred * centred
    inverse = 1.0 / math.sqrt(variance / size + eps)
    for i in range(size):
        out[i] = (x[i] - mean) * inverse * weight[i]
        if not rms:
            out[i] += bias[i]


@compiled
def selective_block_step(
    u,  # [B, D]
    conv_state,  # [B, E, K-1]
    ssm_state,  # [B, E, N]
    in_t,  # [D, 2E], RMSNorm's gain and √D folded in
    conv_weight,  # [E, K]
    conv_bias,  # [E]
    x_t,  # [E, R + 2N]
    dt_t,  # [R, E]
    dt_bias,  # [E]
    A,  # [E, N], −exp(A_log)
    D,  # [E]
    out_t,  # [E, D]
    sqrt_d_eps,  # √(D · eps) of the block's norm
):
    """(u + Mixer(RMSNorm(u)) [B, D], new conv state, new ssm state); inputs unchanged."""
    batch, d_model = u.shape
    E, K = conv_weight.shape
    N = A.shape[1]
    R = dt_t.shape[0]
    out = np.empty_like(u)
    new_conv = np.empty_like(conv_state)
    new_ssm = np.empty_like(ssm_state)
    xz = np.empty(2 * E, u.dtype)  # in_proj(RMSNorm(u)): x then z
    x_conv = np.empty(E, u.dtype)
    dt_b_c = np.empty(R + 2 * N, u.dtype)  # x_proj(x_conv): dt (low rank), B, C
    dt = np.empty(E, u.dtype)
    y = np.empty(E, u.dtype)
    for b in range(batch):
        ub = u[b]
        squares = 0.0
        for i in range(d_model):
            squares += ub[i] * ub[i]
        inverse_rms = 1.0 / math.sqrt(squares + sqrt_d_eps * sqrt_d_eps)
        _vector_times_matrix(ub, in_t, xz)
        for i in range(2 * E):
            xz[i] *= inverse_rms
        window, next_window = conv_state[b], new_conv[b]  # [E, K-1] each
        for e in range(E):
            tap = conv_bias[e] + xz[e] * conv_weight[e, K - 1]
            for k in range(K - 1):
                tap += window[e, k] * conv_weight[e, k]
            x_conv[e] = _silu(tap)
            for k in range(K - 2):  # the window slides by one (SelectiveConfig: K >= 2)
                next_window[e, k] = window[e, k + 1]
            next_window[e, K - 2] = xz[e]
        _vector_times_matrix(x_conv, x_t, dt_b_c)
        _vector_times_matrix(dt_b_c[:R], dt_t, dt)
        h, next_h = ssm_state[b], new_ssm[b]  # [E, N] each
        for e in range(E):
            v = dt[e] + dt_bias[e]
            dt_e = v if v > 20.0 else math.log1p(math.exp(v))  # softplus, torch's threshold
            drive = dt_e * x_conv[e]
            readout = D[e] * x_conv[e]
            for n in range(N):
                h_en = math.exp(dt_e * A[e, n]) * h[e, n] + drive * dt_b_c[R + n]
                next_h[e, n] = h_en
                readout += h_en * dt_b_c[R + N + n]
            y[e] = readout * _silu(xz[E + e])
        _vector_times_matrix(y, out_t, out[b])
        for i in range(d_model):
            out[b, i] += ub[i]
    return out, new_conv, new_ssm


@compiled
def rms_head(u, head_t, sqrt_d_eps):
    """Head(RMSNorm(u)) with the norm folded into head_t [D, n_out]: logits [B, n_out]."""
    batch, d_model = u.shape
    logits = np.empty((batch, head_t.shape[1]), u.dtype)
    for b in range(batch):
        squares = 0.0
        for i in range(d_model):
            squares += u[b, i] * u[b, i]
        _vector_times_matrix(u[b], head_t, logits[b])
        logits[b] /= math.sqrt(squares + sqrt_d_eps * sqrt_d_eps)
    return logits


# ---- the LRU -----------------------------------------------------------------------------


@compiled
def lru_layer_step(
    x,  # [B, H]
    h_re,  # [B, N]
    h_im,  # [B, N]
    norm_weight,  # [H]
    norm_bias,  # [H], unused (any shape) when rms
    rms,  # RMSNorm rather than LayerNorm
    eps,
    transition_t,  # [2N + H, 2N + H]: new state and readout from [h_re, h_im, u]
    glu_t,  # [H, 2H]
    glu_bias,  # [2H]
):
    """(x + GLU(gelu(y)) [B, H], new h_re, new h_im); inputs unchanged."""
    batch, H = x.shape
    N = h_re.shape[1]
    out = np.empty_like(x)
    new_re = np.empty_like(h_re)
    new_im = np.empty_like(h_im)
    z = np.empty(2 * N + H, x.dtype)  # [h_re, h_im, Norm(x)]
    mixed = np.empty(2 * N + H, x.dtype)  # [h_re', h_im', y]
    gated = np.empty(2 * H, x.dtype)  # [a, b]
    for row in range(batch):
        z[:N] = h_re[row]
        z[N : 2 * N] = h_im[row]
        _normalise(x[row], norm_weight, norm_bias, rms, eps, z[2 * N :])
        _vector_times_matrix(z, transition_t, mixed)
        new_re[row] = mixed[:N]
        new_im[row] = mixed[N : 2 * N]
        y = mixed[2 * N :]
        for i in range(H):
            y[i] = _gelu(y[i])
        _vector_times_matrix(y, glu_t, gated)
        for i in range(H):
            a = gated[i] + glu_bias[i]
            b = gated[H + i] + glu_bias[H + i]
            out[row, i] = x[row, i] + a * _sigmoid(b)
    return out, new_re, new_im


@compiled
def norm_head(x, norm_weight, norm_bias, rms, eps, head_t, head_bias):
    """Head(Norm(x)): logits [B, n_out] from x [B, H], head_t [H, n_out], head_bias [n_out]."""
    batch, H = x.shape
    logits = np.empty((batch, head_t.shape[1]), x.dtype)
    u = np.empty(H, x.dtype)
    for row in range(batch):
        _normalise(x[row], norm_weight, norm_bias, rms, eps, u)
        _vector_times_matrix(u, head_t, logits[row])
        logits[row] += head_bias
    return logits
