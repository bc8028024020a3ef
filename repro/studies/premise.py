"""The paper's premise, checked (notebook 07, with the seed study): is the pretrained ``w`` a minimum of
the loss the methods are judged on, and does QAFT's lead over GPTQ hold when both start from one?

The landscape argument (paper §IV) takes ``w = argmin`` of the training loss. On a corpus the model was
not trained on it is not: FPFT (QAFT's loop with the quantizer off, same data, steps and lr0 grid)
lowers the loss, and part of QAFT's lead over GPTQ is that adaptation. This study measures

* the gradient norm of the calibration (training) loss at ``w`` and at ``w_FPFT``
  (``repro.evaluate.gradient_norm``; 0 at a minimum), and its first-order size ``||g|| ||w||``;
* RTN, GPTQ and QAFT started from ``w_FPFT`` (``RunConfig.start = "fpft"``) next to the same methods
  started from ``w``, with QAFT − GPTQ at each start (paired interval over windows).

Settings: the tier's ``premise`` section (``models``, ``bits``, ``methods``); a tier without one runs
nothing. The gradient norms are cached as a small JSON beside the records (``outputs/records/premise``).
"""
from __future__ import annotations

from pathlib import Path

from repro import evaluate, runs, store
from repro.config import load_tier, make_config
from repro.report import DASH, g_cell, markdown_table, nll_cell, provenance
from repro.studies import read_records
from repro.uncertainty import compare, interval_cell

SECTION = "premise"
NOTEBOOKS = ()  # its runs are notebook 07's (repro.studies.seeds), its table is shown there
VERSION = 1  # of a cached gradient-norm file


def _section(tier: str) -> dict | None:
    return load_tier(tier).get(SECTION)


def configs(tier: str, model: str | None = None, bits=None) -> list:
    """The study's runs for one model: FP, FPFT (its weights kept: the start), and each of the section's
    methods at its widths from ``w`` and from ``w_FPFT``; none when the tier has no ``premise`` section
    or ``model`` is not in it."""
    section = _section(tier)
    if not section or (model and model not in section.get("models", [])):
        return []
    model = model or section["models"][0]
    widths = section.get("bits", [4]) if bits is None else bits
    fp = make_config("fp", None, tier, model=model)
    return [fp, make_config("fpft", None, tier, model=model, save_weights=True),
            *(make_config(m, b, tier, model=model, start=s) for s in ("fp", "fpft")
              for m in section.get("methods", ["rtn", "gptq", "qaft"]) for b in widths)]


def _norms_path(config, outputs) -> Path:
    return Path(outputs) / "records" / SECTION / f"{config.model.replace('/', '--')}-{config.key()}.json"


def gradient_norms(tier: str, model: str, outputs, compute: bool = True) -> dict | None:
    """``{"fp": gradient_norm at w, "fpft": at w_FPFT, "sequences"}`` of the calibration loss (the data
    both fine-tunings fit), computed (FPFT's weights kept first, when missing) or read from the cache;
    ``compute=False``: None unless cached."""
    fpft = make_config("fpft", None, tier, model=model, save_weights=True)
    path = _norms_path(fpft, outputs)
    cached = store.read_json(path, what="gradient norms")
    if (cached and cached.get("version") == VERSION) or not compute:
        return cached
    start = runs.load_weights(fpft, outputs)
    bench = runs.workbench(fpft)
    with runs.pinned_threads(fpft.threads):
        found = {"fp": evaluate.gradient_norm(bench.model, bench.data.calibration, fpft.batch_size, desc="gradient at w")}
        from repro.models import restore

        restore(bench.model, start)
        found["fpft"] = evaluate.gradient_norm(bench.model, bench.data.calibration, fpft.batch_size,
                                               desc="gradient at w_FPFT")
        restore(bench.model, bench.fp_weights)
    result = {**found, "sequences": int(bench.data.calibration.shape[0]), "fpft_key": fpft.key(),
              "version": VERSION, "code": runs.code_hash(tier)}
    store.write_json_atomic(path, result)
    return result


def table(records, norms: dict | None) -> str:
    """Per method and width: test NLL started from ``w`` and from ``w_FPFT``; QAFT − GPTQ at each start
    with its paired 95% interval; then the gradient norms at the two starts."""
    by = {(r["config"]["method"], r["config"]["bits"], r["config"].get("start", "fp")): r for r in records}
    widths = sorted({b for (_, b, _) in by if b is not None}, reverse=True)
    methods = [m for m in ("rtn", "gptq", "qaft") if any(k[0] == m for k in by)]
    rows = []
    for b in widths:
        for m in methods:
            rows.append([f"int{b}", m.upper(), *(nll_cell(by[(m, b, s)]["nll_test"]) if (m, b, s) in by else DASH
                                                  for s in ("fp", "fpft"))])
        gaps = [interval_cell(compare(by[("qaft", b, s)], by[("gptq", b, s)]))
                if ("qaft", b, s) in by and ("gptq", b, s) in by else DASH for s in ("fp", "fpft")]
        rows.append([f"int{b}", "QAFT − GPTQ [95% CI]", *gaps])
    for m, label in (("fp", "FP"), ("fpft", "FPFT")):
        if (m, None, "fp") in by:
            rows.insert(0, ["—", label, nll_cell(by[(m, None, "fp")]["nll_test"]), DASH])
    text = markdown_table(["bits", "method", "test NLL from w (FP)", "from w_FPFT"], rows) if rows else ""
    if norms:
        text += ("\n\n" if text else "") + markdown_table(
            ["start", "‖∇L‖ on calibration", "‖w‖", "‖∇L‖·‖w‖ (nats/token, first order)"],
            [[name, g_cell(norms[key]["norm"]), g_cell(norms[key]["weight_norm"]), g_cell(norms[key]["relative"])]
             for key, name in (("fp", "w (FP)"), ("fpft", "w_FPFT"))])
        ratio = norms["fp"]["norm"] / norms["fpft"]["norm"] if norms["fpft"]["norm"] else float("inf")
        text += (f"\n\nThe calibration loss's gradient norm at w is {ratio:.1f}x its norm at w_FPFT "
                 f"({norms['sequences']} sequences, the data both fine-tunings fit).")
    return text


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``premise-MODEL`` for each model of the section with cached records."""
    section = _section(tier)
    result = {}
    for m in ([model] if model else (section or {}).get("models", [])):
        found = read_records(configs(tier, m), outputs)
        if any(r["config"].get("start") == "fpft" for r in found):
            norms = gradient_norms(tier, m, outputs, compute=False)
            result[f"{SECTION}-{m}"] = f"{table(found, norms)}\n\n{provenance(found, tier, command)}"
    return result


def figures(tier: str, outputs, model: str | None = None) -> dict:
    return {}
