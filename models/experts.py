"""A routed mixture of experts: a channel mixer that runs k of n expert MLPs per token.

Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer", ICLR 2017 (arXiv:1701.06538); Fedus, Zoph, Shazeer, "Switch Transformers", JMLR 2022
(arXiv:2101.03961) for the load-balance loss; Pióro et al., "MoE-Mamba", 2024
(arXiv:2401.04081) for routed experts after a selective-SSM mixer.

For each token u [d_model]:

    p = softmax(router(u))                               [n_experts]
    S = the top_k experts by p
    out = Σ_{e ∈ S} p_e · expert_e(u),   expert_e(u) = W2_e GELU(W1_e u)

The gate is the router's probability itself (not renormalised over S), so the router
learns through the answer even with top_k = 1. Nothing here carries state from one token
to the next, so a model's state and its step/forward agreement are untouched.

`forward` runs each expert on its own tokens only (the work `macs()` counts): a pass per
expert over its gathered rows, or for a handful of tokens (a session's step) each token's
experts' weights gathered, which saves the per-expert passes; `forward_dense` runs every
expert on every token and weights the outputs with the same
sparse gates: the slow reference beside it. The experts are plain matmuls on gathered rows,
not `F.linear`, so the analog and stochastic backends (which route `F.linear` weights to
their engines) leave them digital and exact: a gathered row no longer sits where a sampling
engine expects its chain, and pricing them as FP32 MACs is what
`hardware_backends.routing.usage_with_engines` then does. The router is an `F.linear`
on the tokens in their own layout, so it runs on the engines like any projection.

`load_balance_loss` is Switch's n · Σ_e f_e · P_e (f_e: fraction of routed slots sent to
e, P_e: mean router probability of e); it is 1 when routing is uniform, and training adds
it, scaled, to the cross-entropy so that no expert starves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RoutedExperts(nn.Module):
    """Top-k routing of each token to k of n expert MLPs (d_model -> d_model)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, d_expert: int) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"need 1 <= top_k <= n_experts, got {top_k}, {n_experts}")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # nn.Linear's default init, U(±1/sqrt(fan_in)), for each expert's two matrices.
        self.w_up = nn.Parameter(
            torch.empty(n_experts, d_expert, d_model).uniform_(-1, 1) * d_model**-0.5
        )  # [n, d_expert, d]
        self.w_down = nn.Parameter(
            torch.empty(n_experts, d_model, d_expert).uniform_(-1, 1) * d_expert**-0.5
        )  # [n, d, d_expert]

    def route(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u [..., d] -> router probabilities [M, n], chosen experts [M, k], their gates [M, k].

        The router sees u in its own shape: sampling backends lay chains out along the
        leading dimension and need it intact."""
        probs = F.softmax(self.router(u), dim=-1).reshape(-1, self.n_experts)  # [M, n]
        gates, chosen = probs.topk(self.top_k, dim=-1)  # [M, k] each
        return probs, chosen, gates

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """u [..., d] -> (out [..., d], router probabilities [..., n]); only routed work runs."""
        probs, chosen, gates = self.route(u)
        flat = u.reshape(-1, u.shape[-1])  # [M, d]
        # Few tokens (a session's step): gathering each token's experts costs two calls, not
        # a pass per expert; many tokens: a pass per expert over its own rows.
        few = flat.shape[0] * self.top_k <= self.n_experts
        run = self._run_gathered if few else self._run_by_expert
        out = run(flat, chosen, gates)  # [M, d]
        return out.reshape(u.shape), probs.reshape(*u.shape[:-1], self.n_experts)

    def _run_by_expert(self, flat: Tensor, chosen: Tensor, gates: Tensor) -> Tensor:
        """flat [M, d], chosen and gates [M, k] -> [M, d]: each expert on its rows only."""
        out = torch.zeros_like(flat)  # [M, d]
        for e in range(self.n_experts):
            rows, slots = torch.nonzero(chosen == e, as_tuple=True)  # [m_e] each
            hidden = F.gelu(flat[rows] @ self.w_up[e].T)  # [m_e, d_expert]
            weighted = gates[rows, slots].unsqueeze(-1) * (hidden @ self.w_down[e].T)  # [m_e, d]
            out = out.index_add(0, rows, weighted)
        return out

    def _run_gathered(self, flat: Tensor, chosen: Tensor, gates: Tensor) -> Tensor:
        """The same with each token's k experts' weights gathered (memory grows with M)."""
        hidden = F.gelu(torch.einsum("md,mkhd->mkh", flat, self.w_up[chosen]))  # [M, k, d_expert]
        out = torch.einsum("mkh,mkdh->mkd", hidden, self.w_down[chosen])  # [M, k, d]
        return (gates.unsqueeze(-1) * out).sum(1)  # [M, d]

    def forward_dense(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Reference: every expert on every token, weighted by the same sparse gates."""
        probs, chosen, gates = self.route(u)
        flat = u.reshape(-1, u.shape[-1])  # [M, d]
        weights = torch.zeros_like(probs).scatter(-1, chosen, gates)  # [M, n], k nonzero a row
        hidden = F.gelu(torch.einsum("md,nhd->mnh", flat, self.w_up))  # [M, n, d_expert]
        outputs = torch.einsum("mnh,ndh->mnd", hidden, self.w_down)  # [M, n, d]
        out = (weights.unsqueeze(-1) * outputs).sum(1)  # [M, d]
        return out.reshape(u.shape), probs.reshape(*u.shape[:-1], self.n_experts)

    def load_balance_loss(self, probs: Tensor) -> Tensor:
        """n · Σ_e f_e · P_e over the tokens of `probs` [..., n]; 1 when balanced."""
        flat = probs.reshape(-1, self.n_experts)  # [M, n]
        chosen = flat.topk(self.top_k, dim=-1).indices  # [M, k]
        counts = torch.zeros_like(flat).scatter(-1, chosen, 1.0).sum(0)  # [n]
        dispatched = counts / chosen.numel()  # f_e, sums to 1
        return self.n_experts * (dispatched * flat.mean(0)).sum()

    def _expert_macs(self) -> int:
        return self.w_up[0].numel() + self.w_down[0].numel()

    def macs(self) -> int:
        """Per-token MACs of what runs: the router, k experts and the k gate scalings."""
        d_model = self.router.in_features
        return d_model * self.n_experts + self.top_k * (self._expert_macs() + d_model)

    def skipped_macs(self) -> int:
        """Per-token MACs of the n - k experts a token is not routed to."""
        return (self.n_experts - self.top_k) * self._expert_macs()
