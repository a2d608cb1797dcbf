"""Held-out metrics for stateful models: accuracy and NLL, spike activity, bits per character,
a unigram baseline, and text samples.

Classification reads the logits of the last step of each sequence (or, for the answer after
t steps, of every step); a language model predicts the next token at every step. Every
function puts the model in eval mode and runs without gradients, and none changes the
model's parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import StatefulModel
from models.datasets import SequenceDataset

LN2 = math.log(2.0)


@torch.no_grad()
def final_logits(model: StatefulModel, inputs: Tensor, batch_size: int = 512) -> Tensor:
    """Logits of the last step for each sequence: inputs [N, T, F] -> [N, C]."""
    model.eval()
    parts = [model(inputs[i : i + batch_size])[0][:, -1] for i in range(0, len(inputs), batch_size)]
    return torch.cat(parts)  # [N, C]


@torch.no_grad()
def final_logits_stepwise(model: StatefulModel, inputs: Tensor) -> Tensor:
    """Reference for `final_logits`: feed one step at a time through `model.step`."""
    model.eval()
    state = model.init_state(inputs.shape[0])
    logits = None
    for t in range(inputs.shape[1]):
        logits, state = model.step(inputs[:, t], state)  # [N, C]
    return logits


@torch.no_grad()
def step_logits(model: StatefulModel, inputs: Tensor, batch_size: int = 512) -> Tensor:
    """Logits after every step of each sequence: inputs [N, T, F] -> [N, T, C]."""
    model.eval()
    parts = [model(inputs[i : i + batch_size])[0] for i in range(0, len(inputs), batch_size)]
    return torch.cat(parts)  # [N, T, C]


def step_classification_metrics(
    model: StatefulModel, dataset: SequenceDataset
) -> dict[str, list[float]]:
    """Accuracy and mean NLL (nats) of the prediction after each of the T steps: what a
    session that has read t steps would answer, for t = 1..T."""
    logits = step_logits(model, dataset.inputs)  # [N, T, C]
    labels = dataset.labels[:, None].expand(logits.shape[:2])  # [N, T]
    correct = (logits.argmax(dim=-1) == labels).float()  # [N, T]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [N, T]
    return {
        "accuracy": [float(a) for a in correct.mean(dim=0)],
        "nll": [float(v) for v in nll.mean(dim=0)],
    }


def classification_metrics(model: StatefulModel, dataset: SequenceDataset) -> dict[str, float]:
    """Accuracy and mean negative log-likelihood (nats) of the last-step prediction."""
    logits = final_logits(model, dataset.inputs)  # [N, C]
    accuracy = (logits.argmax(dim=-1) == dataset.labels).float().mean()
    nll = F.cross_entropy(logits, dataset.labels)
    return {"accuracy": float(accuracy), "nll": float(nll), "n": len(dataset)}


@torch.no_grad()
def spike_statistics(model: StatefulModel, dataset: SequenceDataset) -> dict[str, float]:
    """Spiking activity over a dataset, from `step_with_activity`'s per-step counters.

    spike_fraction: spikes / neuron-steps (how often a neuron fires in a step);
    spikes_per_inference: mean spikes emitted over one whole sequence;
    synaptic_ops_per_inference: accumulates those spikes drive (when the model reports them);
    dense_macs_per_inference: the model's static dense MACs times the sequence length;
    dense_equivalent_macs_per_inference: what a dense, non-event-driven implementation of
    the same network computes (dense MACs plus every synapse on every step).
    Raises ValueError for a model that reports no spikes (not a spiking network).
    """
    model.eval()
    state = model.init_state(len(dataset))
    totals: dict[str, Tensor] = {}
    for t in range(dataset.n_steps):
        _, state, activity = model.step_with_activity(dataset.inputs[:, t], state)
        if "spikes" not in activity or "neurons" not in activity:
            raise ValueError(f"{type(model).__name__} reports no spike activity")
        for key, value in activity.items():
            totals[key] = totals.get(key, 0) + value.double()  # [N]
    macs = model.macs_per_step()
    stats = {
        "spike_fraction": float(totals["spikes"].sum() / totals["neurons"].sum()),
        "spikes_per_inference": float(totals["spikes"].mean()),
        "neuron_steps_per_inference": float(totals["neurons"].mean()),
        "dense_macs_per_inference": float(macs.get("dense_macs", 0) * dataset.n_steps),
    }
    if "synaptic_ops" in totals:
        stats["synaptic_ops_per_inference"] = float(totals["synaptic_ops"].mean())
    if "synaptic_ops_max" in macs:
        dense_equivalent = (macs.get("dense_macs", 0) + macs["synaptic_ops_max"]) * dataset.n_steps
        stats["dense_equivalent_macs_per_inference"] = float(dense_equivalent)
    return stats


@torch.no_grad()
def bits_per_character(
    model: StatefulModel, ids: Tensor, n_streams: int = 8, chunk_len: int = 512
) -> float:
    """Mean next-token cross-entropy in bits over the stream `ids [L]`.

    The stream is cut into `n_streams` contiguous pieces run side by side as a batch, each
    in chunks that carry the recurrent state forward, so every prediction after a piece's
    first token sees all earlier text of its piece. The trailing L mod n_streams tokens are
    dropped.
    """
    model.eval()
    n_streams = max(1, min(n_streams, (len(ids) - 1) // 2))
    piece = len(ids) // n_streams
    if piece < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    streams = ids[: piece * n_streams].view(n_streams, piece)  # [S, P]
    state = None
    total_nats, count = 0.0, 0
    for start in range(0, piece - 1, chunk_len):
        stop = min(start + chunk_len, piece - 1)
        logits, state = model(streams[:, start:stop], state)  # [S, c, V]
        targets = streams[:, start + 1 : stop + 1]  # [S, c]
        total_nats += float(
            F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        )
        count += targets.numel()
    return total_nats / count / LN2


@torch.no_grad()
def bits_per_character_stepwise(model: StatefulModel, ids: Tensor) -> float:
    """Reference for `bits_per_character` with one stream: one `step` per token."""
    model.eval()
    state = model.init_state(1)
    total_nats = 0.0
    for position in range(len(ids) - 1):
        logits, state = model.step(ids[position : position + 1], state)  # [1, V]
        total_nats += float(F.cross_entropy(logits, ids[position + 1 : position + 2]))
    return total_nats / (len(ids) - 1) / LN2


def unigram_bits_per_character(train_ids: Tensor, valid_ids: Tensor, vocab_size: int) -> float:
    """Cross-entropy in bits of a unigram model (add-one smoothed train frequencies)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # [V]
    log_probs = torch.log2(counts / counts.sum())  # [V]
    return float(-log_probs[valid_ids].mean())


@torch.no_grad()
def generate(
    model: StatefulModel,
    prompt_ids: Tensor,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Continue `prompt_ids [L]` by `max_tokens` tokens; greedy when temperature is 0.

    Runs the prompt through `forward` once, then one `step` per new token. Returns the new
    ids only, [max_tokens].
    """
    if len(prompt_ids) < 1:
        raise ValueError("the prompt must contain at least one token")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    logits, state = model(prompt_ids.view(1, -1))  # [1, L, V]
    next_logits = logits[:, -1]  # [1, V]
    out = []
    for _ in range(max_tokens):
        if temperature == 0.0:
            token = next_logits.argmax(dim=-1)  # [1]
        else:
            probs = torch.softmax(next_logits / temperature, dim=-1)  # [1, V]
            token = torch.multinomial(probs, 1, generator=generator).view(1)  # [1]
        out.append(int(token))
        next_logits, state = model.step(token, state)  # [1, V]
    return torch.tensor(out, dtype=torch.long)
