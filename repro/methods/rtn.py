"""Round-to-nearest: every stack weight onto its grid (per tensor, channel or group), scales from the observer."""
from repro import models
from repro.models import stack_linears
from repro.quant import bake, clipped_fraction, expand_scale, fp_weight, prepare, quantizer


def rtn(model, data, config) -> dict:
    """Quantize the stack by rounding to nearest; ``data`` is unused (data-free method).

    Records, per layer, the scale (per channel or group: their mean), the fraction of weights
    the scale clips and ``clip_ratio`` = max|W| / (q * scale): how far beyond the grid's edge the
    largest weight lies (1 = no clip; per channel or group, the largest over them).
    """
    linears = stack_linears(model)
    scales = prepare(linears, config.grid, config.observer)
    q = config.grid.q
    # per channel or group, the record gets each layer's scales' mean (thousands per layer);
    # the scales themselves follow from the FP weights and the observer (`compute_scale`)
    info = {"scales": {name: float(s.mean()) for name, s in scales.items()},
            "clipped": {}, "clip_ratio": {}}
    for name, m in linears.items():
        w, fq = models.weight_matrix(m, fp_weight(m)).detach(), quantizer(m)
        scale = expand_scale(fq.scale, w.shape[-1], fq.group_size)
        info["clipped"][name] = clipped_fraction(w, scale, config.bits)
        info["clip_ratio"][name] = float((w.abs() / (q * scale)).max())  # per channel / group: the largest
    bake(linears)
    return info


def fp(model, data, config) -> dict:
    """The unquantized reference: leaves the model as it is."""
    return {}
