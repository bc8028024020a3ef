"""The granularity study (notebook 08): per tensor, per output channel and per group of 128 input
columns — does the GPTQ/QAFT misalignment, and the locality spectrum, survive finer scales? The
basin radius of the FP landscape tests the paper's explanation at each grid.
"""
from __future__ import annotations

from collections import defaultdict

from repro import plots
from repro.analysis import grid_names, grid_of, locality, method_label
from repro.config import bit_widths, load_tier, make_config
from repro.methods import QUANTIZERS
from repro.report import DASH, markdown_table, nll_cell, provenance
from repro.studies import Notebook, landscape, read_records, suffix, tier_models
from repro.uncertainty import compare, direction, interval_cell


def configs(tier: str = "cpu", model: str | None = None, bits=None, granularities=None) -> list:
    """Notebook 08's runs for one model: FP; the section's methods at its widths per tensor (the
    tier's own runs) and at each of its ``granularities`` (with the section's observer per width
    and ``group_size``); the locality spectrum's block-wise ``variants`` at its ``locality`` widths,
    per tensor and at each granularity. ``None``: the tier's ``granularity_study`` section."""
    params = load_tier(tier)
    section = params.get("granularity_study") or {}
    model = model or params["model"]
    bits = bit_widths(bits, section.get("bits", params["bits"]))
    granularities = section.get("granularities", ["channel", "group"]) if granularities is None else granularities
    spectrum = section.get("locality") or {}

    def grid(granularity):  # (the observer: make_config takes the section's for the width)
        return {} if granularity == "tensor" else {"granularity": granularity,
                                                   "group_size": section.get("group_size", 128)}

    methods = section.get("methods", list(QUANTIZERS))
    chosen = [make_config("fp", None, tier, model=model)]
    for granularity in ["tensor", *granularities]:
        chosen += [make_config(m, b, tier, model=model, **grid(granularity)) for b in bits for m in methods]
        chosen += [make_config("blockwise", b, tier, options=dict(v), model=model, **grid(granularity))
                   for b in spectrum.get("bits", []) for v in spectrum.get("variants", [])]
    return chosen


NOTEBOOKS = (Notebook("08_granularity", configs, section="granularity_study"),)


def granularity_table(records) -> str:
    """Markdown: test NLL (nats/token) per model, width and method (rows) at each granularity
    (columns), FP first; block-wise variants where present."""
    grids = grid_names(records)
    cells, fp = defaultdict(dict), {}
    for r in records:
        c = r["config"]
        if c["method"] == "fp":
            fp[c["model"]] = r["nll_test"]
        else:
            cells[(c["model"], c["bits"], locality(r), method_label(r))][grid_of(r)] = r["nll_test"]
    rows = [[model, "FP", "fp", *([nll_cell(nll)] * len(grids))] for model, nll in fp.items()]
    for (model, bits, _, label), by in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        rows.append([model, f"int{bits}", label, *(nll_cell(by[g]) if g in by else DASH for g in grids)])
    return markdown_table(["model", "bits", "method", *grids], rows) if cells else "No records yet."


def granularity_summary(records, radius: float | None = None, gap: float = 0.05, bound: bool = False) -> str:
    """Markdown, computed from the records: per granularity, (1) where the misalignment appears
    (GPTQ − QAFT test NLL decidedly above 0: its paired bootstrap 95% interval over test windows
    excludes 0, ``repro.uncertainty``; records without per-window NLL: above ``gap`` nats) and how
    far each method stays from FP; (2) with the FP
    basin radius ``radius`` (``landscape.basin_radius``'s R on train, same for every grid: it is a
    property of w), ``rho = ||w_RTN - w|| / R`` per width and whether misalignment appears exactly
    where ``rho > 1`` (the paper's explanation; ``bound``: R is only a lower bound, so each rho is an
    upper bound and only ``rho <= 1`` is decided; an undistinguishable GPTQ − QAFT decides nothing);
    (3) LA-PTQ − block PTQ test NLL with its interval where both ran."""
    grids = grid_names(records)
    by = defaultdict(dict)  # (grid, bits) -> label -> record
    fp = next((r["nll_test"] for r in records if r["config"]["method"] == "fp"), None)
    for r in records:
        if r["config"]["method"] != "fp":
            by[(grid_of(r), r["config"]["bits"])][method_label(r)] = r
    if not by:
        return "No records yet."
    lines, agree, total, undecided = [], 0, 0, 0
    for g in grids:
        widths = sorted((b for (gg, b) in by if gg == g), reverse=True)
        mis, aligned, unclear, rhos, local = [], [], [], [], []
        for b in widths:
            cell = by[(g, b)]
            if "GPTQ" in cell and "QAFT" in cell:
                eta = cell["GPTQ"]["nll_test"] - cell["QAFT"]["nll_test"]
                interval = compare(cell["GPTQ"], cell["QAFT"])
                call = direction(interval, eta, gap)
                text = f"int{b} ({interval_cell(interval) if interval else f'{eta:+.3f}'})"
                (mis if call > 0 else aligned if call < 0 else unclear).append(text)
                if radius and "RTN" in cell:
                    rho = cell["RTN"]["weight_distance"] / radius
                    rhos.append(f"int{b} {'≤ ' if bound else ''}{rho:.2f}")
                    if (bound and rho > 1) or call == 0:  # the true rho, or the sign of eta, may lie either side
                        undecided += 1
                    else:
                        agree += (rho > 1) == (call > 0)
                        total += 1
            if "block PTQ" in cell and "LA-PTQ l=1" in cell:
                la, block = cell["LA-PTQ l=1"], cell["block PTQ"]
                interval = compare(la, block)
                delta = la["nll_test"] - block["nll_test"]
                local.append(f"int{b} {interval_cell(interval) if interval else f'{delta:+.3f}'}")
        near = [f"{m} int{b} {cell[m]['nll_test'] - fp:+.2f}" for b in widths for cell in [by[(g, b)]]
                for m in ("RTN", "GPTQ", "QAFT") if m in cell] if fp is not None else []
        text = (f"- **{g}**: QAFT decidedly below GPTQ (GPTQ − QAFT [95% CI]) at {', '.join(mis) or 'no width'}"
                + (f"; GPTQ below at {', '.join(aligned)}" if aligned else "")
                + (f"; not distinguishable at {', '.join(unclear)}" if unclear else "") + ".")
        if near:
            text += f" Test NLL above FP ({fp:.3f}): {', '.join(near)}."
        if rhos:
            text += f" ρ = ‖w_RTN − w‖ / R: {', '.join(rhos)}."
        if local:
            text += f" LA-PTQ l=1 − block PTQ: {', '.join(local)} (negative: the look-ahead helps)."
        lines.append(text)
    if total:
        lines.append(f"\nThe paper's explanation (misalignment exactly where ρ > 1) holds at {agree} of {total} "
                     f"decided (granularity, width) cells" + (": it predicts the misalignment." if agree == total else
                                                              ": it does not predict where the misalignment appears."))
    if undecided:
        lines.append(f"\n{undecided} cell(s) cannot test the threshold: GPTQ − QAFT not distinguishable from 0, or "
                     f"R(w) only a lower bound (no accepted bowl fit, so ρ is an upper bound) with a bound above 1.")
    return "\n".join(lines)


def cached(tier: str, outputs) -> dict:
    """``{model: (records, basin)}`` of the tier's ``granularity_study`` models with any per-channel or
    group record, cached only; basin: ``landscape.basin_radius`` of the FP landscape where it is
    cached, else None."""
    found = {}
    for m in (load_tier(tier).get("granularity_study") or {}).get("models") or []:
        records = read_records(configs(tier, m), outputs)
        if any(r["config"].get("granularity", "tensor") != "tensor" for r in records):
            result = landscape.landscape(m, None, tier, outputs, cached_only=True)
            found[m] = (records, landscape.basin_radius(result) if result else None)
    return found


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``granularity-MODEL``: test NLL per grid and the verdicts (misalignment, rho, LA-PTQ)."""
    return {f"granularity-{m}": "\n\n".join([
        granularity_table(records),
        granularity_summary(records, **({"radius": basin["R"], "bound": basin["bound"]} if basin else {})),
        provenance(records, tier, command)]) for m, (records, basin) in cached(tier, outputs).items()}


def figures(tier: str, outputs, model: str | None = None) -> dict:
    """Per model: GPTQ against QAFT per grid, and the Pareto front over grids."""
    default = tier_models(tier, model)[0]
    drawn = {}
    for m, (records, _) in cached(tier, outputs).items():
        end = suffix(tier, m, default)
        main = [r for r in records if r["config"]["method"] != "blockwise"]
        drawn[f"granularity_misalignment{end}"] = lambda main=main: plots.misalignment_scatter(main, column=grid_of)
        drawn[f"granularity_pareto{end}"] = lambda main=main: plots.pareto(main)
    return drawn
