"""How sure a comparison is: method differences paired over the same evaluation windows, with a
bootstrap 95% interval, and the verdict the interval allows.

Two records measured on the same windows (``record["windows"]``, ``repro.evaluate.windows_id``)
carry one NLL per window (``nll_test_windows``: nats/token, one per window of the split). Their
difference is paired window by window, so what both models find hard cancels out, and resampled
(windows drawn with replacement, ``n_boot`` times, fixed ``seed``): the 2.5% and 97.5% quantiles of
the resampled mean differences bound the interval. A verdict says "A < B" only when the whole
interval lies below 0 (and "A > B" above it), otherwise "not distinguishable at this sample size".

Where the seed study (notebook 07, ``repro.studies.seeds``) has run a record's config at several
seeds (the calibration draw, QAFT's data order), the record carries ``seed_windows``: its per-window
NLLs at every seed, on the same windows. Two such records are compared over seeds *and* windows
(``paired_bootstrap`` of ``[seeds, windows]`` arrays resamples both), so the interval holds the
seed-to-seed variation too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

N_BOOT = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean difference (A − B) and its bootstrap interval, over ``n`` paired windows (and ``seeds``
    seeds of each, where the seed study ran)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL
    seeds: int = 1

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean of ``a - b`` and its percentile bootstrap interval at ``level``, resampled ``n_boot``
    times with a generator seeded by ``seed`` (the same call gives the same interval).

    ``a``, ``b``: per-window values ``[n]`` (paired window by window; windows resampled with
    replacement), or ``[seeds, n]`` (the same ``n`` windows measured at each seed: each resample draws
    seeds and windows with replacement, the windows shared by every drawn seed, so the interval holds
    the seed-to-seed and the window-to-window spread). Raises ValueError on unpaired input."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.dim() not in (1, 2) or a.shape != b.shape or not a.numel():
        raise ValueError(f"paired_bootstrap takes two equally shaped sequences of per-window values ([windows] or "
                         f"[seeds, windows]), not shapes {list(a.shape)} and {list(b.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: a coverage in (0, 1), e.g. 0.95")
    diff = (a - b).reshape(-1, a.shape[-1])  # [seeds, windows]
    n_seeds, n = diff.shape
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, n, (n_boot, n), generator=g)
    if n_seeds == 1:
        means = diff[0][windows].mean(1)
    else:
        seeds = torch.randint(0, n_seeds, (n_boot, n_seeds), generator=g)
        means = diff[seeds[:, :, None], windows[:, None, :]].mean((1, 2))
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return Interval(float(diff.mean()), low, high, n, level, n_seeds)


def mean_interval(values, **kwargs) -> Interval | None:
    """The mean of per-window ``values`` (e.g. a record's ``nll_test_windows``) and its bootstrap
    interval (unpaired: one record's own sampling spread, for error bars); None without values."""
    if not values:
        return None
    return paired_bootstrap(values, [0.0] * len(values), **kwargs)


def compare(record_a: dict, record_b: dict, split: str = "test", **kwargs) -> Interval | None:
    """``paired_bootstrap`` of two records' per-window NLL on ``split`` (A − B, nats/token), over
    seeds too where both carry ``seed_windows`` of the same seeds (the seed study); None when either
    record has no per-window NLL (computed before it was kept, or a validation NLL measured by the
    method itself) or they were measured on other windows."""
    a, b = record_a.get(f"nll_{split}_windows"), record_b.get(f"nll_{split}_windows")
    same = (record_a.get("windows") or {}).get(split) == (record_b.get("windows") or {}).get(split)
    if not a or not b or not same:
        return None
    seeds_a, seeds_b = record_a.get("seed_windows") or {}, record_b.get("seed_windows") or {}
    if split == "test" and seeds_a and seeds_a.keys() == seeds_b.keys():
        return paired_bootstrap([seeds_a[s] for s in sorted(seeds_a)], [seeds_b[s] for s in sorted(seeds_b)], **kwargs)
    return paired_bootstrap(a, b, **kwargs)


def compare_gaps(a: dict, b: dict, c: dict, d: dict, split: str = "test", **kwargs) -> Interval | None:
    """``paired_bootstrap`` of (A − B) − (C − D), window by window (nats/token): e.g. how much of
    QAFT's lead over GPTQ is left once each is measured from its own reference,
    (GPTQ − FP) − (QAFT − FPFT). None unless all four records have per-window NLL on the same windows."""
    values = [r.get(f"nll_{split}_windows") for r in (a, b, c, d)]
    if not all(values) or len({(r.get("windows") or {}).get(split) for r in (a, b, c, d)}) != 1:
        return None
    wa, wb, wc, wd = (torch.as_tensor(v, dtype=torch.float64) for v in values)
    return paired_bootstrap(wa - wb, wc - wd, **kwargs)


def verdict(interval: Interval | None, a: str, b: str) -> str:
    """"A < B", "A > B" or "not distinguishable at this sample size", with the interval; "no
    interval" when there is none (``compare`` returned None)."""
    if interval is None:
        return "no interval (no per-window NLL on the same windows)"
    seeds = f" × {interval.seeds} seeds" if interval.seeds > 1 else ""
    ci = f"{a} − {b} = {interval} ({round(100 * interval.level)}% CI, {interval.n} windows{seeds})"
    if not interval.excludes_zero():
        return f"not distinguishable at this sample size: {ci}"
    return f"{a} {'<' if interval.high < 0 else '>'} {b}: {ci}"


def direction(interval: Interval | None, fallback: float | None = None, margin: float = 0.0) -> int:
    """+1 when A − B is decided above 0 (the interval lies above it), −1 below, 0 when the interval
    holds 0. Without an interval (records without per-window NLL) the plain difference ``fallback``
    decides against ``margin`` (the old rule), or 0 when there is none."""
    if interval is not None:
        return 1 if interval.low > 0 else -1 if interval.high < 0 else 0
    if fallback is None:
        return 0
    return 1 if fallback > margin else -1 if fallback < -margin else 0


def interval_cell(interval: Interval | None) -> str:
    """A table cell: ``+0.412 [+0.301, +0.518]``, bold when the interval excludes 0; a dash for none."""
    if interval is None or not math.isfinite(interval.mean):
        return "—"
    return f"**{interval}**" if interval.excludes_zero() else str(interval)


def compare_layers(record_a: dict, record_b: dict, key: str = "layer_mse_fp_inputs", **kwargs) -> Interval | None:
    """``paired_bootstrap`` of two records' per-layer values of ``key`` (a dict layer -> value, e.g.
    ``layer_mse_fp_inputs``), paired layer by layer over the layers both have (A − B); None when
    either lacks them."""
    a, b = record_a.get(key) or {}, record_b.get(key) or {}
    layers = [name for name in a if name in b]
    return paired_bootstrap([a[n] for n in layers], [b[n] for n in layers], **kwargs) if layers else None
