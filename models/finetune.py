"""What forward-only fine-tuning tunes: targets shaped like the shifts a deployed model meets.

A shift of the inputs (inverted, rescaled, offset sensors) lives in a handful of directions,
while ZO's gradient-estimate variance grows with the number of tuned parameters (MeZO's
d-dependence; ZO-Bench, sparse and low-rank ZO). So instead of all parameters a job tunes a
*target expression*, targets joined by "+":

    input    an input adapter: per-feature scale s and bias b in front of the encoder,
             x -> s * x + b / input_scale (2·F numbers; b in the encoder's scaled units, so
             inverting digits, 16 - x with input_scale 1/16, is exactly s = -1, b = 1)
    norm     every normalisation layer's affine parameters
    readout  the output head
    lora<r>  rank-r adapters W + B·A on every recurrent and mixing matrix (the 2-D
             parameters outside the encoder and the head); B starts at zero
    all      every parameter of the model

e.g. "input+norm+readout" or "input+lora4". The legacy selection "readout_and_norm" means
"norm+readout".

Adapters are `torch.nn.utils.parametrize` parametrizations of the weights they adapt: the
base tensor stays where it is (no copy), the forward pass sees the adapted weight, and an
adapter at its initial value (s = 1, b = 0, B = 0) reproduces the base weights bit for bit.
`merge_targets` folds the adapters into plain weights (what gets served, on every backend);
it computes in float64 and rounds once, so the result depends only on the values. Never
`copy.deepcopy` an adapted model (the copy shares torch's generated parametrized classes
with the original); `merged_copy` gives a plain copy.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.architectures import architecture_of
from models.base import InputEncoder, StatefulModel

TARGETS = ("input", "norm", "readout", "lora", "all")
LEGACY_SELECTIONS = {"readout_and_norm": "norm+readout"}
MAX_LORA_RANK = 64
ORDER_ATTRIBUTE = "_parameter_order_before_adapters"
LORA_SEED = 20_231_125  # A of every LoRA adapter is drawn from this seed (replay redraws it)

# The output head of each built-in architecture, by attribute name.
READOUT_MODULES = {"lru": "head", "selective": "head", "snn": "readout"}
NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

_TERM = re.compile(r"^(input|norm|readout|all|lora([1-9][0-9]*))$")


def parse_targets(expression: str) -> tuple[list[str], int]:
    """("input+lora4") -> (["input", "lora"], 4): the targets in canonical order and the LoRA
    rank (0 without lora). ValueError saying what is wrong and what is allowed."""
    if not isinstance(expression, str):
        raise ValueError(
            f"parameters must be a string like 'input+norm+readout', not {expression!r}"
        )
    expression = LEGACY_SELECTIONS.get(expression, expression)
    targets, rank = set(), 0
    for term in expression.split("+"):
        match = _TERM.match(term.strip())
        if match is None:
            raise ValueError(
                f"unknown target {term!r} in {expression!r}: join any of input, norm, readout, "
                "lora<rank> (e.g. lora4) and all with '+'"
            )
        if match.group(2):
            rank = int(match.group(2))
            if rank > MAX_LORA_RANK:
                raise ValueError(f"lora rank must lie in [1, {MAX_LORA_RANK}], got {rank}")
            targets.add("lora")
        else:
            targets.add(match.group(1))
    return [t for t in TARGETS if t in targets], rank


def canonical_targets(expression: str) -> str:
    targets, rank = parse_targets(expression)
    return "+".join(f"lora{rank}" if t == "lora" else t for t in targets)


# ---- adapters --------------------------------------------------------------------------------


class InputScale(nn.Module):
    """W -> W · diag(s): the encoder's weight [D, F] seen through x -> s * x."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n_features))  # [F]

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.scale  # [D, F]


class InputShift(nn.Module):
    """c -> c + W · b: the encoder's bias [D] seen through x -> x + b / input_scale, i.e. b in
    the encoder's scaled input units (digits: 1 = the full pixel range 16), so that scale and
    shift travel comparable distances (inverting digits is s = -1, b = 1). Reads the base
    weight W of the same layer (a reference to the parameter, not a copy)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(weight.shape[1]))  # [F]
        self._weight = [weight]  # a list, so the base weight is not registered twice

    def forward(self, bias: Tensor) -> Tensor:
        weight = self._weight[0]  # [D, F]
        return bias + weight @ self.shift  # [D]


class LowRank(nn.Module):
    """W -> W + B · A, B [out, r] zero at the start, A [r, in] a fixed-seed Gaussian / sqrt(in)."""

    def __init__(self, shape: torch.Size, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        n_out, n_in = shape
        self.lora_a = nn.Parameter(torch.randn(rank, n_in, generator=generator) / n_in**0.5)
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.lora_b @ self.lora_a  # [out, in]


# ---- attaching, listing and merging ------------------------------------------------------------


def _encoder(model: StatefulModel) -> InputEncoder | None:
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, InputEncoder) and encoder.input_kind == "features":
        return encoder
    return None


def _readout(model: StatefulModel) -> nn.Module:
    return getattr(model, READOUT_MODULES[architecture_of(model)])


def lora_matrices(model: StatefulModel) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every recurrent and mixing matrix: the 2-D floating-point
    parameters outside the encoder, the head and embeddings, in `named_parameters` order."""
    excluded = {id(p) for p in _readout(model).parameters()}
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        excluded |= {id(p) for p in encoder.parameters()}
    found = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for attribute, parameter in module.named_parameters(recurse=False):
            matrix = parameter.dim() == 2 and parameter.dtype.is_floating_point
            if matrix and id(parameter) not in excluded:
                found.append((module, attribute))
    return found


def _parametrize(module: nn.Module, attribute: str, adapter: nn.Module) -> None:
    """Register `adapter` on module.attribute, remembering the module's parameter order so
    that merging restores it (state dicts and replays list parameters in that order)."""
    if not hasattr(module, ORDER_ATTRIBUTE):
        setattr(module, ORDER_ATTRIBUTE, list(module._parameters))
    parametrize.register_parametrization(module, attribute, adapter)


def attach_targets(model: StatefulModel, expression: str) -> list[tuple[str, nn.Parameter]]:
    """Attach the expression's adapters to `model` (in place) and return the tuned parameters
    in a fixed order (adapters first, then base parameters in `named_parameters` order).
    Calling it on the same base model always yields the same names and initial values."""
    if is_adapted(model):
        raise ValueError("the model already carries adapters; merge them first")
    targets, rank = parse_targets(expression)
    adapters: list[nn.Parameter] = []
    if "input" in targets:
        encoder = _encoder(model)
        if encoder is None:
            raise ValueError("the input adapter needs a model that reads feature vectors")
        proj = encoder.proj
        shift = InputShift(proj.weight)
        if proj.bias is None:
            raise ValueError("the input adapter needs an encoder with a bias")
        _parametrize(proj, "bias", shift)
        _parametrize(proj, "weight", InputScale(proj.in_features))
    if "lora" in targets:
        generator = torch.Generator().manual_seed(LORA_SEED)
        for module, attribute in lora_matrices(model):
            shape = getattr(module, attribute).shape
            _parametrize(module, attribute, LowRank(shape, rank, generator))
    adapters = [
        p
        for m in model.modules()
        if isinstance(m, InputScale | InputShift | LowRank)
        for p in m.parameters(recurse=False)
    ]
    adapter_ids = {id(p) for p in adapters}
    chosen: set[int] = set(adapter_ids)
    if "all" in targets:
        chosen |= {id(p) for p in model.parameters()}
    if "readout" in targets:
        chosen |= {id(p) for p in _readout(model).parameters()}
    if "norm" in targets:
        norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
        chosen |= {id(p) for m in norms for p in m.parameters()}
    named = list(model.named_parameters())
    first = [(n, p) for n, p in named if id(p) in adapter_ids]
    rest = [(n, p) for n, p in named if id(p) in chosen and id(p) not in adapter_ids]
    return first + rest


def is_adapted(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def has_low_rank_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LowRank) for m in model.modules())


@torch.no_grad()
def merge_targets(model: StatefulModel) -> StatefulModel:
    """Fold every adapter into the weight it adapts (in place): the model is a plain one again,
    with the same parameter names and objects as before `attach_targets`. Each merged value is
    computed in float64 from the current base and adapter values and rounded once."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        merged = {}
        for attribute, parametrization in module.parametrizations.items():
            base = parametrization.original
            (adapter,) = list(parametrization)
            merged[attribute] = _merged_value(adapter, base, module).to(base.dtype)
        for attribute in list(merged):
            parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
        for attribute, value in merged.items():
            getattr(module, attribute).copy_(value)
        order = getattr(module, ORDER_ATTRIBUTE)
        module._parameters = {name: module._parameters[name] for name in order}
        delattr(module, ORDER_ATTRIBUTE)
    return model


def _merged_value(adapter: nn.Module, base: Tensor, module: nn.Module) -> Tensor:
    b = base.double()
    if isinstance(adapter, InputScale):
        return b * adapter.scale.double()
    if isinstance(adapter, InputShift):
        weight = module.parametrizations.weight.original.double()  # the base weight [D, F]
        return b + weight @ adapter.shift.double()
    if isinstance(adapter, LowRank):
        return b + adapter.lora_b.double() @ adapter.lora_a.double()
    raise TypeError(f"unknown adapter {type(adapter).__name__}")


def merged_copy(model: StatefulModel) -> StatefulModel:
    """A plain model with the adapters folded in (for a backend that reads weights as
    parameters); `model` itself is untouched. Built afresh from the merged state rather than
    by `copy.deepcopy`: a deep copy of a parametrized module shares its generated class with
    the original, so merging the copy would strip the original's parametrizations too."""
    if not is_adapted(model):
        return model
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    with torch.no_grad():
        for name, module in model.named_modules():
            if parametrize.is_parametrized(module):
                for attribute, parametrization in module.parametrizations.items():
                    (adapter,) = list(parametrization)
                    value = _merged_value(adapter, parametrization.original, module)
                    prefix = f"{name}." if name else ""
                    state[prefix + attribute] = value.to(parametrization.original.dtype)
    plain = type(model)(model.config)
    plain.load_state_dict(state)
    return plain.train(model.training)


# ---- the model as an analog chip sees it ----------------------------------------------------


def input_adapter(model: StatefulModel) -> tuple[Tensor, Tensor, float] | None:
    """(scale s [F], shift b [F], the encoder's input_scale) of the attached input adapter:
    the live parameters, not copies. None without one."""
    encoder = _encoder(model)
    if encoder is None or not parametrize.is_parametrized(encoder.proj):
        return None
    adapters = {
        attribute: list(parametrization)[0]
        for attribute, parametrization in encoder.proj.parametrizations.items()
    }
    scale, shift = adapters.get("weight"), adapters.get("bias")
    if not (isinstance(scale, InputScale) and isinstance(shift, InputShift)):
        return None
    return scale.scale, shift.shift, encoder.input_scale


def adapt_inputs(model: StatefulModel, inputs: Tensor) -> Tensor:
    """inputs [..., F] through the input adapter in raw units, x -> s * x + b / input_scale,
    what `InputScale` and `InputShift` fold into the encoder: W(s ⊙ x·c + b) = W diag(s)·x·c
    + W b (c the input scale). The identity without an adapter."""
    adapter = input_adapter(model)
    if adapter is None:
        return inputs
    scale, shift, input_scale = adapter
    return inputs * scale + shift / input_scale  # [..., F]


def chip_view(model: StatefulModel) -> StatefulModel:
    """A plain model over the *live* parameters of `model` (the same tensors: an in-place
    perturbation is seen, nothing is copied) with the input adapter left out: the encoder
    keeps its base weight and bias, and the adapter is applied to the inputs instead
    (`adapt_inputs`), digitally, in front of the chip. So a chip programmed with the view's
    matrices never needs reprogramming while only the input adapter and digital parameters
    (norms) move. Low-rank adapters compute their weights and have no such view (ValueError):
    a chip must be programmed with their merge (`merged_copy`)."""
    if not is_adapted(model):
        return model
    if has_low_rank_adapters(model):
        raise ValueError("low-rank adapters have no chip view: program their merged weights")
    state: dict[str, Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if ".parametrizations." not in key:
            state[key] = tensor
        elif key.endswith(".original"):  # "<module>.parametrizations.<attribute>.original"
            module_name, attribute = key.split(".parametrizations.")
            state[f"{module_name}.{attribute.removesuffix('.original')}"] = tensor
    with torch.device("meta"):
        view = type(model)(model.config)  # no storage: every tensor is replaced below
    for key, tensor in state.items():
        module_name, _, attribute = key.rpartition(".")
        module = view.get_submodule(module_name)
        slot = module._parameters if attribute in module._parameters else module._buffers
        slot[attribute] = tensor
    left = [name for name, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"no live tensor for {left} in the chip view")
    return view.train(model.training)
