"""Conclusions and README tables computed from records (so no prose carries hand-typed numbers).

Table functions are pure: a list of records in, a markdown string out. Units: NLL in nats/token
(3 decimals), layer MSE in squared activation units (3 significant digits), times in seconds.
Layer MSEs are measured on the test split, in two readings: ``mean_layer_mse_fp_inputs`` (each
layer fed the FP model's inputs, the paper's eq. 2) and ``mean_layer_mse`` (fed the quantized
model's own inputs). ``update_markdown`` writes tables between ``<!-- report:NAME -->`` markers.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

from repro.methods import MAIN, QUANTIZERS, describe

MSE_READINGS = (("FP inputs", "mean_layer_mse_fp_inputs"), ("own inputs", "mean_layer_mse"))
DASH = "—"


def _nll(x) -> str:
    return DASH if x is None else f"{x:.3f}"


def _g(x) -> str:
    return DASH if x is None else f"{x:.3g}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _markdown(header, rows) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)])


def _table(records):
    """``{method: {bits: record}}`` for the quantized records (FP under ``None``)."""
    table = defaultdict(dict)
    for r in records:
        table[r["config"]["method"]][r["config"]["bits"]] = r
    return table


def _bits(table, methods=QUANTIZERS):
    return sorted({b for m in methods for b in table.get(m, {}) if b is not None}, reverse=True)


def _fp(records):
    return next((r for r in records if r["config"]["method"] == "fp"), None)


def _chosen_run(info):
    """QAFT: the run of the chosen lr0."""
    return next((r for r in info.get("runs", []) if math.isclose(r["lr"], info["lr"])), None)


def _chosen_epoch(info):
    return info.get("epoch", info.get("best_epoch"))


def _seconds(r) -> str:
    return DASH if r is None or not r.get("wall_s") else f"{r['wall_s']['method']:.0f}"


def _bold_min(values, fmt=_nll):
    """Formatted ``values`` with the smallest (ties: all of them) in bold; ``None`` -> dash."""
    low = min((v for v in values if v is not None), default=None)
    return [DASH if v is None else f"**{fmt(v)}**" if v == low else fmt(v) for v in values]


# FP and RTN numbers come out the same on every CPU. GPTQ, QAFT and the block-wise methods at the ci
# tier (768-1024 calibration tokens, per-tensor int4/int3) do not: their test NLL moves by up to 1.6
# nats between CPU kernel paths (docs/TESTING.md), so CI checks those by invariants, not digits.
PORTABLE_METHODS = ("fp", "rtn")


def portable_table(records) -> str:
    """Markdown, one row per record (model, corpus, scales and observer, bits, method): the test NLL where it
    reproduces on any CPU (FP, RTN) and, for every method, the checks that hold whatever the CPU:
    the NLLs are finite, and QAFT's validation NLL is not above its epoch 0 (RTN on the same
    grid: QAFT keeps its best validation epoch). What nbval compares across machines."""
    rows = []
    for r in sorted(records, key=lambda r: (r["config"]["model"], r["config"]["corpus"], r["config"]["bits"] is not None,
                                            grid_of(r), -(r["config"]["bits"] or 0), locality(r), r["config"]["observer"])):
        c, checks = r["config"], []
        checks.append("finite" if all(math.isfinite(r[k]) for k in ("nll_test", "nll_validation")) else "NOT FINITE")
        if c["method"] == "qaft":
            start = r["info"]["rtn"]["nll_validation"]
            checks.append("val ≤ epoch 0" if r["nll_validation"] <= start else "val ABOVE epoch 0")
        nll = _nll(r["nll_test"]) if c["method"] in PORTABLE_METHODS else "(CPU-dependent)"
        rows.append([c["model"], c["corpus"], DASH if c["method"] == "fp" else f"{grid_of(r)}, {c['observer']}",
                     DASH if c["bits"] is None else f"int{c['bits']}", method_label(r), nll, ", ".join(checks)])
    return _markdown(["model", "corpus", "scales", "bits", "method", "test NLL", "checks"], rows)


def fig1_table(records, seconds: bool = True) -> str:
    """Paper Fig. 1, one row per bit-width (high to low), FP first: test NLL (nats/token) of RTN,
    GPTQ and QAFT; their mean layer MSE on test (squared activation units) with FP inputs (eq. 2)
    and with their own inputs; QAFT's lr0 and epoch (chosen on validation); with ``seconds``,
    GPTQ's and QAFT's method time (s; wall clock, so leave it out where output is compared)."""
    t = _table(records)
    names = [m.upper() for m in QUANTIZERS]
    header = ["bits", *(f"{n} test NLL" for n in names),
              *(f"{n} MSE, {reading}" for reading, _ in MSE_READINGS for n in names),
              "QAFT lr0", "QAFT epoch", *(["GPTQ s", "QAFT s"] if seconds else [])]
    rows = []
    fp = t.get("fp", {}).get(None)
    if fp is not None:
        rows.append(["FP", *[_nll(fp["nll_test"])] * len(QUANTIZERS),
                     *(_g(fp.get(key)) for _, key in MSE_READINGS for _ in QUANTIZERS), *[DASH] * (4 if seconds else 2)])
    for b in _bits(t):
        recs = [t.get(m, {}).get(b) for m in QUANTIZERS]
        info = (recs[2] or {}).get("info") or {}
        epoch = _chosen_epoch(info)
        rows.append([f"int{b}", *(_nll(r and r["nll_test"]) for r in recs),
                     *(_g(r and r.get(key)) for _, key in MSE_READINGS for r in recs),
                     f"{info['lr']:g}" if "lr" in info else DASH, DASH if epoch is None else epoch,
                     *([_seconds(recs[1]), _seconds(recs[2])] if seconds else [])])
    return _markdown(header, rows) if rows else "No records yet."


def layer_share_table(records) -> str:
    """Paper Fig. 1, lower row, counted: per bit-width and layer-MSE reading (test split), in how
    many of the stack's linears GPTQ's layer MSE is below RTN's, QAFT's below RTN's, and GPTQ's
    below QAFT's. The paper: GPTQ always lowers layer MSE, QAFT keeps or raises it. Counts, not
    means: the mean over layers is dominated by the few layers with the largest activations."""
    table = _table(records)
    rows = []
    for b in _bits(table):
        rtn, gptq, qaft = (table.get(m, {}).get(b) for m in QUANTIZERS)
        for reading, key in MSE_READINGS:
            key = key.removeprefix("mean_")

            def below(a, c):
                if a is None or c is None or a.get(key) is None or c.get(key) is None:
                    return DASH
                return f"{sum(a[key][n] < c[key][n] for n in c[key])}/{len(c[key])}"

            rows.append([f"int{b}", reading, below(gptq, rtn), below(qaft, rtn), below(gptq, qaft)])
    header = ["bits", "layer MSE inputs", "GPTQ < RTN", "QAFT < RTN", "GPTQ < QAFT"]
    return _markdown(header, rows) if rows else "No RTN/GPTQ/QAFT records yet."


def qaft_epochs_table(records) -> str:
    """Paper Fig. 7: QAFT's test NLL (nats/token) after each epoch at the chosen lr0 (epoch 0 =
    RTN; **bold** = the epoch chosen on validation), next to GPTQ's test NLL, per bit-width."""
    t = _table(records)
    hists = {}
    for b, rec in t.get("qaft", {}).items():
        run = _chosen_run(rec["info"]) or {}
        hist = {h["epoch"]: h.get("nll_test") for h in run.get("history", [])}
        hist.setdefault(0, (rec["info"].get("rtn") or {}).get("nll_test"))
        hists[b] = hist
    if not hists:
        return "No QAFT records yet."
    epochs = sorted({e for h in hists.values() for e in h})
    header = ["bits", *("test NLL, epoch 0 (RTN)" if e == 0 else f"epoch {e}" for e in epochs), "GPTQ test NLL"]
    rows = []
    for b in sorted(hists, reverse=True):
        chosen = _chosen_epoch(t["qaft"][b]["info"])
        cells = [DASH if hists[b].get(e) is None else f"**{_nll(hists[b][e])}**" if e == chosen
                 else _nll(hists[b][e]) for e in epochs]
        gptq = t.get("gptq", {}).get(b)
        rows.append([f"int{b}", *cells, _nll(gptq and gptq["nll_test"])])
    return _markdown(header, rows)


def lr_table(records) -> str:
    """Paper Fig. 6: QAFT's validation NLL (nats/token, best epoch) per initial LR lr0 and
    bit-width. lr0 and epoch are selected on validation; **bold** = the chosen lr0; † = no epoch
    of that lr0 beat epoch 0, so its best is RTN's NLL (training at that lr0 only made it worse)."""
    qaft = _table(records).get("qaft", {})
    if not qaft:
        return "No QAFT records yet."
    lrs = sorted({run["lr"] for r in qaft.values() for run in r["info"].get("runs", [])})
    header = ["bits", *(f"validation NLL, lr0 {lr:g}" for lr in lrs)]
    rows, kept_rtn = [], False
    for b in sorted(qaft, reverse=True):
        info = qaft[b]["info"]
        cells = {}
        for run in info.get("runs", []):
            if run.get("best_nll_validation") is None:
                continue
            text = _nll(run["best_nll_validation"]) + ("†" if run.get("best_epoch") == 0 else "")
            kept_rtn |= run.get("best_epoch") == 0
            cells[run["lr"]] = f"**{text}**" if math.isclose(run["lr"], info["lr"]) else text
        rows.append([f"int{b}", *(cells.get(lr, DASH) for lr in lrs)])
    note = "\n\n† no epoch beat epoch 0: the best is RTN's NLL (this lr0 only made it worse)." if kept_rtn else ""
    return _markdown(header, rows) + note


def rtn_table(records) -> str:
    """FP and RTN per bit-width: validation NLL (nats/token), validation perplexity, test NLL,
    mean layer MSE on test (squared activation units) with FP inputs (eq. 2) and with own inputs."""
    t = _table(records)
    header = ["", "validation NLL", "validation ppl", "test NLL",
              *(f"mean layer MSE, {reading}" for reading, _ in MSE_READINGS)]
    recs = [("FP", t.get("fp", {}).get(None)), *((f"int{b}", t["rtn"][b]) for b in _bits(t, ("rtn",)))]
    rows = [[label, _nll(r["nll_validation"]), _g(r.get("ppl_validation")), _nll(r["nll_test"]),
             *(_g(r.get(key)) for _, key in MSE_READINGS)] for label, r in recs if r is not None]
    return _markdown(header, rows) if rows else "No FP/RTN records yet."


def observer_table(records) -> str:
    """RTN per scale observer (rows) and bit-width (columns): validation NLL (nats/token) with its
    change vs FP's validation NLL in %, and test NLL; **bold** = the lowest of each column."""
    fp = _fp(records)
    rtn = {(r["config"]["observer"], r["config"]["bits"]): r for r in records if r["config"]["method"] == "rtn"}
    if not rtn:
        return "No RTN records yet."
    observers = list(dict.fromkeys(o for o, _ in rtn))
    bits = sorted({b for _, b in rtn}, reverse=True)
    columns = []
    for b in bits:
        recs = [rtn.get((o, b)) for o in observers]
        val = _bold_min([r and r["nll_validation"] for r in recs])
        if fp is not None:
            val = [v if r is None else f"{v} ({100 * (r['nll_validation'] / fp['nll_validation'] - 1):+.1f}%)"
                   for v, r in zip(val, recs)]
        columns += [val, _bold_min([r and r["nll_test"] for r in recs])]
    vs = " (vs FP)" if fp is not None else ""
    header = ["observer", *(h for b in bits for h in (f"int{b} validation NLL{vs}", f"int{b} test NLL"))]
    return _markdown(header, [[o, *(col[i] for col in columns)] for i, o in enumerate(observers)])


def observer_choice(records, used: dict) -> str:
    """Markdown list, per bit-width: the observer a tier uses (``used``: bits -> observer) and the
    one whose RTN record has the lowest *validation* NLL (nats/token), with both values."""
    rtn = defaultdict(dict)
    for r in records:
        if r["config"]["method"] == "rtn":
            rtn[r["config"]["bits"]][r["config"]["observer"]] = r["nll_validation"]
    lines = []
    for b in sorted(rtn, reverse=True):
        best = min(rtn[b], key=rtn[b].get)
        tier = used.get(b)
        verdict = "the validation best" if tier == best else f"validation best: **{best}** {rtn[b][best]:.3f}"
        value = f" {rtn[b][tier]:.3f}" if tier in rtn[b] else ""
        lines.append(f"- int{b}: tier uses **{tier}**{value} — {verdict}")
    return "\n".join(lines) or "No RTN records yet."


def damping_table(records) -> str:
    """GPTQ's per-layer damping search (paper App. C), one row per bit-width: how many layers chose
    each grid value λ (damping = λ · mean diag H, chosen by the held-out layer loss when recorded),
    layers that fell back to RTN, and in how many layers the in-sample loss (the paper's score)
    would have chosen the same λ."""
    gptq = _table(records).get("gptq", {})
    if not gptq:
        return "No GPTQ records yet."
    grid = set()
    for r in gptq.values():
        grid |= {f"{float(d):g}" for d in (r["info"].get("options") or {}).get("damping_grid", [])}
        grid |= {k for layer in r["info"]["layers"].values() for k in layer.get("losses", {})}
    grid = sorted(grid, key=float)
    rows, any_fallback = [], False
    for b in sorted(gptq, reverse=True):
        layers = gptq[b]["info"]["layers"].values()
        chosen = [None if la["damping"] is None else f"{la['damping']:g}" for la in layers]
        agree = total = 0  # layers where in-sample scoring (the paper's) picks the same λ
        for la, c in zip(layers, chosen):
            held = {k: v for k, v in (la.get("held_out_losses") or {}).items() if v is not None}
            losses = {k: v for k, v in (la.get("losses") or {}).items() if v is not None}
            if held and losses:
                total += 1
                agree += min(losses, key=losses.get) == c
        any_fallback |= None in chosen
        rows.append([f"int{b}", *(chosen.count(k) for k in grid), chosen.count(None), len(chosen),
                     f"{agree}/{total}" if total else DASH])
    header = ["bits", *(f"λ {k}" for k in grid), "fallback (RTN)", "layers", "in-sample pick = held-out pick"]
    if not any_fallback:
        header, rows = header[:-3] + header[-2:], [r[:-3] + r[-2:] for r in rows]
    return _markdown(header, rows)


def damping_by_kind_table(records) -> str:
    """GPTQ's chosen damping λ by kind of linear (the name's last part: ``q_proj``, ``down_proj``
    ...), one row per bit-width and kind: how many layers chose each grid value. Looks for the
    pattern the paper did not find (App. C)."""
    gptq = _table(records).get("gptq", {})
    counts = defaultdict(lambda: defaultdict(int))
    for b, r in gptq.items():
        for name, layer in r["info"]["layers"].items():
            counts[(b, name.rsplit(".", 1)[-1])][DASH if layer["damping"] is None else f"{layer['damping']:g}"] += 1
    if not counts:
        return "No GPTQ records yet."
    grid = sorted({k for c in counts.values() for k in c}, key=lambda k: float("inf") if k == DASH else float(k))
    rows = [[f"int{b}", kind, *(counts[(b, kind)].get(k, "") for k in grid)]
            for b, kind in sorted(counts, key=lambda key: -key[0])]
    return _markdown(["bits", "linear", *(f"λ {k}" for k in grid)], rows)


def damping_scoring_table(records) -> str:
    """GPTQ's test NLL (nats/token) and mean layer MSE with FP inputs per bit-width, with the damping
    scored in sample (``holdout`` 0, the paper's App. C) and on held-out calibration sequences."""
    by = defaultdict(dict)
    for r in records:
        if r["config"]["method"] == "gptq":
            by[r["config"]["bits"]][float((r["info"].get("options") or {}).get("holdout") or 0)] = r
    holdouts = sorted({h for v in by.values() for h in v})
    if not holdouts:
        return "No GPTQ records yet."
    label = {0.0: "in sample"}
    header = ["bits", *(f"test NLL, {label.get(h, f'held out {h:g}')}" for h in holdouts),
              *(f"MSE FP inputs, {label.get(h, f'held out {h:g}')}" for h in holdouts)]
    rows = [[f"int{b}", *(_nll(by[b][h]["nll_test"]) if h in by[b] else DASH for h in holdouts),
             *(_g(by[b][h].get("mean_layer_mse_fp_inputs")) if h in by[b] else DASH for h in holdouts)]
            for b in sorted(by, reverse=True)]
    return _markdown(header, rows)


def misalignment_summary(records, local: str = "gptq", global_: str = "qaft") -> str:
    """Markdown: per bit-width, which method has the lower test NLL (nats/token) and which the
    lower mean layer MSE (test split; with FP inputs, eq. 2, when recorded, and with own inputs),
    and whether the two winners are aligned."""
    table = _table(records)
    lines = []
    for b in sorted(set(table.get(local, {})) & set(table.get(global_, {})) - {None}, reverse=True):
        lo, gl = table[local][b], table[global_][b]
        nll_winner = global_ if gl["nll_test"] < lo["nll_test"] else local
        readings = []
        for reading, key in MSE_READINGS:
            if lo.get(key) is None or gl.get(key) is None:
                continue
            mse_winner = local if lo[key] < gl[key] else global_
            aligned = "aligned" if nll_winner == mse_winner else "**misaligned**"
            readings.append(f"{reading}: {mse_winner.upper()} lower ({lo[key]:.4g} {local.upper()} vs "
                            f"{gl[key]:.4g} {global_.upper()}), {aligned}")
        lines.append(
            f"- int{b}: {nll_winner.upper()} has the lower test NLL ({lo['nll_test']:.3f} {local.upper()} vs "
            f"{gl['nll_test']:.3f} {global_.upper()}, Δ {gl['nll_test'] - lo['nll_test']:+.3f}). "
            f"Mean layer MSE (test) — {'; '.join(readings) or 'not recorded'}.")
    if not lines:
        return f"No bit-width has both {local} and {global_} records yet."
    return "\n".join(lines)


def fallback_summary(records) -> str:
    """One line per GPTQ record whose layers fell back to RTN (Cholesky failed at every damping
    value), or one line saying none did: the record's warning, shown where people read results."""
    lines = [f"**Warning** — GPTQ {r['config']['model']} int{r['config']['bits']}: {r['info']['warning']}"
             for r in records if r["config"]["method"] == "gptq" and (r.get("info") or {}).get("warning")]
    return "\n".join(lines) or "No GPTQ layer fell back to RTN: every layer solved at a damping of the grid."


def first_epoch_summary(records) -> str:
    """Markdown: does one epoch of QAFT already beat GPTQ (test NLL), per bit-width?"""
    table = _table(records)
    lines = []
    for b in sorted(set(table.get("qaft", {})) & set(table.get("gptq", {})), reverse=True):
        info = table["qaft"][b]["info"]
        run = next(r for r in info["runs"] if r["lr"] == info["lr"])
        after_one = next((h["nll_test"] for h in run["history"] if h["epoch"] == 1), None)
        if after_one is None:
            continue
        gptq = table["gptq"][b]["nll_test"]
        verdict = "beats" if after_one < gptq else "does not beat"
        lines.append(f"- int{b}: after 1 epoch QAFT test NLL {after_one:.3f} {verdict} GPTQ's {gptq:.3f} "
                     f"(Δ {after_one - gptq:+.4f}).")
    return "\n".join(lines) or "No QAFT/GPTQ pairs yet."


def lr_summary(records) -> str:
    """Markdown: the best initial LR per bit-width and whether lower bits prefer higher LRs."""
    qaft = _table(records).get("qaft", {})
    if not qaft:
        return "No QAFT records yet."
    best = {b: qaft[b]["info"]["lr"] for b in sorted(qaft, reverse=True)}
    lines = [f"- int{b}: best initial LR {lr:g}" for b, lr in best.items()]
    lrs = list(best.values())  # from high to low bits
    monotone = all(a <= b for a, b in zip(lrs, lrs[1:]))
    lines.append(f"\nLower bit-widths {'do' if monotone else 'do not all'} prefer equal or higher learning "
                 f"rates here (paper App. A: int3/int2 prefer high LRs).")
    return "\n".join(lines)


FP_BITS = 16  # the paper's models are float16: the FP reference point sits at 16 bits per weight


def pareto_points(records, metric: str = "nll_test") -> list[dict]:
    """Paper Fig. 2's points, one per record: ``{model, method, bits, size_gb, nll}`` with
    ``size_gb`` = stack_params x bits / 8 / 1e9 (the transformer stack's linear weights in GB;
    FP at 16 bits, method "fp") and ``nll`` = ``record[metric]``. Records without
    ``stack_params`` or without the metric are left out (they cannot be placed)."""
    points = []
    for r in records:
        c = r["config"]
        bits = FP_BITS if c["method"] == "fp" else c["bits"]
        if r.get("stack_params") is None or r.get(metric) is None or bits is None:
            continue
        tensor = c.get("granularity", "tensor") == "tensor"
        # per channel / group: the format is its own series, and its size counts the scales
        points.append({"model": c["model"] if tensor else f"{c['model']} {grid_of(r)}", "method": c["method"],
                       "bits": bits, "nll": r[metric],
                       "size_gb": r["stack_params"] * bits / 8 / 1e9 if tensor else r["weight_size_gb"]})
    return points


def pareto_front(points) -> list[dict]:
    """The points no other point dominates (size_gb <= and nll <=, one of them strictly), sorted
    by size (then NLL); identical (size, NLL) points stay together; NaN NLLs are never on it."""
    points = [p for p in points if not math.isnan(p["nll"])]

    def dominated(p):
        return any(q["size_gb"] <= p["size_gb"] and q["nll"] <= p["nll"]
                   and (q["size_gb"] < p["size_gb"] or q["nll"] < p["nll"]) for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p["size_gb"], p["nll"]))


def _model_order(points) -> list[str]:
    """Models from the smallest stack to the largest (ties: by name)."""
    size = {}
    for p in points:
        size[p["model"]] = min(size.get(p["model"], math.inf), p["size_gb"] / p["bits"])
    return sorted(size, key=lambda m: (size[m], m))


def _by_model_bits(points) -> dict:
    """``{(model, bits): {method: point}}`` (FP under bits 16)."""
    cells = defaultdict(dict)
    for p in points:
        cells[(p["model"], p["bits"])][p["method"]] = p
    return cells


def _on_front(points) -> set:
    return {(p["model"], p["method"], p["bits"]) for p in pareto_front(points)}


def _point_label(p) -> str:
    return f"{p['model']} FP" if p["method"] == "fp" else f"{p['model']} {p['method'].upper()} int{p['bits']}"


def _split_label(metric: str) -> str:
    return f"{metric.removeprefix('nll_')} NLL"


def pareto_table(records, metric: str = "nll_test") -> str:
    """Paper Fig. 2 as a table, one row per model (smallest stack first) and bit-width (FP, then
    high to low): the stack's weight size (GB, FP at 16 bits), RTN / GPTQ / QAFT test NLL
    (nats/token), GPTQ − QAFT (positive: QAFT lower) and which points are on the Pareto front
    over every row (test NLL vs size)."""
    points = pareto_points(records, metric)
    if not points:
        return "No records with a weight size yet."
    front, cells = _on_front(points), _by_model_bits(points)
    rows = []
    for model in _model_order(points):
        for bits in sorted((b for m, b in cells if m == model), reverse=True):
            cell = cells[(model, bits)]
            size = next(iter(cell.values()))["size_gb"]
            methods = sorted(cell, key=lambda m: (MAIN + (m,)).index(m))
            on = ", ".join(m.upper() for m in methods if (model, m, bits) in front) or DASH
            if set(cell) == {"fp"}:
                rows.append([model, "FP (16)", _g(size), *[_nll(cell["fp"]["nll"])] * len(QUANTIZERS), DASH, on])
                continue
            nll = {m: cell[m]["nll"] if m in cell else None for m in QUANTIZERS}
            gap = None if None in (nll["gptq"], nll["qaft"]) else nll["gptq"] - nll["qaft"]
            rows.append([model, f"int{bits}", _g(size), *(_nll(nll[m]) for m in QUANTIZERS),
                         DASH if gap is None else f"{gap:+.3f}", on])
    header = ["model", "bits", "size GB", *(f"{m.upper()} {_split_label(metric)}" for m in QUANTIZERS), "GPTQ − QAFT",
              "on Pareto front"]
    return _markdown(header, rows)


def pareto_summary(records, metric: str = "nll_test") -> str:
    """Markdown conclusion of paper Fig. 2 from the records: which methods' points make up the
    Pareto front (test NLL vs stack weight size) and how many of each; per bit-width the GPTQ −
    QAFT test-NLL gap (mean over models, and per model); whether QAFT is below GPTQ at every
    (model, bits) both have, and whether the mean gap grows as bits fall (paper §IV-B); and which
    (model, bits) lack a method."""
    points = pareto_points(records, metric)
    if not points:
        return "No records with a weight size yet."
    front, cells, models = pareto_front(points), _by_model_bits(points), _model_order(points)
    counts = defaultdict(int)
    for p in front:
        counts[p["method"]] += 1
    listed = ", ".join(f"{_point_label(p)} ({p['size_gb']:.3g} GB, {p['nll']:.3f})" for p in front)
    share = ", ".join(f"{m.upper()} {counts[m]}" for m in sorted(counts, key=lambda m: (-counts[m], m)))
    lines = [f"**Pareto front** ({_split_label(metric)} vs stack weight size; {len(front)} of {len(points)} points, "
             f"{len(models)} model(s)): {share}. "
             f"From small to large: {listed}."]
    gaps = defaultdict(dict)  # bits -> model -> GPTQ - QAFT
    for (model, bits), cell in cells.items():
        if "gptq" in cell and "qaft" in cell:
            gaps[bits][model] = cell["gptq"]["nll"] - cell["qaft"]["nll"]
    if gaps:
        lines.append(f"\n**GPTQ − QAFT {_split_label(metric)}** (positive: QAFT lower), mean over models:")
        for bits in sorted(gaps, reverse=True):
            per = ", ".join(f"{m} {gaps[bits][m]:+.3f}" for m in models if m in gaps[bits])
            mean = sum(gaps[bits].values()) / len(gaps[bits])
            lines.append(f"- int{bits}: {mean:+.3f} over {len(gaps[bits])} model(s) ({per})")
        pairs = [(m, b, g) for b in sorted(gaps, reverse=True) for m in models for g in [gaps[b].get(m)] if g is not None]
        not_below = [f"{m} int{b} ({g:+.3f})" for m, b, g in pairs if g <= 0]
        lines.append(f"\nQAFT is below GPTQ at every (model, bits) pair ({len(pairs)}/{len(pairs)})." if not not_below
                     else f"\nQAFT is below GPTQ at {len(pairs) - len(not_below)}/{len(pairs)} (model, bits) pairs; "
                          f"not at: {', '.join(not_below)}.")
        means = [sum(gaps[b].values()) / len(gaps[b]) for b in sorted(gaps, reverse=True)]  # high to low bits
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


# README marker name -> (table function, methods of the records it draws on)
SECTIONS = {
    "fig1": (fig1_table, MAIN),
    "layers": (layer_share_table, QUANTIZERS),
    "qaft-epochs": (qaft_epochs_table, ("gptq", "qaft")),
    "lr": (lr_table, ("qaft",)),
    "rtn": (rtn_table, ("fp", "rtn")),
    "observers": (observer_table, ("fp", "rtn")),
    "damping": (damping_table, ("gptq",)),
    "damping-kinds": (damping_by_kind_table, ("gptq",)),
    "damping-scoring": (damping_scoring_table, ("gptq",)),
    "misalignment": (misalignment_summary, ("gptq", "qaft")),
}


def precision_table(pairs) -> str:
    """QAFT trained under bf16 autocast against fp32, everything else equal: ``pairs`` is a list of
    ``(bf16 record, fp32 record)``. The choice is made on validation: validation NLL of each, the
    relative difference and whether bf16 is no more than 1% worse; then the test NLLs (reported,
    never used to choose) and the seconds per training step."""
    rows = []
    for bf16, fp32 in pairs:
        c = bf16["config"]
        rel = (bf16["nll_validation"] - fp32["nll_validation"]) / fp32["nll_validation"]
        test = (bf16["nll_test"] - fp32["nll_test"]) / fp32["nll_test"]
        rows.append([c["model"], f"int{c['bits']}", _nll(bf16["nll_validation"]), _nll(fp32["nll_validation"]),
                     f"{100 * rel:+.2f}%", "yes" if rel <= 0.01 else "**no**", f"{100 * test:+.2f}%",
                     f"{bf16['info']['step_s']:.2f}", f"{fp32['info']['step_s']:.2f}"])
    return _markdown(["model", "bits", "validation NLL, bf16", "validation NLL, fp32", "bf16 vs fp32",
                      "bf16 at most 1% worse", "test NLL, bf16 vs fp32", "s/step bf16", "s/step fp32"], rows)


def batch_table(summary: dict, planned=None) -> str:
    """The main job's wall time per notebook from ``OUTPUTS/<tier>/batch.json`` (``repro batch``):
    the runs it was the first to need (computed, minutes) and executing it (papermill). With
    ``planned`` (the ``(notebook, model)`` pairs of today's plan, ``repro.batch.plan``), jobs the
    plan no longer holds are marked and a second total covers the planned ones only."""
    rows, extra = [], 0.0
    for job in summary["jobs"]:
        computed = [r for r in job["runs"] if r["status"] == "ran"]
        outside = planned is not None and (job["notebook"], job["model"]) not in planned
        extra += (job["runs_s"] + job["execute_s"]) if outside else 0.0
        rows.append([job["notebook"] + (" (not in the main job now)" if outside else ""), job["model"] or "all",
                     job["status"], len(computed), f"{job['runs_s'] / 60:.1f}", f"{job['execute_s'] / 60:.1f}",
                     f"{(job['runs_s'] + job['execute_s']) / 60:.1f}"])
    total = sum(j["runs_s"] + j["execute_s"] for j in summary["jobs"])
    rows.append(["**total**", "", "", sum(r[3] for r in rows), "", "", f"**{total / 60:.1f}**"])
    if extra:
        rows.append(["**total of today's main job**", "", "", "", "", "", f"**{(total - extra) / 60:.1f}**"])
    return (_markdown(["notebook", "model", "status", "runs computed", "runs min", "execute min", "total min"], rows)
            + f"\n\n*From `{summary['tier']}/batch.json` ({summary['created']}, code {summary['code']}, "
              f"{summary['cached']} runs cached at the start).*")


def provenance(records, tier: str, command: str) -> str:
    """One italic line: tier, model(s), the distinct code hashes of ``records`` and the command."""
    models = sorted({r["config"]["model"] for r in records}) or ["none"]
    codes = sorted({(r.get("versions") or {}).get("code") or "unknown" for r in records}) or ["none"]
    return (f"*Generated from {len(records)} records by `{command}`: tier {tier}, model {', '.join(models)}, "
            f"code {', '.join(codes)}.*")


def readme_sections(records, observer_records=(), tier: str = "cpu", command: str | None = None,
                    in_sample_records=(), other_models: dict | None = None) -> dict:
    """``{marker name: markdown}``, each table followed by its provenance line. ``records``: the
    tier's sweep (fp, rtn, gptq, qaft) of its default model; ``observer_records``: RTN at every
    observer (for ``observers``, with the sweep's FP as reference); ``in_sample_records``: GPTQ
    with in-sample damping scoring (``holdout`` 0), compared in ``damping-scoring``;
    ``other_models``: ``{model: (sweep records, observer records)}`` of the tier's other models,
    which add ``fig1-MODEL``, ``observers-MODEL`` and, over every model, ``pareto``."""
    command = command or f"repro report --tier {tier}"
    fp = [r for r in records if r["config"]["method"] == "fp"]
    sections = {}
    for name, (table, methods) in SECTIONS.items():
        pool = {"observers": [*fp, *observer_records],
                "damping-scoring": [*records, *in_sample_records]}.get(name, records)
        used = [r for r in pool if r["config"]["method"] in methods]
        sections[name] = f"{table(used)}\n\n{provenance(used, tier, command)}"
    everything = list(records)
    for model, (sweep, observed) in (other_models or {}).items():
        everything += sweep
        model_fp = [r for r in sweep if r["config"]["method"] == "fp"]
        for name, used in ((f"fig1-{model}", sweep), (f"observers-{model}", [*model_fp, *observed])):
            table = SECTIONS[name.rsplit("-" + model, 1)[0]][0]
            sections[name] = f"{table(used)}\n\n{provenance(used, tier, command)}"
    if other_models:
        sections["pareto"] = (f"{pareto_table(everything)}\n\n{pareto_summary(everything)}\n\n"
                              f"{provenance(everything, tier, command)}")
    return sections


def _marker_re(name: str) -> re.Pattern:
    name = re.escape(name)
    return re.compile(rf"(^[ \t]*<!-- report:{name} -->[ \t]*\n)(.*?)(^[ \t]*<!-- /report:{name} -->[ \t]*$)",
                      re.M | re.S)


def update_markdown(text: str, sections: dict) -> str:
    """``text`` with the content between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``
    (lines of their own, kept) replaced by ``sections[NAME]``; other markers are left alone.
    Raises ValueError naming every section without its pair of markers."""
    missing = [name for name in sections if not _marker_re(name).search(text)]
    if missing:
        raise ValueError(f"no <!-- report:NAME --> ... <!-- /report:NAME --> markers for: {', '.join(missing)}")
    for name, body in sections.items():
        text = _marker_re(name).sub(lambda m: f"{m.group(1)}\n{body.strip()}\n\n{m.group(3)}", text)
    return text


# ----------------------------------------------------------------------------- cross-block study
def method_label(record) -> str:
    """RTN, GPTQ, QAFT, FP, or the block-wise variant (block PTQ, MB-PTQ m=2, LA-PTQ l=1 ...)."""
    return describe(record["config"]).label


def locality(record) -> tuple:
    """Sort key along the locality spectrum, from the most local objective to the global one:
    RTN (a weight tensor) < GPTQ (one linear) < block PTQ < MB-PTQ (m blocks) < LA-PTQ (a block
    and l downstream) < QAFT (the whole network's NLL); FP first."""
    return describe(record["config"]).spectrum


def sees(record) -> str:
    """What the method's objective sees, in words (the spectrum's x-axis)."""
    return describe(record["config"]).sees


def blockwise_bits(records) -> list[int]:
    """The bit-widths that have block-wise records, highest first (empty: none)."""
    return sorted({r["config"]["bits"] for r in records if r["config"]["method"] == "blockwise"}, reverse=True)


def spectrum_records(records, bits: int, model: str | None = None) -> list:
    """The quantized records at ``bits`` (of ``model``), ordered along the locality spectrum."""
    chosen = [r for r in records if r["config"]["bits"] == bits and (model is None or r["config"]["model"] == model)]
    return sorted(chosen, key=locality)


def median_layer_mse(record, key: str = "layer_mse_fp_inputs") -> float | None:
    """Median over the stack's layers of a per-layer MSE (``layer_mse_fp_inputs`` or ``layer_mse``).
    The mean is dominated by the few down_projs whose inputs carry massive activations and whose
    outlier weights the fixed scale clips, the same for every method; the median is not."""
    values = sorted((record.get(key) or {}).values())
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def spectrum_table(records, bits: int, model: str | None = None, seconds: bool = True) -> str:
    """Markdown: the locality spectrum at ``bits``: per method, what its objective sees, test NLL,
    the median layer MSE over the stack's layers in both readings (``median_layer_mse``), the mean
    block-output MSE (test split, each model propagating its own activations; squared activation
    units) and, with ``seconds``, the method's wall time."""
    rows = spectrum_records(records, bits, model)
    if not rows:
        return f"No int{bits} records yet."
    nlls = _bold_min([r["nll_test"] for r in rows])
    header = ["method", "objective sees", "test NLL", "median layer MSE, FP inputs", "median layer MSE, own inputs",
              "block-output MSE"] + (["method s"] if seconds else [])
    return _markdown(header, [
        [method_label(r), sees(r), nll, _g(median_layer_mse(r, "layer_mse_fp_inputs")),
         _g(median_layer_mse(r, "layer_mse")),
         _g(r.get("mean_block_output_mse"))] + ([_seconds(r)] if seconds else []) for r, nll in zip(rows, nlls)])


def window_times(records) -> list[tuple[int, float]]:
    """``(blocks involved m + l, seconds)`` of every block-wise window, per optimizer step (so
    that variants with different step counts compare): the training loop's time (``train_s``)
    where recorded, else the window's whole wall time (with its FP-chain extension, held-out
    checks and baking)."""
    points = []
    for r in records:
        if r["config"]["method"] == "blockwise":
            for w in r["info"]["windows"]:
                if w["steps"]:
                    points.append((w["window"] + w["lookahead"], w.get("train_s", w["wall_s"]) / w["steps"]))
    return points


def growth_law(records) -> tuple[float, float] | None:
    """Least-squares fit ``t = a (m + l)^k`` of the seconds per optimizer step of each window
    against the number of blocks it runs; ``(a, k)`` or ``None`` with fewer than two sizes."""
    points = window_times(records)
    if len({n for n, _ in points}) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - k * mx), k


def cross_block_summary(records) -> str:
    """Markdown, computed: per (model, bits) how MB-PTQ and LA-PTQ compare with block PTQ (test NLL),
    where along the spectrum the lowest local error and the lowest test NLL sit, and the growth
    law of the time per step with the blocks involved."""
    lines = []
    cells = defaultdict(list)
    for r in records:
        if r["config"]["bits"] is not None:
            cells[(r["config"]["model"], r["config"]["bits"])].append(r)
    for (model, bits), rows in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        by = {method_label(r): r for r in rows}
        base = by.get("block PTQ")
        if base is not None:
            parts = []
            for name, r in sorted(by.items(), key=lambda kv: locality(kv[1])):
                if r["config"]["method"] == "blockwise" and name != "block PTQ":
                    d = r["nll_test"] - base["nll_test"]
                    verdict = "helps" if d < -0.01 * base["nll_test"] else "hurts" if d > 0.01 * base["nll_test"] else "no effect (within 1%)"
                    parts.append(f"{name} {r['nll_test']:.3f} (Δ {d:+.3f}: {verdict})")
            lines.append(f"- {model} int{bits}: block PTQ {base['nll_test']:.3f}; " + "; ".join(parts) + ".")
        ordered = spectrum_records(rows, bits)
        with_mse = [r for r in ordered if r.get("mean_block_output_mse") is not None]
        if ordered:
            best_nll = min(ordered, key=lambda r: r["nll_test"])
            text = f"  Lowest test NLL: {method_label(best_nll)} ({best_nll['nll_test']:.3f})"
            if with_mse:
                best_local = min(with_mse, key=lambda r: r["mean_block_output_mse"])
                agree = ("the same method" if best_local is best_nll else "**not** the same method"
                         if best_nll.get("mean_block_output_mse") is not None else
                         f"unknown whether the same ({method_label(best_nll)}'s record predates the metric)")
                text += (f"; lowest block-output MSE: {method_label(best_local)} "
                         f"({best_local['mean_block_output_mse']:.3g}) — {agree}")
            lines.append(text + ".")
    return "\n".join(lines) or "No block-wise records yet."


def growth_summary(records) -> str:
    """One line: the fitted growth of the time per optimizer step with the blocks a window runs."""
    law = growth_law(records)
    if law is None:
        return "Fewer than two window sizes (m + l): no growth law to fit."
    a, k = law
    return (f"Time per optimizer step grows as {a:.3g} s × (m + l)^{k:.2f} with the blocks a window runs "
            f"(fit over {len(window_times(records))} windows; k = 1 is linear).")


def memory_table(records) -> str:
    """Per block-wise variant, its largest window's memory (MB = 1e6 bytes): the measured
    components and the predicted training peak on top of the loaded model = 2 x the window's fp32
    weights (gradient and best-state copy) + Adam's two moments + the tensors autograd saved for one
    mini-batch through the m + l blocks (activations and the fake-quantized weight copies; for the
    look-ahead blocks it also counts their resident weights, so it is an upper bound); the CUDA
    peak where the run was on a GPU."""
    rows = []
    for r in sorted((r for r in records if r["config"]["method"] == "blockwise"), key=locality):
        w = max(r["info"]["windows"], key=lambda w: w["trainable_params"] + w["lookahead"])
        mem = w["memory_bytes"]
        predicted = 2 * mem["window_weights"] + mem["optimizer_state"] + mem["saved_activations"]
        rows.append([f"{method_label(r)} int{r['config']['bits']}", r["config"]["model"], w["trainable_params"],
                     *(f"{mem[k] / 1e6:.1f}" for k in ("window_weights", "optimizer_state", "saved_activations",
                                                        "lookahead_weights")),
                     f"{predicted / 1e6:.1f}", DASH if mem["cuda_peak"] is None else f"{mem['cuda_peak'] / 1e6:.1f}"])
    return _markdown(["variant", "model", "window params", "weights MB", "Adam MB", "autograd saved MB",
                      "look-ahead MB", "predicted peak MB", "CUDA peak MB"], rows) if rows else "No block-wise records yet."


# Block-wise variants outside the main job that the README reports where their records exist: the equal
# optimizer steps per block control for MB-PTQ m=2 (`repro run --method blockwise --bits 4 --option window=2
# --option steps_per=block`), too slow for the cpu tier's budget (the paper tier runs it).
CROSS_BLOCK_CONTROLS = [{"window": 2, "steps_per": "block"}]

# The sweep that chose the cpu tier's block-wise defaults (block PTQ, SmolLM2, int4): each entry is
# `repro run --method blockwise --bits 4 --option KEY=VALUE ...`; the last is the tier's default.
BLOCKWISE_SWEEP_BITS = 4
BLOCKWISE_SWEEP = [*({"window": 1, "steps": steps, "lr": lr, "mixed_precision": "no"}
                     for steps, lr in ((32, 1e-4), (32, 3e-4), (32, 1e-3), (32, 3e-3), (16, 1e-3))),
                   {"window": 1}]


def blockwise_sweep_table(records) -> str:
    """The sweep that chose the block-wise defaults: per variant, bits, training precision (fp32
    first), steps and lr, the validation NLL (the selection; best in bold), test NLL and seconds."""
    from repro.methods.blockwise import DEFAULTS

    opts = {id(r): {**DEFAULTS, **r["config"]["options"]} for r in records}
    rows = sorted((r for r in records if r["config"]["method"] == "blockwise"),
                  key=lambda r: (locality(r), -r["config"]["bits"], opts[id(r)]["mixed_precision"] != "no",
                                 opts[id(r)]["steps"], opts[id(r)]["lr"]))
    if not rows:
        return "No block-wise sweep records."
    vals = _bold_min([r["nll_validation"] for r in rows])
    return _markdown(["variant", "bits", "steps per window", "lr", "training precision", "validation NLL",
                      "test NLL", "method s"],
                     [[method_label(r), f"int{r['config']['bits']}", opts[id(r)]["steps"], f"{opts[id(r)]['lr']:g}",
                       "fp32" if opts[id(r)]["mixed_precision"] == "no" else "bf16", v,
                       _nll(r["nll_test"]), _seconds(r)] for r, v in zip(rows, vals)])


# ----------------------------------------------------------------------------- loss landscape (notebook 03)
def basin_table(result: dict) -> str:
    """Markdown: the basin radius R(w) per split (median over directions, IQR, bootstrap 95% CI,
    R / ‖w‖, R_tau, directions whose bowl fit was accepted)."""
    from repro import landscape

    rows = []
    for split in ("train", "validation"):
        b = landscape.basin_radius(result, split)
        bound = " (lower bound)" if b["bound"] else ""
        rows.append([split, f"{b['R']:.4g}{bound}", f"{b['R_iqr'][0]:.4g} – {b['R_iqr'][1]:.4g}",
                     f"{b['R_ci95'][0]:.4g} – {b['R_ci95'][1]:.4g}", f"{b['R_over_norm']:.3f}",
                     f"{b['R_tau']:.4g}" if b['R_tau'] is not None else "— (no quadratic fit)", f"{b['accepted']} of {b['directions']}"])
    return (f"‖w‖ = {result['norm']:.4g} ({result['model']}, stack weights; corpus {result.get('corpus', DASH)})\n\n"
            + _markdown(["split", "R(w)", "IQR", "95% CI (median)", "R / ‖w‖",
                         f"R_tau (tau = {result['settings']['tau']} nats)", "fits accepted"], rows))


def rtn_vs_random_table(result: dict) -> str:
    """Markdown: NLL of w_RTN per width against a random step of the same length from w."""
    from repro import landscape

    rows = []
    for split in ("train", "validation"):
        for r in landscape.rtn_vs_random(result, split):
            rows.append([split, f"int{r['bits']}", f"{r['distance']:.4g}", _nll(r["nll_rtn"]),
                         _nll(r["nll_random"]) if r["nll_random"] is not None else "beyond the sweep",
                         f"{r['excess']:+.3f}" if r["excess"] is not None else DASH])
    return _markdown(["split", "RTN", "‖w_RTN − w‖", "NLL w_RTN", "NLL random step, same length",
                      "RTN − random"], rows)


def barrier_table(result: dict, bits: int) -> str:
    """Markdown: per segment at ``bits``, the barrier max_a L(a) - (L(0) + L(1)) / 2, both splits."""
    from repro import landscape

    train, val = (landscape.segment_barriers(result, bits, s) for s in ("train", "validation"))
    rows = [[f"{t['a']} → {t['b']}", _nll(t["nll_a"]), _nll(t["nll_b"]), f"{t['barrier']:+.3f}", f"{v['barrier']:+.3f}"]
            for t, v in zip(train, val)]
    return _markdown(["segment", "train NLL start", "train NLL end", "barrier train", "barrier validation"], rows)


def radius_summary(analysis: dict) -> str:
    """Markdown, computed: does misalignment (eta = GPTQ - QAFT test NLL) start where rho =
    ‖w_RTN − w‖ / R(w) passes 1, as the paper's explanation says?"""
    rows = [[r["model"], r.get("corpus") or DASH, f"int{r['bits']}", f"{r['distance_rtn']:.4g}",
             f"{r['R']:.4g}" + (" (≥)" if r["R_is_bound"] else ""), f"{r['rho']:.2f}", f"{r['eta']:+.3f}"]
            for r in analysis["rows"]]
    table = _markdown(["model", "corpus", "bits", "‖w_RTN − w‖", "R(w)", "rho", "eta (test)"], rows)
    gap, mis, ok = analysis["gap"], analysis["misaligned_rho"], analysis["aligned_rho"]
    lines = [f"Spearman correlation of eta with rho: {analysis['spearman']:.2f} over {analysis['n']} (model, width)."]
    if mis:
        lines.append(f"Misaligned (eta > {gap} nats) at rho = {', '.join(f'{x:.2f}' for x in mis)}; "
                     f"aligned at rho = {', '.join(f'{x:.2f}' for x in ok) or 'none'}.")
    below = [x for x in mis if x <= 1]
    above_ok = [x for x in ok if x > 1]
    bound = any(r["R_is_bound"] for r in analysis["rows"])
    if not mis:
        lines.append(f"No misalignment (eta > {gap} nats) at any width: nothing for rho to explain.")
    elif bound:  # R a lower bound: every rho an upper bound, so only rho <= 1 with misalignment is conclusive
        lines.append("R(w) is only a lower bound here (no bowl fit accepted), so every rho is an upper bound: "
                     + (f"misalignment already at rho ≤ {max(below):.2f} — **the threshold of the paper's "
                        f"explanation does not hold here**." if below else
                        "the threshold rho = 1 cannot be tested with these points (more radii or directions)."))
    elif not below and not above_ok:
        lines.append("rho = 1 separates them exactly: **the paper's explanation holds** on these records.")
    else:
        lines.append(f"rho = 1 separates them in {analysis['threshold_agrees']} of {analysis['n']} cases: "
                     + (f"misalignment already at rho ≤ 1 ({', '.join(f'{x:.2f}' for x in below)})" if below else "")
                     + ("; " if below and above_ok else "")
                     + (f"no misalignment at rho > 1 ({', '.join(f'{x:.2f}' for x in above_ok)})" if above_ok else "")
                     + " — **the threshold of the paper's explanation does not hold here**.")
    return table + "\n\n" + " ".join(lines)


# ----------------------------------------------------------------------------- other corpora (notebook 05)
def corpora_table(records) -> str:
    """Markdown: test NLL of FP, RTN, GPTQ and QAFT per corpus and width, GPTQ − QAFT, and the order
    of the three methods (the paper's Fig. 4 question: does QAFT < GPTQ < RTN hold on every corpus?)."""
    cells = defaultdict(dict)
    fp = {}
    for r in records:
        c = r["config"]
        if c["method"] == "fp":
            fp[c["corpus"]] = r["nll_test"]
        elif c["method"] in QUANTIZERS:
            cells[(c["corpus"], c["bits"])][c["method"]] = r["nll_test"]
    rows = []
    for (corpus, bits), by in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if set(QUANTIZERS) <= set(by):
            order = " < ".join(m.upper() for m in sorted(QUANTIZERS, key=by.get))
            rows.append([corpus, f"int{bits}", _nll(fp.get(corpus)) if corpus in fp else DASH,
                         *(_nll(by[m]) for m in QUANTIZERS), f"{by['gptq'] - by['qaft']:+.3f}", order])
    return _markdown(["corpus", "bits", "FP", "RTN", "GPTQ", "QAFT", "GPTQ − QAFT", "order (test NLL)"], rows) \
        if rows else "No complete (RTN, GPTQ, QAFT) sets of records yet."


def corpora_summary(records, gap: float = 0.05) -> str:
    """Markdown, computed: per corpus, at which widths QAFT beats GPTQ by more than ``gap`` nats
    (the misalignment) and whether that holds on every corpus."""
    by = defaultdict(dict)
    for r in records:
        c = r["config"]
        if c["method"] in ("gptq", "qaft"):
            by[(c["corpus"], c["bits"])][c["method"]] = r["nll_test"]
    verdicts = defaultdict(list)
    for (corpus, bits), v in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if {"gptq", "qaft"} <= set(v):
            verdicts[corpus].append((bits, v["gptq"] - v["qaft"]))
    if not verdicts:
        return "No GPTQ/QAFT pairs yet."
    lines = []
    for corpus, pairs in verdicts.items():
        mis = [f"int{b} ({d:+.3f})" for b, d in pairs if d > gap]
        not_mis = [f"int{b} ({d:+.3f})" for b, d in pairs if d <= gap]
        lines.append(f"- {corpus}: QAFT beats GPTQ by more than {gap} nats at {', '.join(mis) or 'no width'}"
                     + (f"; not at {', '.join(not_mis)}" if not_mis else "") + ".")
    everywhere = all(d > gap for pairs in verdicts.values() for _, d in pairs)
    lines.append("The misalignment holds on every corpus at every width measured." if everywhere else
                 "The misalignment does **not** hold on every corpus and width measured (see above).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- granularity (notebook 08)
def grid_of(record) -> str:
    """A record's scales: "per tensor" (the paper's), "per channel" or "g<group size>"."""
    from repro.quant import grid_name

    c = record["config"]  # records from before the option: per tensor
    return grid_name(c.get("granularity", "tensor"), c.get("group_size"))


def _grids(records) -> list[str]:
    order = {"per tensor": 0, "per channel": 1}
    return sorted({grid_of(r) for r in records if r["config"]["method"] != "fp"}, key=lambda g: (order.get(g, 2), g))


def granularity_table(records) -> str:
    """Markdown: test NLL (nats/token) per model, width and method (rows) at each granularity
    (columns), FP first; block-wise variants where present."""
    grids = _grids(records)
    cells, fp = defaultdict(dict), {}
    for r in records:
        c = r["config"]
        if c["method"] == "fp":
            fp[c["model"]] = r["nll_test"]
        else:
            cells[(c["model"], c["bits"], locality(r), method_label(r))][grid_of(r)] = r["nll_test"]
    rows = [[model, "FP", "fp", *([_nll(nll)] * len(grids))] for model, nll in fp.items()]
    for (model, bits, _, label), by in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        rows.append([model, f"int{bits}", label, *(_nll(by[g]) if g in by else DASH for g in grids)])
    return _markdown(["model", "bits", "method", *grids], rows) if cells else "No records yet."


def granularity_summary(records, radius: float | None = None, gap: float = 0.05, bound: bool = False) -> str:
    """Markdown, computed from the records: per granularity, (1) where the misalignment appears
    (GPTQ − QAFT test NLL > ``gap`` nats) and how far each method stays from FP; (2) with the FP
    basin radius ``radius`` (``landscape.basin_radius``'s R on train, same for every grid: it is a
    property of w), ``rho = ||w_RTN - w|| / R`` per width and whether misalignment appears exactly
    where ``rho > 1`` (the paper's explanation; ``bound``: R is only a lower bound, so each rho is an
    upper bound and only ``rho <= 1`` is decided); (3) LA-PTQ − block PTQ test NLL where both ran."""
    grids = _grids(records)
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
        mis, aligned, rhos, local = [], [], [], []
        for b in widths:
            cell = by[(g, b)]
            if "GPTQ" in cell and "QAFT" in cell:
                eta = cell["GPTQ"]["nll_test"] - cell["QAFT"]["nll_test"]
                (mis if eta > gap else aligned).append(f"int{b} ({eta:+.3f})")
                if radius and "RTN" in cell:
                    rho = cell["RTN"]["weight_distance"] / radius
                    rhos.append(f"int{b} {'≤ ' if bound else ''}{rho:.2f}")
                    if bound and rho > 1:  # the true rho may lie on either side of 1
                        undecided += 1
                    else:
                        agree += (rho > 1) == (eta > gap)
                        total += 1
            if "block PTQ" in cell and "LA-PTQ l=1" in cell:
                local.append(f"int{b} {cell['LA-PTQ l=1']['nll_test'] - cell['block PTQ']['nll_test']:+.3f}")
        near = [f"{m} int{b} {cell[m]['nll_test'] - fp:+.2f}" for b in widths for cell in [by[(g, b)]]
                for m in ("RTN", "GPTQ", "QAFT") if m in cell] if fp is not None else []
        text = (f"- **{g}**: QAFT beats GPTQ by more than {gap} nats at {', '.join(mis) or 'no width'}"
                + (f"; not at {', '.join(aligned)}" if aligned else "") + ".")
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
        lines.append(f"\nR(w) is only a lower bound here (no accepted bowl fit), so ρ is an upper bound: "
                     f"{undecided} cell(s) with a bound above 1 cannot test the threshold.")
    return "\n".join(lines)
