"""The sweep (notebooks 00, 01 and 06; paper Fig. 1 and App. A): FP, RTN, GPTQ and QAFT at every
width of the tier, per model. Its tables: Fig. 1 (test NLL and both layer-MSE readings per width),
the share of layers each method wins, QAFT's epochs and learning rates, RTN's observers, GPTQ's
damping, the misalignment verdict; its figures: NLL against width, the layer-MSE profile and the
Fig. 1 panels.
"""
from __future__ import annotations

import math
from collections import defaultdict

from repro import plots
from repro.analysis import by_method_bits, chosen_epoch, chosen_run, fp_record, pareto_points, widths
from repro.config import deviation_reasons, deviations, load_tier, make_config, sweep_configs, tier_path
from repro.methods import MAIN, QUANTIZERS
from repro.quant import OBSERVERS
from repro.report import DASH, MSE_READINGS, bold_min, g_cell, markdown_table, nll_cell, provenance, seconds_cell
from repro.studies import Notebook, NoRecordsError, read_records, seeds, suffix, tier_models
from repro.uncertainty import compare, compare_gaps, compare_layers, direction, interval_cell, verdict


def configs(tier: str, model: str | None = None, bits=None, methods=MAIN, **overrides) -> list:
    """The sweep's runs for one model: each of ``methods`` at every width (``fp`` once); ``overrides``:
    ``RunConfig`` fields (e.g. ``corpus``)."""
    return sweep_configs(methods, bits, tier, model=model, **overrides)


def quickstart_configs(tier: str, model: str | None = None, bits=None) -> list:
    """Notebook 00's runs: FP and RTN at every width, and RTN with every observer."""
    return [*configs(tier, model, bits, ("fp", "rtn")),
            *(c for obs in OBSERVERS for c in sweep_configs(("rtn",), bits, tier, model=model, observer=obs))]


NOTEBOOKS = (Notebook("00_quickstart", quickstart_configs),
             Notebook("01_misalignment", configs),
             Notebook("06_hyperparameters", lambda tier, model, bits: configs(tier, model, bits, ("qaft",))))


def records(tier: str, model: str, outputs, required: bool = True) -> list[dict]:
    """The sweep's cached records of ``model`` (not every record on disk: the quickstart's observer
    comparison, for one, leaves RTN records of other observers there). Raises ``NoRecordsError``
    with the command to run when there are none and ``required``."""
    found = read_records(configs(tier, model), outputs)
    if not found and required:
        raise NoRecordsError(f"no records for tier {tier} and model {model} under {outputs}/records; "
                             f"run `repro batch --tier {tier}` first")
    return found


def observer_records(tier: str, model: str, outputs) -> list[dict]:
    """RTN at every observer and width of the tier, where cached."""
    return read_records([make_config("rtn", b, tier, model=model, observer=obs)
                         for obs in OBSERVERS for b in load_tier(tier)["bits"]], outputs)


def fig1_table(records, seconds: bool = True) -> str:
    """Paper Fig. 1, one row per bit-width (high to low), FP and fine-tuned FP (FPFT) first: test NLL (nats/token) of RTN,
    GPTQ and QAFT; their mean layer MSE on test (squared activation units) with FP inputs (eq. 2)
    and with their own inputs; QAFT's lr0 and epoch (chosen on validation); with ``seconds``,
    GPTQ's and QAFT's method time (s; wall clock, so leave it out where output is compared); QAFT
    − GPTQ test NLL paired over the test windows with its bootstrap 95% interval (bold: excludes 0)."""
    t = by_method_bits(records)
    names = [m.upper() for m in QUANTIZERS]
    header = ["bits", *(f"{n} test NLL" for n in names),
              *(f"{n} MSE, {reading}" for reading, _ in MSE_READINGS for n in names),
              "QAFT lr0", "QAFT epoch", *(["GPTQ s", "QAFT s"] if seconds else []),
              "QAFT − GPTQ test NLL [95% CI]"]
    rows = []
    fp = t.get("fp", {}).get(None)
    if fp is not None:
        rows.append(["FP", *[nll_cell(fp["nll_test"])] * len(QUANTIZERS),
                     *(g_cell(fp.get(key)) for _, key in MSE_READINGS for _ in QUANTIZERS), *[DASH] * (5 if seconds else 3)])
    fpft = t.get("fpft", {}).get(None)
    if fpft is not None:  # QAFT's loop without the quantizer: its lr0, epoch and seconds in QAFT's columns
        epoch = chosen_epoch(fpft["info"])
        rows.append(["FPFT", *[nll_cell(fpft["nll_test"])] * len(QUANTIZERS),
                     *(g_cell(fpft.get(key)) for _, key in MSE_READINGS for _ in QUANTIZERS),
                     f"{fpft['info']['lr']:g}", DASH if epoch is None else epoch,
                     *([DASH, seconds_cell(fpft)] if seconds else []), DASH])
    for b in widths(t):
        recs = [t.get(m, {}).get(b) for m in QUANTIZERS]
        info = (recs[2] or {}).get("info") or {}
        epoch = chosen_epoch(info)
        rows.append([f"int{b}", *(nll_cell(r and r["nll_test"]) for r in recs),
                     *(g_cell(r and r.get(key)) for _, key in MSE_READINGS for r in recs),
                     f"{info['lr']:g}" if "lr" in info else DASH, DASH if epoch is None else epoch,
                     *([seconds_cell(recs[1]), seconds_cell(recs[2])] if seconds else []),
                     interval_cell(compare(recs[2], recs[1]) if recs[1] and recs[2] else None)])
    return markdown_table(header, rows) if rows else "No records yet."


def layer_share_table(records) -> str:
    """Paper Fig. 1, lower row, counted: per bit-width and layer-MSE reading (test split), in how
    many of the stack's linears GPTQ's layer MSE is below RTN's, QAFT's below RTN's, and GPTQ's
    below QAFT's. The paper: GPTQ always lowers layer MSE, QAFT keeps or raises it. Counts, not
    means: the mean over layers is dominated by the few layers with the largest activations."""
    table = by_method_bits(records)
    rows = []
    for b in widths(table):
        rtn, gptq, qaft = (table.get(m, {}).get(b) for m in QUANTIZERS)
        for reading, key in MSE_READINGS:
            key = key.removeprefix("mean_")

            def below(a, c):
                if a is None or c is None or a.get(key) is None or c.get(key) is None:
                    return DASH
                return f"{sum(a[key][n] < c[key][n] for n in c[key])}/{len(c[key])}"

            rows.append([f"int{b}", reading, below(gptq, rtn), below(qaft, rtn), below(gptq, qaft)])
    header = ["bits", "layer MSE inputs", "GPTQ < RTN", "QAFT < RTN", "GPTQ < QAFT"]
    return markdown_table(header, rows) if rows else "No RTN/GPTQ/QAFT records yet."


def qaft_epochs_table(records) -> str:
    """Paper Fig. 7: QAFT's test NLL (nats/token) after each epoch at the chosen lr0 (epoch 0 =
    RTN; **bold** = the epoch chosen on validation), next to GPTQ's test NLL, per bit-width."""
    t = by_method_bits(records)
    hists = {}
    for b, rec in t.get("qaft", {}).items():
        run = chosen_run(rec["info"]) or {}
        hist = {h["epoch"]: h.get("nll_test") for h in run.get("history", [])}
        hist.setdefault(0, (rec["info"].get("rtn") or {}).get("nll_test"))
        hists[b] = hist
    if not hists:
        return "No QAFT records yet."
    epochs = sorted({e for h in hists.values() for e in h})
    header = ["bits", *("test NLL, epoch 0 (RTN)" if e == 0 else f"epoch {e}" for e in epochs), "GPTQ test NLL"]
    rows = []
    for b in sorted(hists, reverse=True):
        chosen = chosen_epoch(t["qaft"][b]["info"])
        cells = [DASH if hists[b].get(e) is None else f"**{nll_cell(hists[b][e])}**" if e == chosen
                 else nll_cell(hists[b][e]) for e in epochs]
        gptq = t.get("gptq", {}).get(b)
        rows.append([f"int{b}", *cells, nll_cell(gptq and gptq["nll_test"])])
    return markdown_table(header, rows)


def lr_table(records) -> str:
    """Paper Fig. 6: QAFT's validation NLL (nats/token, best epoch) per initial LR lr0 and
    bit-width. lr0 and epoch are selected on validation; **bold** = the chosen lr0; † = no epoch
    of that lr0 beat epoch 0, so its best is RTN's NLL (training at that lr0 only made it worse)."""
    qaft = by_method_bits(records).get("qaft", {})
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
            text = nll_cell(run["best_nll_validation"]) + ("†" if run.get("best_epoch") == 0 else "")
            kept_rtn |= run.get("best_epoch") == 0
            cells[run["lr"]] = f"**{text}**" if math.isclose(run["lr"], info["lr"]) else text
        rows.append([f"int{b}", *(cells.get(lr, DASH) for lr in lrs)])
    note = "\n\n† no epoch beat epoch 0: the best is RTN's NLL (this lr0 only made it worse)." if kept_rtn else ""
    return markdown_table(header, rows) + note


def rtn_table(records) -> str:
    """FP and RTN per bit-width: validation NLL (nats/token), validation perplexity, test NLL,
    mean layer MSE on test (squared activation units) with FP inputs (eq. 2) and with own inputs."""
    t = by_method_bits(records)
    header = ["", "validation NLL", "validation ppl", "test NLL",
              *(f"mean layer MSE, {reading}" for reading, _ in MSE_READINGS)]
    recs = [("FP", t.get("fp", {}).get(None)), *((f"int{b}", t["rtn"][b]) for b in widths(t, ("rtn",)))]
    rows = [[label, nll_cell(r["nll_validation"]), g_cell(r.get("ppl_validation")), nll_cell(r["nll_test"]),
             *(g_cell(r.get(key)) for _, key in MSE_READINGS)] for label, r in recs if r is not None]
    return markdown_table(header, rows) if rows else "No FP/RTN records yet."


def observer_table(records) -> str:
    """RTN per scale observer (rows) and bit-width (columns): validation NLL (nats/token) with its
    change vs FP's validation NLL in %, and test NLL; **bold** = the lowest of each column."""
    fp = fp_record(records)
    rtn = {(r["config"]["observer"], r["config"]["bits"]): r for r in records if r["config"]["method"] == "rtn"}
    if not rtn:
        return "No RTN records yet."
    observers = list(dict.fromkeys(o for o, _ in rtn))
    bits = sorted({b for _, b in rtn}, reverse=True)
    columns = []
    for b in bits:
        recs = [rtn.get((o, b)) for o in observers]
        val = bold_min([r and r["nll_validation"] for r in recs])
        if fp is not None:
            val = [v if r is None else f"{v} ({100 * (r['nll_validation'] / fp['nll_validation'] - 1):+.1f}%)"
                   for v, r in zip(val, recs)]
        columns += [val, bold_min([r and r["nll_test"] for r in recs])]
    vs = " (vs FP)" if fp is not None else ""
    header = ["observer", *(h for b in bits for h in (f"int{b} validation NLL{vs}", f"int{b} test NLL"))]
    return markdown_table(header, [[o, *(col[i] for col in columns)] for i, o in enumerate(observers)])


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
    gptq = by_method_bits(records).get("gptq", {})
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
    return markdown_table(header, rows)


def damping_by_kind_table(records) -> str:
    """GPTQ's chosen damping λ by kind of linear (the name's last part: ``q_proj``, ``down_proj``
    ...), one row per bit-width and kind: how many layers chose each grid value. Looks for the
    pattern the paper did not find (App. C)."""
    gptq = by_method_bits(records).get("gptq", {})
    counts = defaultdict(lambda: defaultdict(int))
    for b, r in gptq.items():
        for name, layer in r["info"]["layers"].items():
            counts[(b, name.rsplit(".", 1)[-1])][DASH if layer["damping"] is None else f"{layer['damping']:g}"] += 1
    if not counts:
        return "No GPTQ records yet."
    grid = sorted({k for c in counts.values() for k in c}, key=lambda k: float("inf") if k == DASH else float(k))
    rows = [[f"int{b}", kind, *(counts[(b, kind)].get(k, "") for k in grid)]
            for b, kind in sorted(counts, key=lambda key: -key[0])]
    return markdown_table(["bits", "linear", *(f"λ {k}" for k in grid)], rows)


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
    rows = [[f"int{b}", *(nll_cell(by[b][h]["nll_test"]) if h in by[b] else DASH for h in holdouts),
             *(g_cell(by[b][h].get("mean_layer_mse_fp_inputs")) if h in by[b] else DASH for h in holdouts)]
            for b in sorted(by, reverse=True)]
    return markdown_table(header, rows)


def _winner(interval, a: str, b: str, a_lower: bool) -> str | None:
    """``a`` or ``b``, whichever is lower: by the interval of A − B when there is one (None when it
    holds 0), else by the plain values (``a_lower``; records without per-window or per-layer data)."""
    side = direction(interval, -1 if a_lower else 1)
    return None if side == 0 else a if side < 0 else b


def misalignment_summary(records, local: str = "gptq", global_: str = "qaft") -> str:
    """Markdown: per bit-width, which method has the lower test NLL (nats/token) and which the lower
    layer MSE (test split; with FP inputs, eq. 2, when recorded, and with own inputs), and whether
    the two winners are aligned. A winner needs a paired 95% interval that excludes 0
    (``repro.uncertainty``: over test windows for the NLL, over layers for the layer MSE); without
    one on either side the call is "undecided". Records without per-window NLL get the plain
    comparison, marked as having no interval."""
    table = by_method_bits(records)
    lines = []
    for b in sorted(set(table.get(local, {})) & set(table.get(global_, {})) - {None}, reverse=True):
        lo, gl = table[local][b], table[global_][b]
        nll_ci = compare(gl, lo)
        nll_winner = _winner(nll_ci, global_, local, gl["nll_test"] < lo["nll_test"])
        readings = []
        for reading, key in MSE_READINGS:
            if lo.get(key) is None or gl.get(key) is None:
                continue
            mse_ci = compare_layers(lo, gl, key.removeprefix("mean_"))
            mse_winner = _winner(mse_ci, local, global_, lo[key] < gl[key])
            call = "undecided" if not (mse_winner and nll_winner) else \
                "aligned" if mse_winner == nll_winner else "**misaligned**"
            per_layer = "" if mse_ci is None else f"; {local.upper()} − {global_.upper()} per layer {mse_ci}"
            readings.append(f"{reading}: {f'{mse_winner.upper()} lower' if mse_winner else 'not distinguishable'} "
                            f"({lo[key]:.4g} {local.upper()} vs {gl[key]:.4g} {global_.upper()}{per_layer}), {call}")
        winner = f"{nll_winner.upper()} has the lower test NLL" if nll_winner else "Test NLL not distinguishable"
        lines.append(
            f"- int{b}: {winner} ({lo['nll_test']:.3f} {local.upper()} vs {gl['nll_test']:.3f} {global_.upper()}, "
            f"Δ {gl['nll_test'] - lo['nll_test']:+.3f}; {verdict(nll_ci, global_.upper(), local.upper())}). "
            f"Mean layer MSE (test) — {'; '.join(readings) or 'not recorded'}.")
    if not lines:
        return f"No bit-width has both {local} and {global_} records yet."
    return "\n".join(lines)


def fine_tuning_summary(records) -> str:
    """Markdown: how much of QAFT's result is fine-tuning rather than quantization repair. FPFT is
    QAFT's loop with the quantizer off (same data, steps, lr0 grid, selection): FP − FPFT is what
    fine-tuning on the calibration corpus does to the FP model; per width, QAFT − FPFT is the
    quantization damage left after fine-tuning, GPTQ − QAFT QAFT's lead, and (GPTQ − FP) − (QAFT −
    FPFT) that lead with each method measured from its own reference (GPTQ targets the FP model,
    QAFT the data): what survives once domain adaptation is accounted for. Test NLL (nats/token),
    each with its paired bootstrap 95% interval over test windows (``repro.uncertainty``). FPFT runs
    at one seed, so every difference here is between the runs of that seed, the seed study's
    replicates set aside (they would make the lead an average over seeds and its share of the net
    gap compare unlike quantities); the seed-combined intervals are the seeds table's."""
    t = {m: {b: {k: v for k, v in r.items() if k != "seed_windows"} for b, r in per_bits.items()}
         for m, per_bits in by_method_bits(records).items()}
    fp, fpft = t.get("fp", {}).get(None), t.get("fpft", {}).get(None)
    if fp is None or fpft is None:
        return "No FP and FPFT records yet."
    adapted = compare(fp, fpft)
    lines = [f"- Fine-tuning the FP model (FPFT, lr0 {fpft['info']['lr']:g}, epoch {chosen_epoch(fpft['info'])}): "
             f"test NLL {fp['nll_test']:.3f} → {fpft['nll_test']:.3f}; {verdict(adapted, 'FP', 'FPFT')}."]
    for b in sorted(set(t.get("qaft", {})) & set(t.get("gptq", {})) - {None}, reverse=True):
        gptq, qaft = t["gptq"][b], t["qaft"][b]
        lead, net = compare(gptq, qaft), compare_gaps(gptq, fp, qaft, fpft)
        share = "" if lead is None or net is None or lead.mean <= 0 else \
            f" ({100 * net.mean / lead.mean:.0f}% of the lead)"
        lines.append(f"- int{b}: QAFT − FPFT {interval_cell(compare(qaft, fpft))} (damage left after fine-tuning); "
                     f"GPTQ − QAFT {interval_cell(lead)}; net of domain adaptation, (GPTQ − FP) − (QAFT − FPFT) "
                     f"{interval_cell(net)}{share}: "
                     f"{'QAFT still ahead' if net and net.low > 0 else 'GPTQ ahead' if net and net.high < 0 else 'not distinguishable'}.")
    return "\n".join(lines)


def fallback_summary(records) -> str:
    """One line per GPTQ record whose layers fell back to RTN (Cholesky failed at every damping
    value), or one line saying none did: the record's warning, shown where people read results."""
    lines = [f"**Warning** — GPTQ {r['config']['model']} int{r['config']['bits']}: {r['info']['warning']}"
             for r in records if r["config"]["method"] == "gptq" and (r.get("info") or {}).get("warning")]
    return "\n".join(lines) or "No GPTQ layer fell back to RTN: every layer solved at a damping of the grid."


def first_epoch_summary(records) -> str:
    """Markdown: does one epoch of QAFT already beat GPTQ (test NLL), per bit-width?"""
    table = by_method_bits(records)
    lines = []
    for b in sorted(set(table.get("qaft", {})) & set(table.get("gptq", {})), reverse=True):
        info = table["qaft"][b]["info"]
        run = chosen_run(info)
        after_one = next((h["nll_test"] for h in run["history"] if h["epoch"] == 1), None) if run else None
        if after_one is None:
            continue
        gptq = table["gptq"][b]["nll_test"]
        verdict = "beats" if after_one < gptq else "does not beat"
        lines.append(f"- int{b}: after 1 epoch QAFT test NLL {after_one:.3f} {verdict} GPTQ's {gptq:.3f} "
                     f"(Δ {after_one - gptq:+.4f}).")
    return "\n".join(lines) or "No QAFT/GPTQ pairs yet."


def lr_summary(records) -> str:
    """Markdown: the best initial LR per bit-width and whether lower bits prefer higher LRs."""
    qaft = by_method_bits(records).get("qaft", {})
    if not qaft:
        return "No QAFT records yet."
    best = {b: qaft[b]["info"]["lr"] for b in sorted(qaft, reverse=True)}
    lines = [f"- int{b}: best initial LR {lr:g}" for b, lr in best.items()]
    lrs = list(best.values())  # from high to low bits
    monotone = all(a <= b for a, b in zip(lrs, lrs[1:]))
    lines.append(f"\nLower bit-widths {'do' if monotone else 'do not all'} prefer equal or higher learning "
                 f"rates here (paper App. A: int3/int2 prefer high LRs).")
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
    "fpft": (fine_tuning_summary, ("fp", "fpft", "gptq", "qaft")),
}


def _setting_cell(value) -> str:
    """A tier setting, short: None -> dash, long lists -> first, …, last (n)."""
    if value is None:
        return DASH
    if isinstance(value, list) and len(value) > 4:
        return f"{_setting_cell(value[0])}, …, {_setting_cell(value[-1])} ({len(value)})"
    if isinstance(value, list):
        return ", ".join(map(_setting_cell, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_setting_cell(v)}" for k, v in value.items())
    return f"{value:g}" if isinstance(value, float) else str(value)


def deviations_table(tier: str) -> str:
    """Every setting of the paper's protocol where ``tier`` differs from the paper tier, with the
    paper's value, the tier's and why (``repro.config.deviations``; reasons from the tier's YAML,
    one per setting or section)."""
    found, reasons = deviations(tier), deviation_reasons(tier)
    rows = []
    for reason_key, why in reasons.items():
        keys = [k for k in found if k == reason_key or k.startswith(reason_key + ".")]
        name = lambda k: k[len(reason_key) + 1:] if k != reason_key else ""  # noqa: E731 (within a section)
        paper, ours = ("; ".join(filter(None, (f"{name(k)} {_setting_cell(found[k][i])}".strip() for k in keys)))
                       for i in (0, 1))
        rows.append([f"`{reason_key}`", paper, ours, why])
    return markdown_table(["setting", "paper", tier, "why"], rows)


def paper_memory_table(processes: int = 8) -> str:
    """Memory per GPU at Llama-2-7B (transformers' ``LlamaConfig()`` defaults are its widths; the paper
    tier's 4096 tokens x 128 calibration sequences, fp16 weights as loaded): GPTQ (``gptq.solve_memory``
    of a block beside the model; activations wait on CPU), block PTQ's trained state for one block window
    (16 B per weight) beside the model, and QAFT (``qaft.training_memory``) on 1 GPU and on ``processes``
    under DDP (replicated) and sharded. GB = 1e9 bytes; activations of training left out (with gradient
    checkpointing about one block's: README)."""
    from transformers import LlamaConfig

    from repro.methods.gptq import DAMPING_GRID, solve_memory
    from repro.methods.qaft import training_memory

    cfg = LlamaConfig()
    h, m = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}
    readers = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    block = sum(a * b for a, b in shapes.values())
    stack = cfg.num_hidden_layers * block
    other = 2 * cfg.vocab_size * h
    model_fp16 = 2 * (stack + other)
    gptq = solve_memory(shapes, readers, 0, h, len(DAMPING_GRID), len(DAMPING_GRID))["total"]
    rows = [["GPTQ (one block solved at a time)", 1, model_fp16 + gptq],
            ["block PTQ, one-block window (trained state)", 1, model_fp16 + 16 * block],
            # QAFT loads float32 (its latent weights train), so the frozen rest is float32 too
            ["QAFT", 1, training_memory(stack, other, other_bytes=4)["total"]],
            ["QAFT, DDP (replicated)", processes, training_memory(stack, other, processes, other_bytes=4)["total"]],
            ["QAFT, sharded (`sharding: fsdp`)", processes,
             training_memory(stack, other, processes, True, other_bytes=4)["total"]]]
    return markdown_table(["method", "GPUs", "GB per GPU"], [[a, b, f"{c / 1e9:.1f}"] for a, b, c in rows])


def precision_table(pairs) -> str:
    """QAFT trained under bf16 autocast against fp32, everything else equal: ``pairs`` is a list of
    ``(bf16 record, fp32 record)``. The choice is made on validation: validation NLL of each, the
    relative difference and whether bf16 is no more than 1% worse; then the test NLLs (reported,
    never used to choose: relative, and bf16 − fp32 with its paired 95% interval over the test windows)
    and the seconds per training step."""
    rows = []
    for bf16, fp32 in pairs:
        c = bf16["config"]
        rel = (bf16["nll_validation"] - fp32["nll_validation"]) / fp32["nll_validation"]
        test = (bf16["nll_test"] - fp32["nll_test"]) / fp32["nll_test"]
        rows.append([c["model"], f"int{c['bits']}", nll_cell(bf16["nll_validation"]), nll_cell(fp32["nll_validation"]),
                     f"{100 * rel:+.2f}%", "yes" if rel <= 0.01 else "**no**", f"{100 * test:+.2f}%",
                     interval_cell(compare(bf16, fp32)), f"{bf16['info']['step_s']:.2f}", f"{fp32['info']['step_s']:.2f}"])
    return markdown_table(["model", "bits", "validation NLL, bf16", "validation NLL, fp32", "bf16 vs fp32",
                           "bf16 at most 1% worse", "test NLL, bf16 vs fp32", "test NLL bf16 − fp32 (95% CI)",
                           "s/step bf16", "s/step fp32"], rows)


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``{marker name: markdown}``, each table followed by its provenance line: the ``SECTIONS`` of
    the default model (``observers`` with RTN at every observer; ``damping-scoring`` with GPTQ's
    in-sample damping A/B, where run), ``fig1-MODEL``, ``fpft-MODEL`` and ``observers-MODEL`` of the tier's other
    models that have records, and ``qaft-precision`` (QAFT under bf16 autocast against fp32,
    where both were run)."""
    models = tier_models(tier, model)
    # seed replicates where the seed study ran: its verdicts' intervals then hold the seed-to-seed spread too
    default, found = models[0], seeds.attach(records(tier, models[0], outputs), tier, outputs)
    observed = observer_records(tier, default, outputs)
    in_sample = read_records([make_config("gptq", b, tier, model=default, options={"holdout": 0})
                              for b in load_tier(tier)["bits"]], outputs)
    fp = [r for r in found if r["config"]["method"] == "fp"]
    result = {}
    for name, (table, methods) in SECTIONS.items():
        pool = {"observers": [*fp, *observed], "damping-scoring": [*found, *in_sample]}.get(name, found)
        used = [r for r in pool if r["config"]["method"] in methods]
        result[name] = f"{table(used)}\n\n{provenance(used, tier, command)}"
    others = {m: seeds.attach(records(tier, m, outputs, required=False), tier, outputs) for m in models[1:]}
    others = {m: rs for m, rs in others.items() if rs}
    for other, sweep in others.items():
        model_fp = [r for r in sweep if r["config"]["method"] == "fp"]
        for name, used in (("fig1", sweep), ("fpft", sweep),
                           ("observers", [*model_fp, *observer_records(tier, other, outputs)])):
            result[f"{name}-{other}"] = f"{SECTIONS[name][0](used)}\n\n{provenance(used, tier, command)}"
    pairs = []  # QAFT trained under bf16 autocast vs fp32, everything else equal (the A/B, where run)
    for m in [default, *others]:
        for b in load_tier(tier)["bits"]:
            ab = read_records([make_config("qaft", b, tier, model=m, options={"mixed_precision": mp})
                               for mp in ("bf16", "no")], outputs)
            if len(ab) == 2:
                pairs.append(tuple(ab))
    if pairs:
        result["qaft-precision"] = (f"{precision_table(pairs)}\n\n"
                                    f"{provenance([r for p in pairs for r in p], tier, command)}")
    result["gpu-memory"] = (f"{paper_memory_table()}\n\n*Computed by `repro.studies.sweep.paper_memory_table` "
                            f"(`repro report`) from the functions named in its docstring.*")
    if tier in ("ci", "cpu") and load_tier(tier).get("paper_deviations"):  # (a derived tier inherits them)
        result["paper-deviations"] = (f"{deviations_table(tier)}\n\n*Generated from `{tier_path(tier).name}` and "
                                      f"`paper.yaml` by `repro report --tier {tier}`; {DASH}: not set (`seq_len`: the "
                                      f"model's maximum length, `n_eval`: the whole split, `threads`: torch's default).*")
    return result


def record_figures(records, end: str = "") -> dict:
    """``{name + end: draw()}`` of every figure ``records`` (one model's sweep) support: NLL against
    width, Fig. 1's panels and scatter, GPTQ's damping, QAFT's epochs and LR sweep, the Pareto front."""
    methods = {r["config"]["method"] for r in records}
    chosen = {"nll_vs_bits": lambda: plots.nll_vs_bits(records, metric="nll_test")}
    if methods & {"gptq", "qaft"}:
        chosen["misalignment"] = lambda: plots.misalignment(records)
    if {"gptq", "qaft"} <= methods:
        chosen["misalignment_scatter"] = lambda: plots.misalignment_scatter(records)
    if "gptq" in methods:
        chosen["damping"] = lambda: plots.damping_plot(records)
    if "qaft" in methods:
        chosen["qaft_epochs"] = lambda: plots.qaft_epochs(records)
        chosen["lr_sweep"] = lambda: plots.lr_sweep(records)
    if any(p["method"] != "fp" for p in pareto_points(records)):
        chosen["pareto"] = lambda: plots.pareto(records)
    return {f"{name}{end}": draw for name, draw in chosen.items()}


def figures(tier: str, outputs, model: str | None = None) -> dict:
    """``record_figures`` of each model with records (the default model's required)."""
    models = tier_models(tier, model)
    drawn = {}
    for m in models:
        found = records(tier, m, outputs, required=m == models[0])
        drawn.update(record_figures(found, suffix(tier, m, models[0])) if found else {})
    return drawn
