"""Round-to-nearest: every stack weight onto its per-tensor grid, scale from the observer."""
from repro.quant import bake, prepare


def rtn(model, data, config) -> dict:
    """Quantize the stack by rounding to nearest; ``data`` is unused (data-free method)."""
    scales = prepare(model, config.bits, config.observer)
    bake(model)
    return {"scale_min": min(float(s) for s in scales.values()),
            "scale_max": max(float(s) for s in scales.values())}


def fp(model, data, config) -> dict:
    """The unquantized reference: leaves the model as it is."""
    return {}
