"""The datasets study (notebook 05, paper Fig. 4): is the misalignment a property of the method or
of the text? FP, RTN, GPTQ and QAFT on each corpus of the tier's ``datasets`` section, and the
loss landscape's basin radius per corpus.
"""
from __future__ import annotations

from collections import defaultdict

from repro import plots
from repro.config import bit_widths, load_tier
from repro.methods import QUANTIZERS
from repro.report import DASH, markdown_table, nll_cell, provenance
from repro.studies import Notebook, landscape, read_records, suffix, sweep, tier_models
from repro.uncertainty import compare, direction, interval_cell, verdict


def corpus_configs(tier: str, model: str | None = None, bits=None, corpora=None) -> list:
    """FP, RTN, GPTQ and QAFT at ``bits`` on each of ``corpora`` (None: the ``datasets`` section's
    widths and corpora): the runs notebook 05's tables read."""
    section = load_tier(tier).get("datasets") or {}
    return [c for corpus in (section.get("corpora", []) if corpora is None else corpora)
            for c in sweep.configs(tier, model, section.get("bits") if bits is None else bits, ("fp", *QUANTIZERS),
                                   corpus=corpus)]


def configs(tier: str, model: str | None = None, bits=None) -> list:
    """Notebook 05's runs: ``corpus_configs``, and RTN at every width of the tier on each corpus (the
    landscape compares each with a random step)."""
    section = load_tier(tier).get("datasets") or {}
    return [*corpus_configs(tier, model, bits),
            *(c for corpus in section.get("corpora", []) for c in sweep.configs(tier, model, bits, ("rtn",), corpus=corpus))]


def precompute(tier: str, model: str, bits, outputs, take) -> None:
    """Each corpus's landscape points, the ones notebook 05 draws (same widths and settings), shared
    by ``repro batch``'s worker processes (``take``, as notebook 03's): the notebook then reads them."""
    section = load_tier(tier).get("datasets") or {}
    for corpus in section.get("corpora", []):
        landscape.landscape(model, bit_widths(bits, section.get("bits")), tier, outputs, corpus=corpus, take=take,
                            **section.get("landscape", {}))


NOTEBOOKS = (Notebook("05_datasets", configs, section="datasets", precompute=precompute),)


def _order_sign(lower: dict, higher: dict) -> str:
    """"≈" when two records' test NLLs are not distinguishable (paired interval holds 0), else "<"."""
    interval = compare(lower, higher)
    return "≈" if interval is not None and direction(interval) == 0 else "<"


def corpora_table(records) -> str:
    """Markdown: test NLL of FP, RTN, GPTQ and QAFT per corpus and width, GPTQ − QAFT with its paired
    95% interval over test windows, and the order of the three methods (the paper's Fig. 4 question:
    does QAFT < GPTQ < RTN hold on every corpus?): "<" where the interval of the neighbours' difference
    excludes 0, "≈" where they are not distinguishable (no per-window NLL: by test NLL alone)."""
    cells = defaultdict(dict)
    fp = {}
    for r in records:
        c = r["config"]
        if c["method"] == "fp":
            fp[c["corpus"]] = r["nll_test"]
        elif c["method"] in QUANTIZERS:
            cells[(c["corpus"], c["bits"])][c["method"]] = r
    rows = []
    for (corpus, bits), by in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if set(QUANTIZERS) <= set(by):
            ranked = sorted(QUANTIZERS, key=lambda m: by[m]["nll_test"])
            order = ranked[0].upper() + "".join(f" {_order_sign(by[low], by[high])} {high.upper()}"
                                                for low, high in zip(ranked, ranked[1:]))
            gap = compare(by["gptq"], by["qaft"])
            rows.append([corpus, f"int{bits}", nll_cell(fp.get(corpus)) if corpus in fp else DASH,
                         *(nll_cell(by[m]["nll_test"]) for m in QUANTIZERS),
                         interval_cell(gap) if gap is not None else f"{by['gptq']['nll_test'] - by['qaft']['nll_test']:+.3f}", order])
    return markdown_table(["corpus", "bits", "FP", "RTN", "GPTQ", "QAFT", "GPTQ − QAFT [95% CI]", "order (test NLL)"],
                          rows) if rows else "No complete (RTN, GPTQ, QAFT) sets of records yet."


def corpora_summary(records, gap: float = 0.05) -> str:
    """Markdown, computed: per corpus, at which widths QAFT beats GPTQ by more than ``gap`` nats (the
    misalignment) with a paired 95% interval over test windows that excludes 0 (records without
    per-window NLL: by ``gap`` alone), and whether that holds on every corpus; then GPTQ against RTN
    per corpus and width (does the local objective help at all on that text?)."""
    by = defaultdict(dict)
    for r in records:
        c = r["config"]
        if c["method"] in QUANTIZERS:
            by[(c["corpus"], c["bits"])][c["method"]] = r
    cells = sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1]))  # by corpus, widest first
    verdicts = defaultdict(list)
    for (corpus, bits), v in cells:
        if {"gptq", "qaft"} <= set(v):
            iv = compare(v["gptq"], v["qaft"])
            d = v["gptq"]["nll_test"] - v["qaft"]["nll_test"]
            verdicts[corpus].append((bits, d, iv, d > gap and (iv is None or iv.low > 0)))
    if not verdicts:
        return "No GPTQ/QAFT pairs yet."

    def cell(bits, d, iv):
        return f"int{bits} ({d:+.3f}" + ("" if iv is None else f" [{iv.low:+.3f}, {iv.high:+.3f}]") + ")"

    lines = []
    for corpus, rows in verdicts.items():
        mis = [cell(b, d, iv) for b, d, iv, holds in rows if holds]
        not_mis = [cell(b, d, iv) for b, d, iv, holds in rows if not holds]
        lines.append(f"- {corpus}: QAFT beats GPTQ by more than {gap} nats at {', '.join(mis) or 'no width'}"
                     + (f"; not at {', '.join(not_mis)}" if not_mis else "") + ".")
    everywhere = all(holds for rows in verdicts.values() for *_, holds in rows)
    lines.append("The misalignment holds on every corpus at every width measured." if everywhere else
                 "The misalignment does **not** hold on every corpus and width measured (see above).")
    against_rtn = [(corpus, bits, compare(v["gptq"], v["rtn"])) for (corpus, bits), v in cells if {"gptq", "rtn"} <= set(v)]
    lines += [f"- {corpus}, int{bits}: {verdict(iv, 'GPTQ', 'RTN')}." for corpus, bits, iv in against_rtn if iv is not None]
    return "\n".join(lines)


def cached(tier: str, outputs) -> dict:
    """``{model: (records, landscapes)}`` of the tier's ``datasets`` models with records on one of its
    corpora, cached only: FP/RTN/GPTQ/QAFT on each corpus (and the default corpus) and the complete
    landscapes."""
    section = load_tier(tier).get("datasets") or {}
    corpora = section.get("corpora", [])
    found = {}
    for m in section.get("models") or []:
        chosen = [c for corpus in [*corpora, None]
                  for c in sweep.configs(tier, m, section.get("bits"), ("fp", *QUANTIZERS), corpus=corpus)]
        records = read_records(chosen, outputs)
        results = [landscape.landscape(m, section.get("bits"), tier, outputs, cached_only=True, corpus=corpus,
                                       **section.get("landscape", {})) for corpus in corpora]
        if any(r["config"]["corpus"] in corpora for r in records):
            found[m] = (records, [r for r in results if r is not None])
    return found


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``datasets-MODEL``: the per-corpus table and verdict, each corpus's basin radius and its test."""
    result = {}
    for m, (records, results) in cached(tier, outputs).items():
        parts = [corpora_table(records), corpora_summary(records)]
        parts += [f"{r['corpus']}:\n\n{landscape.basin_table(r)}" for r in results]
        if results:
            parts.append(landscape.radius_summary(landscape.misalignment_vs_radius(
                results, outputs, compute=False, bits=(load_tier(tier).get("datasets") or {}).get("bits"))))
        result[f"datasets-{m}"] = "\n\n".join(parts + [provenance(records, tier, command)])
    return result


def figures(tier: str, outputs, model: str | None = None) -> dict:
    """Per model: GPTQ against QAFT per corpus (Fig. 1's scatter by corpus) and each corpus's Fig. 3."""
    default = tier_models(tier, model)[0]
    drawn = {}
    for m, (records, results) in cached(tier, outputs).items():
        end = suffix(tier, m, default)
        drawn[f"corpora_misalignment{end}"] = lambda records=records: plots.misalignment_scatter(records, column="corpus")
        drawn.update({f"landscape_{r['corpus']}_int{b}{end}": (lambda r=r, b=b: plots.landscape(r, b))
                      for r in results for b in r["bits"]})
    return drawn
