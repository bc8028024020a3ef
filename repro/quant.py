"""Per-tensor symmetric intB fake-quantization of the transformer stack's linear weights.

A weight tensor ``W`` is mapped to ``Q_a(W) = a * clamp(round(W / a), -q, q)`` with
``q = 2**(B-1) - 1`` (the symmetric integer range, no -2**(B-1) code) and one scale ``a``
per tensor. The scale comes from an *observer*:

* ``histogram`` - torch's ``HistogramObserver``, used as the paper did. It minimises the
  quantization error of a histogram, but always for a 256-level grid: torch sets its target
  bin count from the dtype (``2 ** 8`` for qint8) and ignores ``quant_min``/``quant_max``, so
  it returns the *same clip range* at every bit-width (``tests/test_quant.py`` pins this).
  Divided by q, that range is right for int8 and far too wide for int4/3/2, which is why it
  lands 2-8x above the MSE optimum at 4 and 3 bits (and often does not clip at all),
* ``mse``       - exact search of ``argmin_a ||Q_a(W) - W||^2`` on the full tensor,
* ``minmax``    - ``a = max|W| / q`` (no clipping).

``prepare(linears, bits, observer)`` puts a set of linears (the stack's, or one window's) into fake-quant mode (a
``torch.nn.utils.parametrize`` parametrization on ``weight``, so the same module object keeps
working for GPT-2's Conv1D and for ``nn.Linear``, and gradients reach the FP "latent" weight
through the straight-through estimator). ``bake(linears)`` writes the quantized values into the
plain weights and removes the parametrizations.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

OBSERVERS = ("histogram", "mse", "minmax")
MIN_BITS, MAX_BITS = 2, 8


def is_int(value, low: int = 0, high: int | None = None) -> bool:
    """``value`` is an int (a bool is not) in ``low..high`` (``high`` None: no upper bound); the
    check behind every integer setting (bits, sizes, method options)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= low and (high is None or value <= high)


def is_real(value) -> bool:
    """``value`` is a finite int or float (a bool is not)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise a ValueError naming the range."""
    if not is_int(bits, MIN_BITS, MAX_BITS):
        raise ValueError(
            f"bits={bits!r} is not supported: per-tensor symmetric quantization here takes an "
            f"integer number of bits in {MIN_BITS}..{MAX_BITS} (e.g. bits=4)."
        )
    return bits


def qmax(bits: int) -> int:
    """Largest integer code at ``bits`` bits: 2**(bits-1) - 1 (the range is symmetric)."""
    return 2 ** (check_bits(bits) - 1) - 1


def quantize(w: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Round-to-nearest onto the grid ``scale * {-q..q}``; same shape and dtype as ``w``."""
    q = qmax(bits)
    # in place on one temporary rather than four: QAFT quantizes every stack weight on every
    # step, and each fresh full-size temporary costs an allocation and its page faults
    return (w / scale).round_().clamp_(-q, q).mul_(scale)


def codes(w: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Integer codes (int8) of a weight that lies on the grid (e.g. a baked weight)."""
    q = qmax(bits)
    return torch.clamp(torch.round(w / scale), -q, q).to(torch.int8)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, bits):
        return quantize(w, scale, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quant(w: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """``quantize`` in the forward pass (exactly on the grid), identity gradient w.r.t. ``w``
    (straight-through estimator); the scale gets no gradient."""
    return _STE.apply(w, scale, bits)


def quant_error(w: torch.Tensor, scale: torch.Tensor | float, bits: int) -> float:
    """Mean squared weight error ``mean((Q(w) - w)^2)``."""
    return float((quantize(w, scale, bits) - w).pow(2).mean())


def clipped_fraction(w: torch.Tensor, scale: torch.Tensor | float, bits: int) -> float:
    """Fraction of entries of ``w`` outside the grid's range (rounded onto +-q*scale)."""
    return float((w.abs() > (qmax(bits) + 0.5) * scale).float().mean())


def _mse_scale(w: torch.Tensor, bits: int, grid: int = 40, rounds: int = 3) -> torch.Tensor:
    """Search ``argmin_a ||Q_a(w) - w||^2`` over ``a = r * max|w| / q`` with r in (0, 1].

    A coarse grid over r is refined twice around its best point; every candidate is scored
    on the full tensor (no sampling), so the result is exact up to the final grid spacing
    (~1e-4 relative). The objective is piecewise smooth in a, hence the local refinement.
    """
    q = qmax(bits)
    w = w.detach().float().flatten()
    top = w.abs().max().clamp_min(1e-12) / q
    lo, hi = 0.01, 1.0
    best = 1.0
    for _ in range(rounds):
        ratios = torch.linspace(lo, hi, grid)
        # in place on quantize's one temporary (same values, two full-size allocations fewer per candidate)
        errs = torch.stack([quantize(w, top * r, bits).sub_(w).pow_(2).sum() for r in ratios])
        i = int(torch.argmin(errs))
        best = float(ratios[i])
        step = float(ratios[1] - ratios[0])
        lo, hi = max(best - step, 1e-4), min(best + step, 1.0)
    return (top * best).to(torch.float32)


def _histogram_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    from torch.ao.quantization.observer import HistogramObserver

    q = qmax(bits)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        obs = HistogramObserver(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-q, quant_max=q
        )
        obs(w.detach().float().cpu())
        scale, _ = obs.calculate_qparams()
    return scale.reshape(()).to(torch.float32)


def compute_scale(w: torch.Tensor, bits: int, observer: str = "histogram") -> torch.Tensor:
    """Per-tensor scale (0-d float32 tensor, on ``w``'s device) for ``w`` at ``bits`` bits."""
    check_bits(bits)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"the weight to quantize holds {bad} NaN/inf value(s) of {w.numel()}: the model is broken "
                         f"before quantization (check its loading and dtype); no scale can be computed")
    if observer == "minmax":
        scale = w.detach().abs().max().float().clamp_min(1e-12) / qmax(bits)
    elif observer == "mse":
        scale = _mse_scale(w, bits)
    elif observer == "histogram":
        scale = _histogram_scale(w, bits)
    else:
        raise ValueError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    return scale.to(w.device)


class FakeQuant(nn.Module):
    """Parametrization ``weight -> fake_quant(weight, scale, bits)`` with a fixed scale buffer."""

    def __init__(self, scale: torch.Tensor, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("scale", scale.detach().clone().reshape(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.scale.to(w.dtype), self.bits)


def is_prepared(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


def fp_weight(module: nn.Module) -> torch.Tensor:
    """The module's latent (unquantized) weight parameter, fake-quant mode or not."""
    if is_prepared(module):
        return module.parametrizations.weight.original
    return module.weight


def prepare(linears: dict[str, nn.Module], bits: int, observer: str = "histogram",
            scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Put the given linears into fake-quant mode, in place: the whole stack
    (``prepare(repro.models.stack_linears(model), ...)``) or any subset, e.g. one window of blocks.

    ``linears`` maps names to ``nn.Linear``/``Conv1D`` modules. Scales are computed by
    ``observer`` on the current (FP) weights unless given in ``scales`` (name -> 0-d tensor).
    Returns the scales used. Idempotent at the same ``bits``: an already prepared layer keeps its
    scale; one prepared at another bit-width raises (bake it or restore the model first).
    """
    check_bits(bits)
    if isinstance(linears, nn.Module):
        raise TypeError("prepare takes a dict of linears, e.g. prepare(repro.models.stack_linears(model), bits)")
    used = {}
    for name, module in linears.items():
        if is_prepared(module):
            fq = module.parametrizations.weight[0]
            if fq.bits != bits:
                raise ValueError(f"{name} is already in fake-quant mode at int{fq.bits}, not int{bits}: call "
                                 f"repro.quant.bake(...) or repro.models.restore(...) before preparing it again")
            used[name] = fq.scale
            continue
        scale = scales[name] if scales is not None else compute_scale(module.weight, bits, observer)
        parametrize.register_parametrization(module, "weight", FakeQuant(scale.to(module.weight.device), bits))
        used[name] = scale
    return used


def bake(linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Write quantized values into the weights of the given linears (those in fake-quant mode)
    and leave fake-quant mode, in place.

    Returns name -> scale so integer codes can be recovered with ``codes(weight, scale, bits)``.
    """
    scales = {}
    for name, module in linears.items():
        if is_prepared(module):
            fq = module.parametrizations.weight[0]
            with torch.no_grad():
                baked = quantize(module.parametrizations.weight.original, fq.scale, fq.bits)
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                module.weight.copy_(baked)
            scales[name] = fq.scale.detach().clone()
    return scales
