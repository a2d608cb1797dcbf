"""Linear Recurrent Unit (LRU) stack.

Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu, De, "Resurrecting Recurrent Neural Networks
for Long Sequences", ICML 2023 (arXiv:2303.06349).

Each layer holds a diagonal complex recurrence over N states, driven by H features:

    h_t = Λ ⊙ h_{t-1} + γ ⊙ (B u_t),      y_t = Re(C h_t) + D ⊙ u_t

with Λ = exp(−exp(ν) + i·exp(θ)) (stable by construction: |Λ| = exp(−exp(ν)) < 1) and the
normalisation γ = sqrt(1 − |Λ|²), which keeps the state's variance independent of |Λ|.
Λ starts uniformly distributed on the ring r_min ≤ |Λ| ≤ r_max (as in the paper, |Λ|² is
uniform) with phase uniform in [0, max_phase].

The complex state is kept as a real/imaginary pair ("layers.{i}.h_re", "layers.{i}.h_im",
[B, N]) and `step` uses real arithmetic only, so the state serialises as plain tensors and
`step` exports to ONNX. `forward` runs the recurrence as a parallel (doubling) scan in
O(log T) sequential depth; `_scan_sequential` is the obvious loop kept beside it as the
reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import InputEncoder, State, StatefulModel, check_common_config
from models.fused import fused_step_applies
from models.lru_fused import fused_lru_step, fused_weights

NORMS = ("layernorm", "rmsnorm")


@dataclass
class LRUConfig:
    # Defaults are the digits classifier (8 rows of 8 pixels valued 0..16, 10 classes).
    d_input: int = 8
    vocab_size: int = 0
    input_kind: str = "features"
    d_output: int = 10
    d_model: int = 64
    d_state: int = 64  # N, complex states per layer
    n_layers: int = 2
    input_scale: float = 1.0 / 16.0
    r_min: float = 0.4
    r_max: float = 0.95
    max_phase: float = math.pi
    norm: str = "layernorm"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_common_config(self)
        if self.d_state < 1:
            raise ValueError(f"d_state must be >= 1, got {self.d_state}")
        if not 0.0 <= self.r_min < self.r_max < 1.0:
            raise ValueError(
                f"need 0 <= r_min < r_max < 1, got r_min={self.r_min}, r_max={self.r_max}"
            )
        if not 0.0 < self.max_phase <= 2 * math.pi:
            raise ValueError(f"max_phase must lie in (0, 2π], got {self.max_phase}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


# ---- the diagonal complex scan ------------------------------------------------------------


def _scan_sequential(lam: Tensor, bu: Tensor, h0: Tensor) -> Tensor:
    """Reference: h_t = lam * h_{t-1} + bu_t, one step at a time. lam [N], bu [B, T, N],
    h0 [B, N] (complex); returns every h_t, [B, T, N]."""
    h = h0
    out = []
    for bu_t in bu.unbind(1):
        h = lam * h + bu_t  # [B, N]
        out.append(h)
    return torch.stack(out, dim=1)  # [B, T, N]


def _scan_parallel(lam: Tensor, bu: Tensor, h0: Tensor) -> Tensor:
    """Same result as `_scan_sequential` in ceil(log2 T) doubling rounds (Hillis-Steele).

    After round k, h[t] = Σ_{j < 2^k} lam^j · bu[t-j]; each round adds the partial sum 2^k
    steps back, weighted by lam^(2^k). The initial state enters as part of the first input.
    """
    first = bu[:, :1] + (lam * h0).unsqueeze(1)  # [B, 1, N]
    h = torch.cat([first, bu[:, 1:]], dim=1)  # [B, T, N]
    power, shift = lam, 1  # lam^shift
    while shift < h.shape[1]:
        h = torch.cat([h[:, :shift], h[:, shift:] + power * h[:, :-shift]], dim=1)  # [B, T, N]
        power, shift = power * power, shift * 2
    return h


# ---- one LRU layer ------------------------------------------------------------------------


class LRU(nn.Module):
    """The linear recurrent unit: H features in, H features out, N complex states."""

    def __init__(self, d_model: int, d_state: int, r_min: float, r_max: float, max_phase: float):
        super().__init__()
        H, N = d_model, d_state
        # Uniform on the ring: |Λ|² ~ U[r_min², r_max²], phase ~ U[0, max_phase].
        u1, u2 = torch.rand(N), torch.rand(N)
        modulus = torch.sqrt(u1 * (r_max**2 - r_min**2) + r_min**2)  # [N]
        self.nu_log = nn.Parameter(torch.log(-torch.log(modulus)))  # [N]
        self.theta_log = nn.Parameter(torch.log(max_phase * u2.clamp_min(1e-4)))  # [N]
        # Glorot-style complex init: each part has variance 1/(2 fan_in).
        self.B_re = nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H))  # [N, H]
        self.B_im = nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H))  # [N, H]
        self.C_re = nn.Parameter(torch.randn(H, N) / math.sqrt(N))  # [H, N]
        self.C_im = nn.Parameter(torch.randn(H, N) / math.sqrt(N))  # [H, N]
        self.D = nn.Parameter(torch.randn(H))  # [H]
        self._eigen_cache: tuple[tuple, tuple[Tensor, Tensor, Tensor]] | None = None

    def eigenvalues(self) -> tuple[Tensor, Tensor, Tensor]:
        """(Re Λ, Im Λ, γ), each [N]. Without autograd they are computed once per change of
        ν and θ and reused: a batch-1 step otherwise spends a fifth of its time here."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.compute_eigenvalues()
        # An in-place update (fine-tuning, load_state_dict) bumps _version; a move, the pointer.
        key = tuple((p._version, p.data_ptr()) for p in (self.nu_log, self.theta_log))
        if self._eigen_cache is None or self._eigen_cache[0] != key:
            self._eigen_cache = (key, self.compute_eigenvalues())
        return self._eigen_cache[1]

    def compute_eigenvalues(self) -> tuple[Tensor, Tensor, Tensor]:
        """`eigenvalues` computed afresh: the reference."""
        decay = torch.exp(self.nu_log)  # [N], |Λ| = exp(-decay)
        modulus, phase = torch.exp(-decay), torch.exp(self.theta_log)  # [N]
        gamma = torch.sqrt(-torch.expm1(-2.0 * decay))  # [N], sqrt(1 - |Λ|²) without cancellation
        return modulus * torch.cos(phase), modulus * torch.sin(phase), gamma

    def _drive(self, u: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
        """γ ⊙ (B u) as (real, imaginary) parts, [..., N]."""
        return F.linear(u, self.B_re) * gamma, F.linear(u, self.B_im) * gamma

    def _readout(self, u: Tensor, h_re: Tensor, h_im: Tensor) -> Tensor:
        """Re(C h) + D ⊙ u, [..., H]."""
        return F.linear(h_re, self.C_re) - F.linear(h_im, self.C_im) + self.D * u

    def step(self, u: Tensor, h_re: Tensor, h_im: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lam_re, lam_im, gamma = self.eigenvalues()  # [N]
        bu_re, bu_im = self._drive(u, gamma)  # [B, N]
        new_re = lam_re * h_re - lam_im * h_im + bu_re  # [B, N]
        new_im = lam_re * h_im + lam_im * h_re + bu_im  # [B, N]
        return self._readout(u, new_re, new_im), new_re, new_im

    def forward(
        self, u: Tensor, h_re: Tensor, h_im: Tensor, scan=_scan_parallel
    ) -> tuple[Tensor, Tensor, Tensor]:
        """u [B, T, H] -> y [B, T, H] and the final state pair, [B, N] each."""
        lam_re, lam_im, gamma = self.eigenvalues()
        bu_re, bu_im = self._drive(u, gamma)  # [B, T, N]
        h = scan(
            torch.complex(lam_re, lam_im), torch.complex(bu_re, bu_im), torch.complex(h_re, h_im)
        )
        y = self._readout(u, h.real, h.imag)  # [B, T, H]
        return y, h.real[:, -1], h.imag[:, -1]

    def macs(self) -> int:
        N, H = self.B_re.shape
        # B u (complex x real), γ scaling, Λ h (complex x complex), Re(C h), D u.
        return 2 * N * H + 2 * N + 4 * N + 2 * N * H + H


# ---- a residual block and the full model ---------------------------------------------------


class GLU(nn.Module):
    """Gated linear unit mixer across features: a ⊙ sigmoid(b) with [a, b] = W x."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 2 * d_model)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)  # [..., H] each
        return a * torch.sigmoid(b)


class LRUBlock(nn.Module):
    """x + Dropout(GLU(Dropout(GELU(LRU(Norm(x))))))."""

    def __init__(self, cfg: LRUConfig):
        super().__init__()
        norm = nn.LayerNorm if cfg.norm == "layernorm" else nn.RMSNorm
        self.norm = norm(cfg.d_model)
        self.lru = LRU(cfg.d_model, cfg.d_state, cfg.r_min, cfg.r_max, cfg.max_phase)
        self.mixer = GLU(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _mix(self, y: Tensor) -> Tensor:
        return self.drop(self.mixer(self.drop(F.gelu(y))))

    def step(self, x: Tensor, h_re: Tensor, h_im: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, h_re, h_im = self.lru.step(self.norm(x), h_re, h_im)  # [B, H]
        return x + self._mix(y), h_re, h_im

    def forward(self, x: Tensor, h_re: Tensor, h_im: Tensor, scan=_scan_parallel):
        y, h_re, h_im = self.lru(self.norm(x), h_re, h_im, scan=scan)  # [B, T, H]
        return x + self._mix(y), h_re, h_im

    def macs(self) -> int:
        H = self.mixer.proj.in_features
        return self.lru.macs() + 2 * H * H


class LRUModel(StatefulModel):
    """Input encoder -> n_layers LRU blocks -> final norm -> linear head, per step."""

    def __init__(self, config: LRUConfig):
        super().__init__()
        self.config = config
        self.input_kind = config.input_kind
        self.encoder = InputEncoder(config)
        self.layers = nn.ModuleList(LRUBlock(config) for _ in range(config.n_layers))
        norm = nn.LayerNorm if config.norm == "layernorm" else nn.RMSNorm
        self.norm = norm(config.d_model)
        self.head = nn.Linear(config.d_model, config.d_output)
        self._fused_weights = fused_weights(config)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> State:
        N = self.config.d_state
        state: State = {}
        for i in range(self.config.n_layers):
            state[f"layers.{i}.h_re"] = torch.zeros(batch, N, device=device, dtype=dtype)
            state[f"layers.{i}.h_im"] = torch.zeros(batch, N, device=device, dtype=dtype)
        return state

    def step_with_activity(
        self, x_t: Tensor, state: State
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """The fused step (models/lru_fused.py) where it applies, else the reference."""
        if self._fused_weights is None or not fused_step_applies(self):
            return self.step_reference_with_activity(x_t, state)
        self.check_step_input(x_t)
        self.check_state(state, x_t.shape[0])
        logits, new_state = fused_lru_step(self, x_t, state)
        return logits, new_state, {}

    def step_reference_with_activity(
        self, x_t: Tensor, state: State
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        self.check_step_input(x_t)
        self.check_state(state, x_t.shape[0])
        x = self.encoder(x_t)  # [B, H]
        new_state: State = {}
        for i, layer in enumerate(self.layers):
            x, h_re, h_im = layer.step(x, state[f"layers.{i}.h_re"], state[f"layers.{i}.h_im"])
            new_state[f"layers.{i}.h_re"], new_state[f"layers.{i}.h_im"] = h_re, h_im
        return self.head(self.norm(x)), new_state, {}  # [B, n_out]

    def forward(
        self, x: Tensor, state: State | None = None, scan=_scan_parallel
    ) -> tuple[Tensor, State]:
        """x: [B, T, d_input] floats or [B, T] tokens -> logits [B, T, n_out], final state.
        `scan=_scan_sequential` runs the reference loop instead of the parallel scan."""
        self.check_sequence_input(x)
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=self.head.weight.dtype)
        self.check_state(state, x.shape[0])
        h = self.encoder(x)  # [B, T, H]
        new_state: State = {}
        for i, layer in enumerate(self.layers):
            h, h_re, h_im = layer(
                h, state[f"layers.{i}.h_re"], state[f"layers.{i}.h_im"], scan=scan
            )
            new_state[f"layers.{i}.h_re"], new_state[f"layers.{i}.h_im"] = h_re, h_im
        return self.head(self.norm(h)), new_state  # [B, T, n_out]

    def macs_per_step(self) -> dict[str, int]:
        layers = sum(layer.macs() for layer in self.layers)
        return {
            "dense_macs": self.encoder.macs()
            + layers
            + self.head.in_features * self.head.out_features
        }
