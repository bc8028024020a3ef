"""The Pareto study (notebook 02, paper Fig. 2): test NLL against weight size over every width
and method of every model of the tier, the front it draws, and where GPTQ and QAFT sit on it.
"""
from __future__ import annotations

from collections import defaultdict

from repro import plots
from repro.analysis import FP_BITS, by_model_bits, model_order, on_front, pareto_front, pareto_points
from repro.config import tier_name
from repro.methods import MAIN, QUANTIZERS
from repro.report import DASH, g_cell, markdown_table, nll_cell, provenance
from repro.studies import Notebook, seeds, sweep, tier_models
from repro.uncertainty import compare, direction, interval_cell


def configs(tier: str, model: str | None = None, bits=None) -> list:
    """The runs of one model on the front: the sweep (FP, RTN, GPTQ, QAFT at every width; not the
    fine-tuned FP control, which is no format of the pretrained model)."""
    return sweep.configs(tier, model, bits, ("fp", *QUANTIZERS))


NOTEBOOKS = (Notebook("02_pareto", configs, per_model=False),)


def _every_model(tier: str, outputs, model: str | None) -> list[dict]:
    """The sweep records of every model of the tier that has some (the default model's required)."""
    models = tier_models(tier, model)
    # with their seed replicates where the seed study ran (the gaps' intervals then span seeds too)
    return seeds.attach([r for m in models for r in sweep.records(tier, m, outputs, required=m == models[0])],
                        tier, outputs)


def _point_label(p) -> str:
    return f"{p['model']} FP" if p["method"] == "fp" else f"{p['model']} {p['method'].upper()} int{p['bits']}"


def _split_label(metric: str) -> str:
    return f"{metric.removeprefix('nll_')} NLL"


def _gap(cell: dict, metric: str):
    """``(GPTQ − QAFT, its paired interval over windows or None)`` of one (model, bits) cell of
    points, or None without both."""
    if "gptq" not in cell or "qaft" not in cell:
        return None
    gptq, qaft = cell["gptq"], cell["qaft"]
    return gptq["nll"] - qaft["nll"], compare(gptq["record"], qaft["record"], metric.removeprefix("nll_"))


def pareto_table(records, metric: str = "nll_test") -> str:
    """Paper Fig. 2 as a table, one row per model (smallest stack first) and bit-width (FP, then
    high to low): the stack's weight size (GB, FP at 16 bits), RTN / GPTQ / QAFT test NLL
    (nats/token), GPTQ − QAFT (positive: QAFT lower) and which points are on the Pareto front
    over every row (test NLL vs size)."""
    points = pareto_points(records, metric)
    if not points:
        return "No records with a weight size yet."
    front, cells = on_front(points), by_model_bits(points)
    rows = []
    for model in model_order(points):
        for bits in sorted((b for m, b in cells if m == model), reverse=True):
            cell = cells[(model, bits)]
            size = next(iter(cell.values()))["size_gb"]
            methods = sorted(cell, key=lambda m: (MAIN + (m,)).index(m))
            on = ", ".join(m.upper() for m in methods if (model, m, bits) in front) or DASH
            if set(cell) == {"fp"}:
                rows.append([model, "FP (16)", g_cell(size), *[nll_cell(cell["fp"]["nll"])] * len(QUANTIZERS), DASH, on])
                continue
            nll = {m: cell[m]["nll"] if m in cell else None for m in QUANTIZERS}
            gap = _gap(cell, metric)
            rows.append([model, f"int{bits}", g_cell(size), *(nll_cell(nll[m]) for m in QUANTIZERS),
                         DASH if gap is None else interval_cell(gap[1]) if gap[1] else f"{gap[0]:+.3f}", on])
    header = ["model", "bits", "size GB", *(f"{m.upper()} {_split_label(metric)}" for m in QUANTIZERS),
              "GPTQ − QAFT [95% CI]", "on Pareto front"]
    return markdown_table(header, rows)


def pareto_summary(records, metric: str = "nll_test") -> str:
    """Markdown conclusion of paper Fig. 2 from the records: which methods' points make up the
    Pareto front (test NLL vs stack weight size) and how many of each; per bit-width the GPTQ −
    QAFT test-NLL gap (mean over models, and per model with its paired bootstrap 95% interval);
    at how many (model, bits) QAFT is decidedly below GPTQ (the interval excludes 0; records
    without per-window NLL: the plain sign), and whether the mean gap grows as bits fall (paper
    §IV-B); and which (model, bits) lack a method."""
    points = pareto_points(records, metric)
    if not points:
        return "No records with a weight size yet."
    front, cells, models = pareto_front(points), by_model_bits(points), model_order(points)
    counts = defaultdict(int)
    for p in front:
        counts[p["method"]] += 1
    listed = ", ".join(f"{_point_label(p)} ({p['size_gb']:.3g} GB, {p['nll']:.3f})" for p in front)
    share = ", ".join(f"{m.upper()} {counts[m]}" for m in sorted(counts, key=lambda m: (-counts[m], m)))
    lines = [f"**Pareto front** ({_split_label(metric)} vs stack weight size; {len(front)} of {len(points)} points, "
             f"{len(models)} model(s)): {share}. "
             f"From small to large: {listed}."]
    gaps = defaultdict(dict)  # bits -> model -> (GPTQ - QAFT, its interval)
    for (model, bits), cell in cells.items():
        if (gap := _gap(cell, metric)) is not None:  # (one bootstrap per cell)
            gaps[bits][model] = gap
    if gaps:
        lines.append(f"\n**GPTQ − QAFT {_split_label(metric)}** (positive: QAFT lower), mean over models "
                     f"(per model: with its paired bootstrap 95% interval over windows):")
        for bits in sorted(gaps, reverse=True):
            per = ", ".join(f"{m} {interval_cell(iv) if iv else f'{g:+.3f}'}" for m in models if m in gaps[bits]
                            for g, iv in [gaps[bits][m]])
            mean = sum(g for g, _ in gaps[bits].values()) / len(gaps[bits])
            lines.append(f"- int{bits}: {mean:+.3f} over {len(gaps[bits])} model(s) ({per})")
        pairs = [(m, b, *gaps[b][m]) for b in sorted(gaps, reverse=True) for m in models if m in gaps[b]]
        calls = {(m, b): direction(iv, g) for m, b, g, iv in pairs}
        below = sum(d > 0 for d in calls.values())
        other = [f"{m} int{b} ({'GPTQ below' if calls[(m, b)] < 0 else 'not distinguishable'}, "
                 f"{interval_cell(iv) if iv else f'{g:+.3f}'})" for m, b, g, iv in pairs if calls[(m, b)] <= 0]
        lines.append(f"\nQAFT is decidedly below GPTQ at every (model, bits) pair ({len(pairs)}/{len(pairs)})."
                     if not other else f"\nQAFT is decidedly below GPTQ at {below}/{len(pairs)} (model, bits) "
                                       f"pairs; not at: {', '.join(other)}.")
        means = [sum(g for g, _ in gaps[b].values()) / len(gaps[b]) for b in sorted(gaps, reverse=True)]  # high to low
        if len(means) > 1:
            grows = all(a <= b for a, b in zip(means, means[1:]))
            lines.append(f"The mean gap {'grows' if grows else 'does not grow monotonically'} as bits fall "
                         f"(paper §IV-B: QAFT's lead is largest at int4 and below).")
    else:
        lines.append("\nNo (model, bits) has both GPTQ and QAFT records yet: no gap to report.")
    missing = []
    for model in models:
        if "fp" not in cells.get((model, FP_BITS), {}):
            missing.append(f"{model} FP")
        for bits in sorted((b for m, b in cells if m == model and b != FP_BITS), reverse=True):
            absent = [m.upper() for m in QUANTIZERS if m not in cells[(model, bits)]]
            if absent:
                missing.append(f"{model} int{bits} {'/'.join(absent)}")
    if missing:
        lines.append(f"\nMissing records: {', '.join(missing)}.")
    return "\n".join(lines)


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``pareto``: the table and verdict over every model that has records (when more than one has)."""
    every = _every_model(tier, outputs, model)
    if len({r["config"]["model"] for r in every}) < 2:
        return {}
    return {"pareto": f"{pareto_table(every)}\n\n{pareto_summary(every)}\n\n{provenance(every, tier, command)}"}


def figures(tier: str, outputs, model: str | None = None) -> dict:
    """Fig. 2 over every model (when more than one has records), as ``pareto_<tier>``."""
    every = _every_model(tier, outputs, model)
    if len({r["config"]["model"] for r in every}) < 2:
        return {}
    return {f"pareto_{tier_name(tier)}": lambda: plots.pareto(every)}
