"""The seed study (notebook 07): how much of the headline sweep is the seed? GPTQ and QAFT at every
width of the tier, on each model of its ``seeds`` section, at each of its seeds. A run's seed draws
the calibration windows (GPTQ's Hessians, QAFT's training set) and QAFT's data order; the evaluation
windows stay the same at every seed (``repro.data.EVAL_SEED``), so runs pair window by window across
seeds. Seed 0 is the main job's run; FP and RTN use no calibration data, so they are the same at
every seed (one record each).

Its tables: test NLL mean ± sd over seeds per (model, method, bits), and which verdicts of the main
job (seed 0, interval over windows) survive once the interval is taken over seeds and windows
(``repro.uncertainty``). ``attach`` gives the other studies' records their seed replicates, so every
report verdict uses the combined interval where this study has run.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

from repro import plots
from repro.config import load_tier, sweep_configs
from repro.methods import METHODS
from repro.report import DASH, markdown_table, nll_cell, provenance
from repro.studies import Notebook, premise, read_records, suffix
from repro.uncertainty import compare, direction, interval_cell

SECTION = "seeds"
DEFAULTS = {"seeds": [0, 1, 2], "methods": ["gptq", "qaft"]}
# the headline verdicts this study re-checks, (A, B): "A < B"
PAIRS = (("qaft", "gptq"), ("gptq", "rtn"), ("qaft", "rtn"))


def _section(tier: str) -> dict:
    return {**DEFAULTS, **(load_tier(tier).get(SECTION) or {})}


def configs(tier: str, model: str | None = None, bits=None) -> list:
    """Notebook 07's runs for one model: FP and RTN once, the section's methods at its widths (None:
    the section's ``bits``, else the tier's) at each of its seeds (seed 0 = the main job's runs)."""
    section = _section(tier)
    bits = section.get("bits") if bits is None else bits
    return [*sweep_configs(("fp", "rtn"), bits, tier, model=model),
            *(c for s in section["seeds"] for c in sweep_configs(section["methods"], bits, tier, model=model, seed=s))]


# notebook 07 also runs the premise study (repro.studies.premise: methods started from FPFT's weights)
NOTEBOOKS = (Notebook("07_uncertainty", lambda tier, model, bits: [*configs(tier, model, bits),
                                                                   *premise.configs(tier, model, bits)],
                      section=SECTION),)


def records(tier: str, model: str, outputs) -> list[dict]:
    """The study's cached records of ``model`` (any seed)."""
    return read_records(configs(tier, model), outputs)


def _run_key(c: dict) -> tuple:
    """What a record's ``config`` ran, its seed left out: (model, corpus, method, bits, grid, options)."""
    return (c["model"], c["corpus"], c["method"], c["bits"], c.get("granularity"), c.get("group_size"),
            repr(sorted((c.get("options") or {}).items())))


def _replicates(found) -> dict:
    """``{_run_key: {seed: record}}``: the same run at each seed."""
    groups = defaultdict(dict)
    for r in found:
        groups[_run_key(r["config"])][r["config"].get("seed", 0)] = r
    return groups


def attach(found: list[dict], tier: str, outputs) -> list[dict]:
    """``found`` (records of the tier) with ``seed_windows`` (``{seed: per-window test NLL}``) where the
    seed study has every seed of the record's run cached; FP and RTN (no calibration data) carry their
    own windows at every seed. Copies; records of other tiers or seeds pass through unchanged."""
    section = _section(tier)
    seeds = sorted(section["seeds"])
    models = {r["config"]["model"] for r in found}
    cached = [r for m in models for r in records(tier, m, outputs)] if len(seeds) > 1 else []
    groups = _replicates(cached)
    if not any(len(g) == len(seeds) for g in groups.values()):
        return found
    out = []
    for r in found:
        c = r["config"]
        group = groups.get(_run_key(c), {})
        if c["method"] in ("fp", "rtn") and r.get("nll_test_windows"):
            r = {**r, "seed_windows": {s: r["nll_test_windows"] for s in seeds}}
        elif set(group) == set(seeds) and all(g.get("nll_test_windows") for g in group.values()) \
                and len({(g.get("windows") or {}).get("test") for g in group.values()}) == 1:
            r = {**r, "seed_windows": {s: group[s]["nll_test_windows"] for s in seeds}}
        out.append(r)
    return out


def seed_table(found) -> str:
    """Markdown: test NLL (nats/token) per model, method and width: the mean over seeds ± its sample
    standard deviation, the number of seeds, and each seed's value (seed order). FP and RTN: one run."""
    rows = []
    for (model, _, method, bits, *_), group in sorted(
            _replicates(found).items(), key=lambda kv: (kv[0][0], -(kv[0][3] or 99), METHODS[kv[0][2]].spectrum)):
        values = [group[s]["nll_test"] for s in sorted(group)]
        sd = statistics.stdev(values) if len(values) > 1 else None
        rows.append([model, "FP" if bits is None else f"int{bits}", METHODS[method].label,
                     nll_cell(statistics.fmean(values)) + ("" if sd is None else f" ± {sd:.3f}"), len(values),
                     ", ".join(f"{v:.3f}" for v in values) if len(values) > 1 else DASH])
    return markdown_table(["model", "bits", "method", "test NLL, mean ± sd", "seeds", "per seed"], rows) \
        if rows else "No records yet."


def survival_summary(found, tier: str) -> str:
    """Markdown: per model and width, each headline verdict "A < B" (``PAIRS``) as the main job makes it
    (its seed, paired bootstrap 95% interval over test windows) and over seeds and windows together
    (``found`` with ``seed_windows``: ``attach``); a verdict survives when both intervals call the
    same direction."""
    main_seed = load_tier(tier)["seed"]
    cells = defaultdict(dict)  # (model, bits) -> method -> the main job's record
    for r in found:
        if r["config"].get("seed", 0) == main_seed:
            cells[(r["config"]["model"], r["config"]["bits"])][r["config"]["method"]] = r
    calls = {1: "{b} < {a}", -1: "{a} < {b}", 0: "not distinguishable"}
    lines, kept, total = [], 0, 0
    for (model, bits), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 99))):
        parts = []
        for a, b in PAIRS:
            if a not in cell or b not in cell:
                continue
            one = compare(*({k: v for k, v in cell[m].items() if k != "seed_windows"} for m in (a, b)))
            both = compare(cell[a], cell[b])
            if one is None or both is None or both.seeds < 2:
                continue
            total += 1
            same = direction(one) == direction(both)
            kept += same and direction(one) != 0
            name = {"a": a.upper(), "b": b.upper()}
            parts.append(f"{a.upper()} − {b.upper()}: seed {main_seed} {interval_cell(one)} "
                         f"({calls[direction(one)].format(**name)}), {both.seeds} seeds {interval_cell(both)} "
                         f"({calls[direction(both)].format(**name)})" + ("" if same else " — **does not survive**"))
        if parts:
            lines.append(f"- {model} int{bits}: " + "; ".join(parts) + ".")
    if not total:
        return f"No run has every seed of the study yet (`repro batch --tier {tier} 07_uncertainty`)."
    lines.append(f"\n{kept} of {total} verdicts are decided at seed {main_seed} and keep their direction over seeds "
                 f"and windows (95% intervals); the others changed or were not decided.")
    return "\n".join(lines)


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``seeds``: the table and the verdicts over every model of the section with records at more
    than one seed; nothing when the study has not run."""
    found = [r for m in _models(tier, model) for r in records(tier, m, outputs)]
    if len({r["config"].get("seed", 0) for r in found}) < 2:
        return {}
    with_seeds = attach(found, tier, outputs)
    return {"seeds": f"{seed_table(found)}\n\n{survival_summary(with_seeds, tier)}\n\n{provenance(found, tier, command)}"}


def _models(tier: str, model: str | None) -> list[str]:
    return [model] if model else _section(tier).get("models") or load_tier(tier)["models"]


def figures(tier: str, outputs, model: str | None = None) -> dict:
    """Per model with records at several seeds: test NLL per seed against width."""
    drawn = {}
    models = _models(tier, model)
    for m in models:
        found = records(tier, m, outputs)
        if len({r["config"].get("seed", 0) for r in found}) > 1:
            drawn[f"seeds{suffix(tier, m, models[0])}"] = lambda found=found: plots.seed_spread(found)
    return drawn
