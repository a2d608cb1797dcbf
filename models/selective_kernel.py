"""One selective block's step as a single compiled loop nest (numba), for CPU tensors.

The TorchScript fused step (`selective_fused.model_step`) still runs ~17 tensor ops per block,
each a dispatch of a few microseconds over vectors of a few hundred floats: at batch 1 that
dispatch, not the ~0.5 M multiply-accumulates, is the step's cost. Here the whole block is one
call to machine code: the matrix-vector products as row-by-row axpy loops over the transposed
weights (contiguous, so they vectorise), everything else fused into the loops over channels.
Same maths over the same derived weights as `selective_fused.block_step`:

    x, z   = in_t-projection of u / hypot(‖u‖, √(D·eps))   (RMSNorm folded into in_t)
    x_conv = silu(conv taps · [conv_state, x] + conv_bias)
    dt, B, C = x_conv @ x_t ; dt = softplus(dt @ dt_t + dt_bias)
    h      = exp(dt·A) · h + dt·x_conv·B
    out    = u + ((h · C) + D·x_conv) · silu(z) @ out_t

Batch rows are independent and run one after another: the matrix-vector loops read every
weight once per row, so past a few rows torch's batched matmuls win (`KERNEL_MAX_BATCH`,
bench/fused_step.py). Compiled on first use for each dtype (a second or two) and cached on
disk beside this file where it is writable; `nogil`, so server threads step concurrently.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Batches up to this many rows take the kernel; larger ones the TorchScript step, whose
# batched matmuls read each weight once for all rows (bench/fused_step.py: the kernel is
# ~2x TorchScript at batch 1, level at about 8 rows on this CPU).
KERNEL_MAX_BATCH = 4

# Reordered sums (vectorised dot products) and fused multiply-adds; not "no NaN/inf", so a
# non-finite state propagates as torch's ops would propagate it.
_FAST_MATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=True, nogil=True, fastmath=_FAST_MATH)
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


@numba.njit(cache=True, nogil=True, fastmath=_FAST_MATH)
def _silu(v):
    return v / (1.0 + math.exp(-v))


@numba.njit(cache=True, nogil=True, fastmath=_FAST_MATH)
def block_step(
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


@numba.njit(cache=True, nogil=True, fastmath=_FAST_MATH)
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
