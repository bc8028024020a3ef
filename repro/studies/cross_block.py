"""The cross-block study (notebook 04; Shabanovi et al.): one block at a time (block PTQ), several
jointly (MB-PTQ) and a block tuned for a downstream error (LA-PTQ), placed on the locality spectrum
between GPTQ (one linear) and QAFT (the whole network); how block-wise time grows with the window,
its memory, and the sweep that chose the block-wise defaults.
"""
from __future__ import annotations

from collections import defaultdict

from repro import plots
from repro.analysis import (CONTROLS, blockwise_bits, growth_law, locality, median_layer_mse, method_label, sees,
                            spectrum_records, training_budget, window_times)
from repro.config import bit_widths, load_tier, make_config
from repro.methods import QUANTIZERS
from repro.methods.blockwise import DEFAULTS
from repro.report import DASH, bold_min, g_cell, markdown_table, nll_cell, provenance, seconds_cell
from repro.studies import Notebook, read_records, suffix, sweep, tier_models
from repro.uncertainty import compare, direction

def spectrum_table(records, bits: int, model: str | None = None, seconds: bool = True) -> str:
    """Markdown: the locality spectrum at ``bits``: per method, what its objective sees, test NLL,
    the median layer MSE over the stack's layers in both readings (``median_layer_mse``), the mean
    block-output MSE (test split, each model propagating its own activations; squared activation
    units), its training budget (``training_budget``: optimizer steps, sequences per weight) and,
    with ``seconds``, the method's wall time."""
    rows = spectrum_records(records, bits, model)
    if not rows:
        return f"No int{bits} records yet."
    nlls = bold_min([r["nll_test"] for r in rows])
    header = ["method", "objective sees", "test NLL", "median layer MSE, FP inputs", "median layer MSE, own inputs",
              "block-output MSE", "optimizer steps", "sequences per weight"] + (["method s"] if seconds else [])
    budgets = [training_budget(r) or (DASH, DASH) for r in rows]
    return markdown_table(header, [
        [method_label(r), sees(r), nll, g_cell(median_layer_mse(r, "layer_mse_fp_inputs")),
         g_cell(median_layer_mse(r, "layer_mse")), g_cell(r.get("mean_block_output_mse")),
         *(f"{n:g}" if n != DASH else n for n in budget)] + ([seconds_cell(r)] if seconds else [])
        for r, nll, budget in zip(rows, nlls, budgets)])


def cross_block_summary(records) -> str:
    """Markdown, computed: per (model, bits) how MB-PTQ and LA-PTQ compare with block PTQ (test NLL;
    "helps"/"hurts" only when the paired 95% interval over test windows excludes 0, the interval in
    brackets; records without per-window NLL fall back to a 1% rule), then QAFT (and its controls)
    against block PTQ the same way ("lower"/"higher"),
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
                if r["config"]["method"] in ("blockwise", "qaft") and name != "block PTQ":
                    d, iv = r["nll_test"] - base["nll_test"], compare(r, base)
                    better, worse = ("helps", "hurts") if r["config"]["method"] == "blockwise" else ("lower", "higher")
                    side = direction(iv, d, 0.01 * base["nll_test"])  # without per-window NLL: the 1% rule
                    verdict = better if side < 0 else worse if side > 0 else \
                        "not distinguishable" if iv is not None else "no effect (within 1%)"
                    interval = "" if iv is None else f" [{iv.low:+.3f}, {iv.high:+.3f}]"
                    parts.append(f"{name} {r['nll_test']:.3f} (Δ {d:+.3f}{interval}: {verdict})")
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
    return markdown_table(["variant", "model", "window params", "weights MB", "Adam MB", "autograd saved MB",
                      "look-ahead MB", "predicted peak MB", "CUDA peak MB"], rows) if rows else "No block-wise records yet."


# Block-wise variants outside the main job that the README reports where their records exist: the equal
# optimizer steps per block control for MB-PTQ m=2 (`repro run --method blockwise --bits 4 --option window=2
# --option steps_per=block`), too slow for the cpu tier's budget (the paper tier runs it).
CROSS_BLOCK_CONTROLS = [{"window": 2, "steps_per": "block"}]
# QAFT at the block-wise methods' budget per block (``repro.analysis.CONTROLS``), where its record exists.
QAFT_CONTROLS = [sets for method, sets, _ in CONTROLS if method == "qaft"]


# The sweep that chose the cpu tier's block-wise defaults (block PTQ, SmolLM2, int4): each entry is
# `repro run --method blockwise --bits 4 --option KEY=VALUE ...` in fp32, beside the tier's default run
# (``_sweep_configs`` adds it).
BLOCKWISE_SWEEP_BITS = 4


BLOCKWISE_SWEEP = [{"window": 1, "steps": steps, "lr": lr, "mixed_precision": "no"}
                   for steps, lr in ((32, 1e-4), (32, 3e-4), (32, 1e-3), (32, 3e-3), (16, 1e-3))]
# Block PTQ's learning rate at the tier's training precision, per model (Gemma 3: `repro run --method
# blockwise --bits 4 --model gemma3-270m --option window=1 --option lr=LR`); the one at the tier's lr is
# the tier's default run (the same record).
BLOCKWISE_LR = [{"window": 1, "lr": lr} for lr in (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)]


def blockwise_sweep_table(records) -> str:
    """The sweep that chose the block-wise defaults: per variant, bits, training precision (fp32
    first), steps and lr, the validation NLL (the selection; best in bold), test NLL and seconds."""
    opts = {id(r): {**DEFAULTS, **r["config"]["options"]} for r in records}
    rows = sorted((r for r in records if r["config"]["method"] == "blockwise"),
                  key=lambda r: (locality(r), -r["config"]["bits"], opts[id(r)]["mixed_precision"] != "no",
                                 opts[id(r)]["steps"], opts[id(r)]["lr"]))
    if not rows:
        return "No block-wise sweep records."
    vals = bold_min([r["nll_validation"] for r in rows])
    return markdown_table(["variant", "bits", "steps per window", "lr", "training precision", "validation NLL",
                      "test NLL", "method s"],
                     [[method_label(r), f"int{r['config']['bits']}", opts[id(r)]["steps"], f"{opts[id(r)]['lr']:g}",
                       "fp32" if opts[id(r)]["mixed_precision"] == "no" else "bf16", v,
                       nll_cell(r["nll_test"]), seconds_cell(r)] for r, v in zip(rows, vals)])


def configs(tier: str = "cpu", model: str | None = None, bits=None, variants=None) -> list:
    """The runs of the cross-block study and the locality spectrum for one model: FP, RTN, GPTQ and
    QAFT, and the block-wise ``variants`` (option dicts of ``blockwise``: ``window``, ``lookahead``
    ...) at ``bits`` (int or list); ``None`` takes the tier's ``cross_block`` section (a model's
    ``model_settings`` may set its own)."""
    params = load_tier(tier)
    model = model or params["model"]
    section = {**params.get("cross_block", {}),
               **(params.get("model_settings") or {}).get(model, {}).get("cross_block", {})}
    bits = bit_widths(bits, section["bits"])
    variants = section["variants"] if variants is None else variants
    return [*sweep.configs(tier, model, bits, ("fp", *QUANTIZERS)),
            *(make_config("blockwise", b, tier, options=dict(v), model=model) for b in bits for v in variants)]


NOTEBOOKS = (Notebook("04_cross_block", configs, section="cross_block"),)


def _sweep_configs(tier: str, model: str, sweep) -> list:
    """The block-wise int4 configs of ``sweep`` (option sets) and the tier's default run, each once (an
    entry at the tier's own lr is that run)."""
    configs = (make_config("blockwise", BLOCKWISE_SWEEP_BITS, tier, model=model, options=o)
               for o in [*sweep, {"window": 1}])
    return list({c.key(): c for c in configs}.values())


def chosen_lr(tier: str, model: str, outputs) -> float | None:
    """Block PTQ's learning rate for ``model``, selected on validation: the lowest validation NLL among
    its int4 runs at the tier's lr and at ``BLOCKWISE_LR`` (the tier's training precision); None where
    none of them ran. A model whose only run is the tier's keeps the tier's lr."""
    swept = read_records(_sweep_configs(tier, model, BLOCKWISE_LR), outputs)
    best = min(swept, key=lambda r: r["nll_validation"], default=None)
    return None if best is None else best["config"]["options"]["lr"]


def records(tier: str, model: str, outputs) -> list[dict]:
    """The cached records of the study for ``model``: notebook 04's runs (its ``configs``) with the
    block-wise variants at the model's ``chosen_lr`` where it differs from the tier's (run by hand,
    `--option lr=...`), plus the controls run by hand (``CROSS_BLOCK_CONTROLS``, ``QAFT_CONTROLS``),
    where present."""
    lr = chosen_lr(tier, model, outputs)
    chosen = configs(tier, model)
    bits = sorted({c.bits for c in chosen if c.method == "blockwise"})
    chosen += [make_config("blockwise", b, tier, model=model, options=dict(o))
               for b in bits for o in CROSS_BLOCK_CONTROLS]
    chosen = [c if c.method != "blockwise" or lr is None else
              make_config("blockwise", c.bits, tier, model=model, options={**c.options, "lr": lr}) for c in chosen]
    chosen += [make_config("qaft", b, tier, model=model, options=dict(o)) for b in bits for o in QAFT_CONTROLS]
    return read_records(chosen, outputs)


def _with_blockwise(tier: str, outputs, model: str | None) -> dict:
    """``{model: records}`` of the models (the tier's and its ``cross_block`` section's) with block-wise records."""
    found = {m: records(tier, m, outputs) for m in tier_models(tier, model, "cross_block")}
    return {m: rs for m, rs in found.items() if blockwise_bits(rs)}


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``blockwise-sweep`` (the default model's) and ``blockwise-sweep-MODEL`` (the others'), where
    run, ``spectrum-MODEL`` per model and ``cross-block`` (the verdicts, growth law and memory over
    every model)."""
    models = tier_models(tier, model, "cross_block")
    result = {}
    for m in models:
        chosen = read_records(_sweep_configs(tier, m, [*BLOCKWISE_SWEEP, *BLOCKWISE_LR]), outputs)
        if len(chosen) > 1:  # the sweep, not only the tier's default run
            name = "blockwise-sweep" if m == models[0] else f"blockwise-sweep-{m}"
            result[name] = f"{blockwise_sweep_table(chosen)}\n\n{provenance(chosen, tier, command)}"
    cross = _with_blockwise(tier, outputs, model)
    for m, rs in cross.items():
        (lr,) = {r["config"]["options"]["lr"] for r in rs if r["config"]["method"] == "blockwise"}  # records() chose it
        result[f"spectrum-{m}"] = "\n\n".join(
            [f"int{b}, block-wise lr {lr:g} (block PTQ's lowest validation NLL):\n\n{spectrum_table(rs, b, m)}"
             for b in blockwise_bits(rs)] + [provenance(rs, tier, command)])
    if cross:
        every = [r for rs in cross.values() for r in rs]
        blockwise = [r for r in every if r["config"]["method"] == "blockwise"]
        growth = "\n".join(f"- {m}: {growth_summary([r for r in blockwise if r['config']['model'] == m])}"
                           for m in cross)
        result["cross-block"] = (f"{cross_block_summary(every)}\n\n{growth}\n\n{memory_table(blockwise)}\n\n"
                                 f"{provenance(every, tier, command)}")
    return result


def figures(tier: str, outputs, model: str | None = None) -> dict:
    """Per model with block-wise records: the locality spectrum at each width, window time."""
    default = tier_models(tier, model)[0]
    drawn = {}
    for m, rs in _with_blockwise(tier, outputs, model).items():
        end = suffix(tier, m, default)
        drawn.update({f"spectrum_int{b}{end}": (lambda rs=rs, b=b, m=m: plots.spectrum(rs, b, m))
                      for b in blockwise_bits(rs)})
        drawn[f"window_time{end}"] = lambda rs=rs: plots.window_time(rs)
    return drawn
