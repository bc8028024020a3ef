"""Symmetric intB fake-quantization of the transformer stack's linear weights.

A weight tensor ``W`` is mapped to ``Q_a(W) = a * clamp(round(W / a), -q, q)`` with
``q = 2**(B-1) - 1`` (the symmetric integer range, no -2**(B-1) code). The *granularity* says
how many scales ``a`` a weight matrix [out, in] has:

* ``tensor``  - one (the paper's choice, the default): a 0-d scale;
* ``channel`` - one per output channel: scale [out, 1];
* ``group``   - one per output channel and group of ``group_size`` consecutive input columns
  (the last group may be shorter): scale [out, ceil(in / group_size)].

Channel and group scales are laid out against the [out, in] matrix (``repro.models.weight_matrix``:
GPT-2's Conv1D stores the transpose) and broadcast after ``expand_scale``. The scale comes from an *observer*:

* ``histogram`` - torch's ``HistogramObserver``, used as the paper did. It minimises the
  quantization error of a histogram, but always for a 256-level grid: torch sets its target
  bin count from the dtype (``2 ** 8`` for qint8) and ignores ``quant_min``/``quant_max``, so
  it returns the *same clip range* at every bit-width (``tests/test_quant.py`` pins this).
  Divided by q, that range clips too much at int8 on these models (where any clipping hurts) and is
  far too wide for int4/3/2, which is why it lands 2-8x above the MSE optimum at 4 and 3 bits,
* ``mse``       - exact search of ``argmin_a ||Q_a(W) - W||^2`` on the full tensor (per row of
  a channel or group: each scale minimises its own weights' error),
* ``minmax``    - ``a = max|W| / q`` (no clipping; per row of a channel or group).

torch has no per-channel ``HistogramObserver``, so ``histogram`` is per tensor only.

A grid is one value, ``Grid(bits, granularity, group_size)``, checked when it is made; a run's is
``RunConfig.grid``. ``prepare(linears, grid, observer)`` puts a set of linears (the stack's, or one window's) into fake-quant mode (a
``torch.nn.utils.parametrize`` parametrization on ``weight``, so the same module object keeps
working for GPT-2's Conv1D and for ``nn.Linear``, and gradients reach the FP "latent" weight
through the straight-through estimator). ``bake(linears)`` writes the quantized values into the
plain weights and removes the parametrizations.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

OBSERVERS = ("histogram", "mse", "minmax")
GRANULARITIES = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 2, 8


def is_int(value, low: int = 0, high: int | None = None) -> bool:
    """``value`` is an int (a bool is not) in ``low..high`` (``high`` None: no upper bound); the
    check behind every integer setting (bits, sizes, method options)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= low and (high is None or value <= high)


def is_real(value) -> bool:
    """``value`` is a finite int or float (a bool is not)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def positive_list(value, what: str, example: list) -> list[float]:
    """``value`` (a list of numbers, or of numeric strings as YAML may give them) as floats, each
    finite and > 0; else a ValueError naming ``what`` and showing ``example``. The check behind
    the methods' grids (GPTQ's ``damping_grid``, QAFT's ``lr_grid``)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what}={value!r}: a non-empty list of values > 0, e.g. {example}")
    numbers = []
    for item in value:
        try:
            number = float(item) if isinstance(item, (int, float, str)) and not isinstance(item, bool) else math.nan
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{what}={value!r}: {item!r} is not a finite number > 0; e.g. {example}")
        numbers.append(number)
    return numbers


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise a ValueError naming the range."""
    if not is_int(bits, MIN_BITS, MAX_BITS):
        raise ValueError(
            f"bits={bits!r} is not supported: symmetric quantization here takes an "
            f"integer number of bits in {MIN_BITS}..{MAX_BITS} (e.g. bits=4)."
        )
    return bits


def qmax(bits: int) -> int:
    """Largest integer code at ``bits`` bits: 2**(bits-1) - 1 (the range is symmetric). Not checked
    here (a hot path): ``Grid`` and ``RunConfig`` check ``bits`` once, at construction."""
    return 2 ** (bits - 1) - 1


def check_granularity(granularity: str, group_size: int) -> None:
    """Raise a ValueError naming the choices when ``granularity``/``group_size`` are not valid."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    if not is_int(group_size, 1):
        raise ValueError(f"group_size={group_size!r}: an integer >= 1 (input columns per scale; common: 128)")


@dataclass(frozen=True)
class Grid:
    """An integer grid: ``bits`` (2..8, symmetric codes -q..q) and how a weight matrix [out, in]
    shares its scales: one per ``tensor`` (the paper's), per output ``channel``, or per channel and
    ``group`` of ``group_size`` consecutive input columns. Checked once, here.

    The structural API takes a ``Grid`` (``compute_scale``, ``prepare``, ``FakeQuant``, GPTQ, kept
    weights, ``repro.models.weight_size_gb``; a run's is ``RunConfig.grid``); the elementwise
    kernels (``quantize``, ``codes``, ``fake_quant``) take its ``bits`` and ``groups``."""

    bits: int
    granularity: str = "tensor"
    group_size: int = 128  # input columns per scale; used by granularity "group" only

    def __post_init__(self):
        check_bits(self.bits)
        check_granularity(self.granularity, self.group_size)
        if self.granularity != "group":  # a group size means nothing here: equal grids compare equal
            object.__setattr__(self, "group_size", Grid.group_size)

    @property
    def q(self) -> int:
        """Largest code: 2**(bits-1) - 1."""
        return qmax(self.bits)

    @property
    def per_tensor(self) -> bool:
        """One scale per weight matrix (the paper's grid)."""
        return self.granularity == "tensor"

    @property
    def groups(self) -> int | None:
        """The group size the kernels take: ``group_size`` for groups, else None."""
        return self.group_size if self.granularity == "group" else None

    @property
    def name(self) -> str:
        """How the scales are laid out, in words: "per tensor", "per channel" or "g<group size>"."""
        return {"tensor": "per tensor", "channel": "per channel"}.get(self.granularity, f"g{self.group_size}")

    @property
    def label(self) -> str:
        """``name``, but "" per tensor (the default, left out of run labels)."""
        return "" if self.per_tensor else self.name

    def scale_shape(self, out: int, columns: int) -> tuple[int, ...]:
        """Shape of a [out, columns] matrix's scale: () per tensor, (out, 1) per channel,
        (out, ceil(columns / group_size)) per group."""
        if self.per_tensor:
            return ()
        return (out, math.ceil(columns / self.group_size) if self.granularity == "group" else 1)

    def n_scales(self, out: int, columns: int) -> int:
        """Number of scales of a [out, columns] matrix."""
        return math.prod(self.scale_shape(out, columns))


def as_grid(grid: Grid | int) -> Grid:
    """``grid`` itself, or ``Grid(bits)`` (per tensor) for an int ``bits``."""
    return grid if isinstance(grid, Grid) else Grid(grid)


def expand_scale(scale: torch.Tensor | float, in_features: int, group_size: int | None = None):
    """A scale that broadcasts against an [..., out, in] matrix: group scales [..., out, n_groups]
    (n_groups > 1) are repeated over their ``group_size`` columns ([..., out, in]); a 0-d, per-channel
    [out, 1] or one-group scale, or a 1-d one (one per entry of a column), is returned as it is."""
    if not torch.is_tensor(scale) or scale.dim() < 2 or scale.shape[-1] == 1:
        return scale
    if group_size is None or math.ceil(in_features / group_size) != scale.shape[-1]:
        raise ValueError(f"a scale of {scale.shape[-1]} groups does not fit {in_features} input columns in groups "
                         f"of {group_size}: pass the group_size the scale was computed with")
    return scale.repeat_interleave(group_size, dim=-1)[..., :in_features]


def check_scale_fits(scale, shape) -> None:
    """Raise a ValueError when ``scale`` (after ``expand_scale``) does not broadcast to a weight
    of ``shape`` [..., out, in] without growing it. Shapes only: nothing is read or synchronised."""
    if torch.is_tensor(scale) and scale.dim():
        try:
            fits = torch.broadcast_shapes(scale.shape, shape) == tuple(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"a scale of shape {list(scale.shape)} does not fit a weight of shape {list(shape)}: "
                             f"per tensor 0-d, per channel [out, 1], per group [out, ceil(in / group_size)]")


def quantize(w: torch.Tensor, scale: torch.Tensor | float, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest onto the grid ``scale * {-q..q}``; same shape and dtype as ``w``
    ([..., out, in] when the scale is per channel or group; ``group_size`` for group scales)."""
    q = qmax(bits)
    scale = expand_scale(scale, w.shape[-1], group_size)
    check_scale_fits(scale, w.shape)
    # in place on one temporary rather than four: QAFT quantizes every stack weight on every
    # step, and each fresh full-size temporary costs an allocation and its page faults
    return (w / scale).round_().clamp_(-q, q).mul_(scale)


def codes(w: torch.Tensor, scale: torch.Tensor | float, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Integer codes (int8) of a weight that lies on the grid (e.g. a baked weight)."""
    q = qmax(bits)
    return torch.clamp(torch.round(w / expand_scale(scale, w.shape[-1], group_size)), -q, q).to(torch.int8)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, bits, group_size):
        return quantize(w, scale, bits, group_size)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quant(w: torch.Tensor, scale: torch.Tensor | float, bits: int, group_size: int | None = None) -> torch.Tensor:
    """``quantize`` in the forward pass (exactly on the grid), identity gradient w.r.t. ``w``
    (straight-through estimator); the scale gets no gradient."""
    return _STE.apply(w, scale, bits, group_size)


def quant_error(w: torch.Tensor, scale: torch.Tensor | float, bits: int) -> float:
    """Mean squared weight error ``mean((Q(w) - w)^2)``."""
    return float((quantize(w, scale, bits) - w).pow(2).mean())


def clipped_fraction(w: torch.Tensor, scale: torch.Tensor | float, bits: int) -> float:
    """Fraction of entries of ``w`` outside the grid's range (rounded onto +-q*scale)."""
    return float((w.abs() > (qmax(bits) + 0.5) * scale).float().mean())


def _mse_scale(w: torch.Tensor, bits: int, grid: int = 40, rounds: int = 3) -> torch.Tensor:  # per tensor
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


def _mse_row_scales(rows: torch.Tensor, bits: int, grid: int = 40, rounds: int = 3) -> torch.Tensor:
    """``_mse_scale`` for every row of ``rows`` [..., n, k] at once: scales [..., n], each the
    argmin of its own row's ``||Q_a(row) - row||^2`` (same coarse grid and two refinements)."""
    q = qmax(bits)
    rows = rows.detach().to(torch.promote_types(rows.dtype, torch.float32))
    top = rows.abs().amax(-1).clamp_min(1e-12) / q
    lo, hi = torch.full_like(top, 0.01), torch.ones_like(top)
    best = torch.ones_like(top)
    steps = torch.linspace(0, 1, grid, dtype=rows.dtype, device=rows.device)
    for _ in range(rounds):
        ratios = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * steps  # [..., n, grid]
        errs = torch.stack([quantize(rows, (top * ratios[..., i]).unsqueeze(-1), bits).sub_(rows).pow_(2).sum(-1)
                            for i in range(grid)], -1)
        best = ratios.gather(-1, errs.argmin(-1, keepdim=True)).squeeze(-1)
        step = (hi - lo) / (grid - 1)
        lo, hi = (best - step).clamp_min(1e-4), (best + step).clamp_max(1.0)
    return top * best


def row_scales(rows: torch.Tensor, bits: int, observer: str) -> torch.Tensor:
    """One scale per row of ``rows`` [..., n, k] (a channel, or one group of it): [..., n], float32
    (float64 for float64 rows)."""
    if observer == "minmax":
        rows = rows.detach()
        return rows.abs().amax(-1).to(torch.promote_types(rows.dtype, torch.float32)).clamp_min(1e-12) / qmax(bits)
    if observer == "mse":
        return _mse_row_scales(rows, bits)
    if observer == "histogram":
        raise ValueError("the histogram observer is per tensor only (torch's HistogramObserver has no "
                         "per-channel form): use observer 'mse' or 'minmax' with granularity channel or group")
    raise ValueError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")


def _histogram_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    from torch.ao.quantization.observer import HistogramObserver

    q = qmax(bits)
    obs = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-q, quant_max=q)
    obs(w.detach().float().cpu())
    scale, _ = obs.calculate_qparams()
    return scale.reshape(()).to(torch.float32)


def compute_scale(w: torch.Tensor, grid: Grid | int, observer: str = "histogram") -> torch.Tensor:
    """Scale(s) for ``w`` on ``grid`` (a ``Grid``, or bits per tensor), float32 on ``w``'s device:
    0-d per tensor; per ``channel`` [out, 1] and per ``group`` [out, ceil(in / group_size)] of the
    [out, in] matrix ``w``."""
    grid = as_grid(grid)
    bits = grid.bits
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"the weight to quantize holds {bad} NaN/inf value(s) of {w.numel()}: the model is broken "
                         f"before quantization (check its loading and dtype); no scale can be computed")
    if not grid.per_tensor:
        width = grid.groups or w.shape[-1]
        return torch.stack([row_scales(part, bits, observer) for part in w.split(width, dim=-1)], -1)
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
    """Parametrization ``weight -> fake_quant(weight, scale, bits)`` with a fixed scale buffer.

    ``scale``: 0-d, or per channel / group against the [out, in] matrix (``transposed``: the
    weight is stored [in, out], GPT-2's Conv1D), as ``grid`` lays it out."""

    def __init__(self, scale: torch.Tensor, grid: Grid, transposed: bool = False):
        super().__init__()
        self.grid, self.transposed = grid, transposed
        self.bits, self.group_size = grid.bits, grid.groups  # what the kernels take
        scale = scale.detach().clone()
        self.register_buffer("scale", scale.reshape(()) if scale.numel() == 1 else scale)

    def _matrix(self, w: torch.Tensor) -> torch.Tensor:  # [out, in] view of a stored weight (and back)
        return w.t() if self.transposed and self.scale.dim() else w

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self._matrix(fake_quant(self._matrix(w), self.scale.to(w.dtype), self.bits, self.group_size))

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Int8 codes of ``w`` (stored layout) on this grid."""
        return self._matrix(codes(self._matrix(w), self.scale.to(w.device), self.bits, self.group_size))

    def dequantize(self, c: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights (stored layout) of int8 codes ``c``: ``c * scale``."""
        m = self._matrix(c).to(dtype)
        return self._matrix(m * expand_scale(self.scale.to(c.device, dtype), m.shape[-1], self.group_size))


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear.
    (By class name, through the MRO: a parametrized module is a subclass of its class.)"""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def is_prepared(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


def fp_weight(module: nn.Module) -> torch.Tensor:
    """The module's latent (unquantized) weight parameter, fake-quant mode or not."""
    if is_prepared(module):
        return module.parametrizations.weight.original
    return module.weight


def quantizer(module: nn.Module) -> FakeQuant:
    """The fake-quant parametrization (scale and grid) of a prepared linear."""
    return module.parametrizations.weight[0]


def check_linears(linears, caller: str) -> None:
    """Raise a TypeError unless ``linears`` maps names to ``nn.Linear`` / Conv1D modules."""
    if not isinstance(linears, Mapping):
        raise TypeError(f"{caller} takes a dict name -> linear, e.g. {caller}(repro.models.stack_linears(model), ...), "
                        f"not a {type(linears).__name__}")
    for name, module in linears.items():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(f"{caller}: {name} is an instance of {type(module).__name__}; only nn.Linear and "
                            f"GPT-2's Conv1D weights are quantized")


def prepare(linears: dict[str, nn.Module], grid: Grid | int, observer: str = "histogram",
            scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Put the given linears into fake-quant mode on ``grid`` (a ``Grid``, or bits per tensor), in
    place: the whole stack (``prepare(repro.models.stack_linears(model), ...)``) or any subset,
    e.g. one window of blocks.

    ``linears`` maps names to ``nn.Linear``/``Conv1D`` modules. Scales are computed by
    ``observer`` (``compute_scale``) on the current (FP) weights unless given in ``scales`` (name
    -> tensor laid out as ``grid`` says). Returns the scales used. Idempotent on the same grid: an
    already prepared layer keeps its scale; one prepared on another grid raises (bake it or restore
    the model first).
    """
    grid = as_grid(grid)
    check_linears(linears, "prepare")
    used = {}
    for name, module in linears.items():
        if is_prepared(module):
            fq = quantizer(module)
            if fq.grid != grid:
                raise ValueError(f"{name} is already in fake-quant mode at int{fq.grid.bits} {fq.grid.name}, not "
                                 f"int{grid.bits} {grid.name}: call repro.quant.bake(...) or repro.models.restore(...) "
                                 f"before preparing it again")
            used[name] = fq.scale
            continue
        transposed = is_conv1d(module)
        matrix = module.weight.t() if transposed else module.weight
        if scales is None:
            scale = compute_scale(matrix, grid, observer)
        elif name not in scales:
            raise ValueError(f"scales has no entry for {name}: give one per linear, or none (the observer computes them)")
        else:
            scale = torch.as_tensor(scales[name], dtype=torch.float32)
            check_scale_fits(expand_scale(scale, matrix.shape[-1], grid.groups), matrix.shape)
        parametrize.register_parametrization(module, "weight", FakeQuant(scale.to(module.weight.device), grid, transposed))
        used[name] = scale
    return used


def bake(linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Write quantized values into the weights of the given linears (those in fake-quant mode)
    and leave fake-quant mode, in place.

    Returns name -> scale so integer codes can be recovered with ``codes(weight, scale, bits)``
    (per channel / group: of the [out, in] matrix, with the grid's ``group_size``).
    """
    check_linears(linears, "bake")
    scales = {}
    for name, module in linears.items():
        if is_prepared(module):
            fq = quantizer(module)
            with torch.no_grad():
                baked = fq(module.parametrizations.weight.original)
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                module.weight.copy_(baked)
            scales[name] = fq.scale.detach().clone()
    return scales
