"""The analog forward as it was before the chip was read once per inference time.

Until then every crossbar call re-read all conductances with a fresh draw of the accumulated
1/f noise. `RereadingMatmul` does exactly that work on top of a served `AnalogMatmul`, so the
benches can time "before" and "after" on the same chip in one run.
"""

from __future__ import annotations

from torch import Tensor

from hardware_backends.analog_imc import AnalogIMCRunner
from hardware_backends.crossbar import AnalogMatmul, analog_units, read_weights, tile_mvm


class RereadingMatmul:
    """An `AnalogMatmul` that re-reads every conductance on each call (the old forward)."""

    def __init__(self, served: AnalogMatmul) -> None:
        self.served = served

    @property
    def macs(self) -> int:
        return self.served.macs

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        m = self.served
        crossbar, layout = m.crossbar, m.crossbar.layout
        read = read_weights(crossbar, m.t_inference, m.pcm, m.generator)  # [K, out, rows]
        weights = analog_units(read, crossbar.scale, m.config)
        rows = x.reshape(-1, layout.in_features).float()  # [R, in]
        partial = tile_mvm(layout.split_inputs(rows), weights, layout, m.config, m.generator)
        y = (partial * m.output_scale).sum(dim=1)  # [R, out]
        m.macs += rows.shape[0] * layout.in_features * layout.out_features
        if bias is not None:
            y = y + bias
        return y.to(x.dtype).view(*x.shape[:-1], layout.out_features)


def rereading_runner(runner: AnalogIMCRunner) -> AnalogIMCRunner:
    """The same model and chip, every crossbar call re-reading its conductances."""
    engines = {name: RereadingMatmul(engine) for name, engine in runner.engines.items()}
    return AnalogIMCRunner(runner.model, engines, runner.config, runner.streams)
