"""Round-to-nearest: every stack weight onto its per-tensor grid, scale from the observer."""
from repro.models import stack_linears
from repro.quant import bake, clipped_fraction, fp_weight, prepare, qmax


def rtn(model, data, config) -> dict:
    """Quantize the stack by rounding to nearest; ``data`` is unused (data-free method).

    Records, per layer, the scale, the fraction of weights the scale clips and ``clip_ratio``
    = max|W| / (q * scale): how far beyond the grid's edge the largest weight lies (1 = no clip).
    """
    linears = stack_linears(model)
    scales = prepare(linears, config.bits, config.observer)
    q = qmax(config.bits)
    info = {
        "scales": {name: float(s) for name, s in scales.items()},
        "clipped": {name: clipped_fraction(fp_weight(m), scales[name], config.bits) for name, m in linears.items()},
        "clip_ratio": {name: float(fp_weight(m).detach().abs().max() / (q * scales[name])) for name, m in linears.items()},
    }
    bake(linears)
    return info


def fp(model, data, config) -> dict:
    """The unquantized reference: leaves the model as it is."""
    return {}
