"""The papers' figures from result records (the dicts ``repro.runs.run`` returns).

Most functions take a list of records (plus options; the landscape's take ``repro.studies.landscape``
results); each draws with matplotlib and returns the ``Figure``, and none computes anything a record
does not already hold.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker
import matplotlib.pyplot as plt

from repro import analysis
from repro.methods import METHODS, QUANTIZERS
from repro.uncertainty import mean_interval

METHOD_COLORS = {name: method.color for name, method in METHODS.items()}
OBSERVER_COLORS = {"histogram": "tab:red", "mse": "tab:purple", "minmax": "tab:blue"}


def _fp_level(records, metric, method: str = "fp"):
    levels = [r[metric] for r in records if r["config"]["method"] == method]
    return levels[0] if levels else None


def _reference_lines(ax, records, metric) -> None:
    """Horizontal lines at the FP references' ``metric``: FP dashed, fine-tuned FP (FPFT) dotted."""
    for method, style in (("fp", "--"), ("fpft", ":")):
        level = _fp_level(records, metric, method)
        if level is not None:
            ax.axhline(level, color=METHOD_COLORS[method], ls=style, lw=1,
                       label=f"{METHODS[method].label} ({level:.2f})")


def _error_bars(records, metric) -> list | None:
    """``[[below], [above]]`` of each record's bootstrap 95% interval of its mean ``metric`` over
    windows (matplotlib's ``yerr``), or None when a record has no per-window values."""
    intervals = [mean_interval(r.get(f"{metric}_windows")) for r in records]
    if any(i is None for i in intervals):
        return None
    return [[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]]


def _quantized(records):
    return [r for r in records if r["config"]["bits"] is not None]


def nll_vs_bits(records, metric: str = "nll_validation", ax=None):
    """Grouped bars: ``metric`` per bit-width (x) and method (colour), with each record's bootstrap 95%
    interval over windows where recorded; FP as a dashed line, fine-tuned FP (FPFT) dotted."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    quant = _quantized(records)
    bits = sorted({r["config"]["bits"] for r in quant}, reverse=True)
    methods = list(dict.fromkeys(r["config"]["method"] for r in quant))
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        recs = {r["config"]["bits"]: r for r in quant if r["config"]["method"] == method}
        xs = [i + j * width for i, b in enumerate(bits) if b in recs]
        drawn = [recs[b] for b in bits if b in recs]
        ax.bar(xs, [r[metric] for r in drawn], width, label=method, color=METHOD_COLORS.get(method),
               yerr=_error_bars(drawn, metric), capsize=2, error_kw={"lw": 0.8})
    _reference_lines(ax, records, metric)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(bits))], [f"int{b}" for b in bits])
    ax.set_ylabel(metric.replace("_", " ") + (" (nats/token)" if metric.startswith("nll") else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_index(name: str) -> int:
    """Block index in a stack linear's full name (``model.layers.7.mlp.up_proj`` -> 7)."""
    return int(re.search(r"\.(\d+)\.", name).group(1))


def layer_mse_profile(records, metric: str = "layer_mse", ax=None, title: str | None = None):
    """Per-layer values (``layer_mse``, or an ``info`` dict such as ``clipped``) across the
    stack: one line per record, x = position of the linear in forward order, log y."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(9, 3.5))
    cmap = plt.get_cmap("viridis")
    quant = _quantized(records)
    for i, r in enumerate(quant):
        values = r[metric] if metric in r else r["info"][metric]
        names = list(values)
        c = r["config"]
        ax.plot(range(len(names)), [max(v, 1e-12) for v in values.values()], lw=1,
                color=cmap(i / max(len(quant) - 1, 1)), label=f"{c['method']} int{c['bits']} {c['observer']}")
    if quant:
        names = list(quant[0][metric] if metric in quant[0] else quant[0]["info"][metric])
        starts = [k for k, n in enumerate(names) if k == 0 or layer_index(n) != layer_index(names[k - 1])]
        ax.set_xticks(starts[::5], [str(layer_index(names[k])) for k in starts[::5]])
    ax.set_yscale("log")
    ax.set_xlabel("block (linears in forward order within each block)")
    ax.set_ylabel(metric.replace("_", " "))
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def observer_comparison(records):
    """Two panels over bits, one line per observer: RTN validation NLL and weight MSE."""
    fig, (ax_nll, ax_w) = plt.subplots(1, 2, figsize=(10, 3.5))
    groups = defaultdict(list)
    for r in _quantized(records):
        groups[r["config"]["observer"]].append(r)
    for observer, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["config"]["bits"])
        bits = [r["config"]["bits"] for r in rs]
        color = OBSERVER_COLORS.get(observer)
        ax_nll.plot(bits, [r["nll_validation"] for r in rs], "o-", color=color, label=observer)
        ax_w.plot(bits, [r["weight_mse"] for r in rs], "o-", color=color, label=observer)
    fp = _fp_level(records, "nll_validation")
    if fp is not None:
        ax_nll.axhline(fp, color="black", ls="--", lw=1, label="FP")
    ax_nll.set(xlabel="bits", ylabel="validation NLL (nats/token)", title="global loss")
    ax_w.set(xlabel="bits", ylabel="mean weight MSE", yscale="log", title="what the observer minimises")
    for ax in (ax_nll, ax_w):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _by_method_bits(records):
    """``analysis.by_method_bits`` of the quantized records."""
    return analysis.by_method_bits(_quantized(records))


METRIC_LABELS = {"nll_test": "test NLL", "nll_validation": "validation NLL",
                 "layer_mse_fp_inputs": "layer MSE, FP inputs (paper eq. 2)",
                 "layer_mse": "layer MSE, own inputs"}


def _format_colors(records):
    """One colour per bit-width found in ``records`` (the same in every panel of a figure)."""
    bits = sorted({r["config"]["bits"] for r in _quantized(records)}, reverse=True)
    cmap = plt.get_cmap("plasma")
    return {b: cmap(i / max(len(bits), 1)) for i, b in enumerate(bits)}


def _square(ax, values, log: bool):
    """Same limits on both axes (padded around ``values``; log: at least a decade, so a labelled
    power of ten shows, minor ticks unlabelled), equal aspect, gray identity diagonal."""
    lo, hi = min(values), max(values)
    if log:
        pad = max((hi / lo) ** 0.05, (10 * lo / hi) ** 0.5)
        lo, hi = lo / pad, hi * pad
        ax.set(xscale="log", yscale="log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 0.1
        lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, zorder=0)
    ax.set(xlim=(lo, hi), ylim=(lo, hi))
    ax.set_aspect("equal", adjustable="box")


def misalignment_scatter(records, metric_rows=("nll_test", "layer_mse_fp_inputs", "layer_mse"),
                         local: str = "gptq", global_: str = "qaft", column: str = "model"):
    """Paper Fig. 1 in its own layout: one column per model (or per value of another config key
    ``column``, e.g. ``corpus`` for paper Fig. 4, or of a function of the record, e.g.
    ``analysis.grid_of``; a column without its own FP record gets the others'), one row per metric, ``local`` (x) against
    ``global_`` (y) at each bit-width both have.

    A scalar metric (``nll_test``) draws one dot per format at (local, global) with a line from
    it to (RTN, RTN) on the diagonal, and a black dot at (FP, FP). A per-layer metric
    (``layer_mse*``) draws one small dot per linear at (local's MSE, global's MSE), log-log.
    Below the diagonal the global method is the better one, above it the local one.
    """
    value = column if callable(column) else (lambda r: r["config"][column])
    models = list(dict.fromkeys(value(r) for r in records))
    fig, axes = plt.subplots(len(metric_rows), max(len(models), 1), squeeze=False, layout="constrained",
                             figsize=(3.6 * max(len(models), 1), 3.4 * len(metric_rows)))
    colors = _format_colors(records)
    handles = {}
    for col, model in enumerate(models):
        recs = [r for r in records if value(r) == model]
        if callable(column) and not any(r["config"]["method"] == "fp" for r in recs):  # e.g. a granularity:
            recs += [r for r in records if r["config"]["method"] == "fp"]  # its FP is the (one) model's
        table = _by_method_bits(recs)
        bits = sorted(set(table.get(local, {})) & set(table.get(global_, {})), reverse=True)
        for row, metric in enumerate(metric_rows):
            ax = axes[row][col]
            label = METRIC_LABELS.get(metric, metric.replace("_", " "))
            ax.set_title(f"{model}\n{label}" if row == 0 else label, fontsize=9)
            ax.set_xlabel(f"{local.upper()} {label}", fontsize=8)
            ax.set_ylabel(f"{global_.upper()} {label}", fontsize=8)
            pairs = [(b, table[local][b].get(metric), table[global_][b].get(metric)) for b in bits]
            pairs = [(b, x, y) for b, x, y in pairs if x is not None and y is not None]
            per_layer = bool(pairs) and isinstance(pairs[0][1], dict)
            values = []
            for b, x, y in pairs:
                if per_layer:  # the linears both records measured (log axes: positive values only)
                    xy = [(x[n], y[n]) for n in x if n in y and x[n] > 0 and y[n] > 0]
                    if xy:
                        handles[b] = ax.scatter(*zip(*xy), s=8, alpha=0.7, color=colors[b], label=f"int{b}")
                        values += [v for p in xy for v in p]
                    continue
                handles[b] = ax.scatter([x], [y], s=30, color=colors[b], zorder=3, label=f"int{b}")
                values += [x, y]
                rtn = table.get("rtn", {}).get(b, {}).get(metric)
                if rtn is not None:
                    ax.plot([x, rtn], [y, rtn], color=colors[b], lw=1.2, label=f"_rtn int{b}")
                    values.append(rtn)
            if not values:
                ax.text(0.5, 0.5, f"no {local.upper()}/{global_.upper()} pair\nwith {metric}",
                        transform=ax.transAxes, ha="center", va="center", fontsize=8, color="gray")
                continue
            fp = None if per_layer else _fp_level(recs, metric)
            if fp is not None:
                handles["fp"] = ax.scatter([fp], [fp], s=30, color="black", zorder=3, label="FP")
                values.append(fp)
            _square(ax, values, log=per_layer)
    ordered = [handles[b] for b in colors if b in handles] + ([handles["fp"]] if "fp" in handles else [])
    if ordered:
        # at most 3 entries per panel column, so the legend is never wider than the figure (and clipped)
        fig.legend(handles=ordered, loc="outside upper center", ncol=min(len(ordered), 3 * max(len(models), 1)), fontsize=8,
                   title="lines end at (RTN, RTN)", title_fontsize=8)
    return fig


def misalignment(records, methods=QUANTIZERS):
    """Fig. 1's data as lines over bits, one per method: test NLL (top; each point's bootstrap 95%
    interval over test windows as an error bar where recorded; FP dashed, fine-tuned FP dotted), mean
    layer-wise MSE with FP inputs (paper eq. 2, middle) and with the quantized model's own inputs (bottom)."""
    rows = (("nll_test", "test NLL (nats/token)"),
            ("mean_layer_mse_fp_inputs", "mean layer MSE,\nFP inputs (eq. 2)"),
            ("mean_layer_mse", "mean layer MSE,\nown inputs"))
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 8), sharex=True)
    table = _by_method_bits(records)
    for method in methods:
        rs = sorted(table.get(method, {}).items())
        if not rs:
            continue
        bits = [b for b, _ in rs]
        for ax, (key, _) in zip(axes, rows):
            ys = [r.get(key, float("nan")) for _, r in rs]
            ax.plot(bits, ys, marker="o", color=METHOD_COLORS.get(method), label=method)
        yerr = _error_bars([r for _, r in rs], "nll_test")
        if yerr is not None:
            axes[0].errorbar(bits, [r["nll_test"] for _, r in rs], yerr=yerr, fmt="none", capsize=3,
                             color=METHOD_COLORS.get(method), label="_nolegend_")
    _reference_lines(axes[0], records, "nll_test")
    for ax, (_, ylabel) in zip(axes, rows):
        ax.set_ylabel(ylabel)
    axes[0].set_title("global objective")
    axes[1].set_title("local objectives")
    for ax in axes[1:]:
        ax.set_yscale("log")
    axes[-1].set_xlabel("bits")
    axes[-1].invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def qaft_epochs(records):
    """Paper Fig. 7: test NLL after each QAFT epoch (epoch 0 = RTN) of the chosen LR, one panel
    per bit-width, GPTQ's test NLL as a horizontal red line."""
    table = _by_method_bits(records)
    bits = sorted(table.get("qaft", {}), reverse=True)
    fig, axes = plt.subplots(1, max(len(bits), 1), figsize=(3.2 * max(len(bits), 1), 3), squeeze=False)
    for ax, b in zip(axes[0], bits):
        info = table["qaft"][b]["info"]
        run = analysis.chosen_run(info)
        if run is None:  # (a record from before the runs list)
            continue
        ax.plot([h["epoch"] for h in run["history"]], [h["nll_test"] for h in run["history"]], "o-",
                color=METHOD_COLORS["qaft"], label=f"QAFT lr {info['lr']:g}")
        if b in table.get("gptq", {}):
            ax.axhline(table["gptq"][b]["nll_test"], color="red", label="GPTQ")
        ax.set(title=f"int{b}", xlabel="epoch")
    axes[0][0].set_ylabel("test NLL (nats/token)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def lr_sweep(records):
    """Paper Fig. 6: best validation NLL per initial LR (left, RTN level dashed) and the
    chosen LR per bit-width (right), from QAFT records."""
    fig, (ax, ax_best) = plt.subplots(1, 2, figsize=(10, 3.5))
    table = _by_method_bits(records)
    cmap = plt.get_cmap("plasma")
    bits = sorted(table.get("qaft", {}), reverse=True)
    for i, b in enumerate(bits):
        info = table["qaft"][b]["info"]
        color = cmap(i / max(len(bits), 1))
        runs_ = sorted(info["runs"], key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in runs_], [r["best_nll_validation"] for r in runs_], "o-", color=color,
                label=f"int{b}")
        ax.axhline(info["rtn"]["nll_validation"], color=color, ls="--", lw=1)
    ax.set(xscale="log", xlabel="initial learning rate", ylabel="validation NLL after QAFT",
           title="dashed: RTN")
    ax.legend(fontsize=8)
    ax_best.plot(bits, [table["qaft"][b]["info"]["lr"] for b in bits], "o-")
    ax_best.set(yscale="log", xlabel="bits", ylabel="best initial LR")
    ax_best.invert_xaxis()
    fig.tight_layout()
    return fig


def _held_out(layer) -> dict | None:
    """A GPTQ layer's held-out losses, or None where none were recorded (old or holdout-0 runs)."""
    held = layer.get("held_out_losses") or {}
    return held if any(v is not None for v in held.values()) else None


def _normalised_losses(layers, kind: str):
    """Per grid value (float), the mean over linears of ``layer[kind][value]`` divided by that
    linear's smallest held-out loss (smallest in-sample loss where it has no held-out losses);
    linears or values without a loss, or with a non-positive reference, are left out."""
    ratios = defaultdict(list)
    for layer in layers.values():
        ref = [v for v in (_held_out(layer) or layer["losses"]).values() if v is not None]
        if not ref or min(ref) <= 0:
            continue
        for g, v in (layer.get(kind) or {}).items():
            if v is not None:
                ratios[float(g)].append(v / min(ref))
    return {g: sum(rs) / len(rs) for g, rs in sorted(ratios.items())}


def damping_plot(records):
    """Paper App. C, one colour per GPTQ record (bit-width): the chosen damping per linear across
    the stack (left, log y); how often each grid value was chosen (middle); per grid value the
    mean over linears of the held-out (solid) and in-sample (dashed) layer loss, each normalised
    per linear by its smallest held-out loss (right, log-log; records without held-out losses
    draw the in-sample line only, normalised by the smallest in-sample loss)."""
    fig, (ax, ax_hist, ax_loss) = plt.subplots(1, 3, figsize=(15, 3.5),
                                               gridspec_kw={"width_ratios": [3, 1, 1.3]})
    gptq = [r for r in records if r["config"]["method"] == "gptq"]
    for i, r in enumerate(gptq):
        layers = r["info"]["layers"]
        chosen = [v["damping"] for v in layers.values()]
        color = plt.get_cmap("viridis")(i / max(len(gptq) - 1, 1))
        ax.plot(range(len(chosen)), [c if c is not None else float("nan") for c in chosen], ".", ms=4,
                color=color, label=f"int{r['config']['bits']}")
        grid = [float(g) for g in next(iter(layers.values()))["losses"]]
        ax_hist.plot(grid, [sum(c == g for c in chosen) for g in grid], "o-", color=color)
        kinds = ("held_out_losses", "losses") if any(map(_held_out, layers.values())) else ("losses",)
        for kind in kinds:
            curve = _normalised_losses(layers, kind)
            ax_loss.plot(list(curve), list(curve.values()), "o-" if kind == "held_out_losses" else "o--",
                         ms=3, color=color)
    ax.set(yscale="log", xlabel="linear (forward order)", ylabel="chosen damping λ")
    ax_hist.set(xscale="log", xlabel="damping λ", ylabel="layers choosing it")
    ax_loss.set(xscale="log", yscale="log", xlabel="damping λ",
                ylabel="layer loss / min held-out loss\n(mean over linears)")
    ax_loss.legend([plt.Line2D([], [], color="gray"), plt.Line2D([], [], color="gray", ls="--")],
                   ["held-out", "in-sample"], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# Paper Fig. 2's symbols per method: marker, filled, style of the gray line joining one model's points
PARETO_STYLE = {"rtn": ("o", False, ":"), "gptq": ("s", True, "--"), "qaft": ("o", True, "-")}
STRIP_HALF_WIDTH = 1.04  # the GPTQ-QAFT strip spans size / 1.04 .. size x 1.04 (log x axis)


def _model_colors(models):
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def _keep_bits(bits):
    return None if bits is None else {bits} if isinstance(bits, int) else set(bits)


def _log_size_axis(ax):
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def pareto(records, bits=None, ax=None, metric: str = "nll_test", ylim=None):
    """Paper Fig. 2: ``metric`` (test NLL, nats/token) against the transformer stack's weight
    size in GB (log x; stack_params x bits / 8 / 1e9, FP at 16 bits), all models in one panel,
    one colour per model. RTN: hollow circles, GPTQ: squares, QAFT: filled circles, FP: black
    circles; thin gray lines join one model's points per method by size (RTN dotted, GPTQ dashed,
    QAFT solid); a transparent strip in the model's colour spans GPTQ to QAFT at each (model,
    bits), labelled with the bit-width; the red step line is the Pareto front over every point
    drawn. ``bits`` (int or list) keeps those bit-widths (FP always stays); ``ylim`` clips y."""
    keep = _keep_bits(bits)
    points = [p for p in analysis.pareto_points(records, metric)
              if p["method"] == "fp" or keep is None or p["bits"] in keep]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7.5, 4.8))
    models = analysis.model_order(points)
    colors = _model_colors(models)
    cells = analysis.by_model_bits(points)
    for model in models:
        color = colors[model]
        for method, (marker, filled, ls) in PARETO_STYLE.items():
            ps = sorted((p for p in points if p["model"] == model and p["method"] == method),
                        key=lambda p: p["size_gb"])
            if not ps:
                continue
            xs, ys = [p["size_gb"] for p in ps], [p["nll"] for p in ps]
            ax.plot(xs, ys, ls=ls, color="gray", lw=0.8, zorder=1, gid=f"{model}:{method}:line")
            ax.plot(xs, ys, ls="", marker=marker, ms=6, mew=1.3, mec=color, mfc=color if filled else "none",
                    zorder=3, gid=f"{model}:{method}")
        for (m, b), cell in sorted(cells.items(), key=lambda kv: -kv[0][1]):
            if m != model:
                continue
            if "gptq" in cell and "qaft" in cell:
                x = cell["gptq"]["size_gb"]
                lo, hi = sorted((cell["gptq"]["nll"], cell["qaft"]["nll"]))
                ax.fill_between([x / STRIP_HALF_WIDTH, x * STRIP_HALF_WIDTH], lo, hi, color=color, alpha=0.3,
                                lw=0, zorder=2, gid=f"{model}:strip:{b}")
            if "fp" in cell:
                ax.plot([cell["fp"]["size_gb"]], [cell["fp"]["nll"]], ls="", marker="o", ms=7, color="black",
                        zorder=4, gid=f"{model}:fp")
            else:
                top = max(p["nll"] for p in cell.values())
                ax.annotate(f"int{b}", (next(iter(cell.values()))["size_gb"], top), xytext=(0, 6),
                            textcoords="offset points", ha="center", fontsize=6, color=color)
    front = analysis.pareto_front(points)
    if front:
        ax.step([p["size_gb"] for p in front], [p["nll"] for p in front], where="post", color="red", lw=1,
                alpha=0.7, zorder=2, gid="front")
    if not points:
        ax.text(0.5, 0.5, "no records with a weight size", transform=ax.transAxes, ha="center", color="gray")
    else:
        _log_size_axis(ax)
    drawn = {p["method"] for p in points}
    handles = [matplotlib.patches.Patch(color=colors[m], label=m) for m in models]
    handles += [matplotlib.lines.Line2D([], [], ls=ls, color="gray", marker=marker, mec="dimgray",
                                        mfc="dimgray" if filled else "none", label=method.upper())
                for method, (marker, filled, ls) in PARETO_STYLE.items() if method in drawn]
    if "fp" in drawn:
        handles.append(matplotlib.lines.Line2D([], [], ls="", marker="o", color="black", label="FP (16-bit)"))
    if front:
        handles.append(matplotlib.lines.Line2D([], [], color="red", lw=1, label="Pareto front"))
    if {"gptq", "qaft"} <= drawn:
        handles.append(matplotlib.patches.Patch(color="gray", alpha=0.3, label="GPTQ–QAFT gap"))
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper right")
    split = metric.removeprefix("nll_")
    ax.set(xlabel="transformer-stack weight size (GB, log scale)", ylabel=f"{split} NLL (nats/token)",
           title=f"{split} NLL vs weight size" + ("" if keep is None else
                                                  f" (int{', int'.join(map(str, sorted(keep, reverse=True)))})"))
    if ylim is not None:
        ax.set_ylim(*ylim)
    fig.tight_layout()
    return fig


def pareto_gap(records, ax=None, metric: str = "nll_test"):
    """Paper Fig. 2's strips as lines: GPTQ − QAFT ``metric`` (test NLL, nats/token; above 0: QAFT
    lower) against bits (high to low), one line per model in the colours of ``pareto``."""
    points = analysis.pareto_points(records, metric)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.5))
    models = analysis.model_order(points)
    colors = _model_colors(models)
    cells = analysis.by_model_bits(points)
    all_bits = set()
    for model in models:
        bits = sorted(b for (m, b), c in cells.items() if m == model and {"gptq", "qaft"} <= set(c))
        if bits:
            ax.plot(bits, [cells[(model, b)]["gptq"]["nll"] - cells[(model, b)]["qaft"]["nll"] for b in bits],
                    "o-", color=colors[model], label=model)
            all_bits |= set(bits)
    ax.axhline(0, color="gray", lw=1)
    if all_bits:
        ax.set_xticks(sorted(all_bits), [f"int{b}" for b in sorted(all_bits)])
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no (model, bits) with both GPTQ and QAFT", transform=ax.transAxes, ha="center",
                color="gray")
    ax.invert_xaxis()
    ax.set(xlabel="bits", ylabel=f"GPTQ − QAFT {metric.removeprefix('nll_')} NLL (nats/token)",
           title="above 0: QAFT generalises better")
    fig.tight_layout()
    return fig


SPECTRUM_METRICS = ((lambda r: analysis.median_layer_mse(r, "layer_mse_fp_inputs"), "median layer MSE, FP inputs", "o--"),
                    (lambda r: analysis.median_layer_mse(r, "layer_mse"), "median layer MSE, own inputs", "s--"),
                    (lambda r: r.get("mean_block_output_mse"), "mean block-output MSE", "^-"))


def spectrum(records, bits: int, model: str | None = None):
    """The locality spectrum at ``bits``: methods on the x axis from the most local objective (RTN)
    to the global one (QAFT), test NLL above (nats/token, FP dashed), the local errors below (test
    split, log scale): median layer MSE with FP and with own inputs, mean block-output MSE."""
    rows = analysis.spectrum_records(records, bits, model)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True)
    xs = range(len(rows))
    labels = [f"{analysis.method_label(r)}\n({analysis.sees(r)})" for r in rows]
    top.plot(xs, [r["nll_test"] for r in rows], "o-", color="black")
    fp = [r["nll_test"] for r in records if r["config"]["method"] == "fp"
          and (model is None or r["config"]["model"] == model)]
    if fp:
        top.axhline(fp[0], color="gray", ls="--", lw=1, label=f"FP ({fp[0]:.2f})")
        top.legend(fontsize=8)
    top.set(ylabel="test NLL (nats/token)", title=f"locality spectrum, int{bits}" + (f" — {model}" if model else ""))
    for value, label, style in SPECTRUM_METRICS:
        pts = [(x, value(r)) for x, r in zip(xs, rows) if value(r)]
        if pts:
            bottom.plot(*zip(*pts), style, label=label)
    bottom.set_yscale("log")
    bottom.set(ylabel="MSE (test, squared act. units)")
    bottom.legend(fontsize=7)
    bottom.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    return fig


def window_time(records, ax=None):
    """Seconds per optimizer step of every block-wise window against the blocks it runs (m + l),
    with the fitted growth law ``a (m + l)^k`` (``analysis.growth_law``)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.5))
    points = analysis.window_times(records)
    if points:
        ax.plot(*zip(*points), "o", alpha=0.4, color="tab:red", label="windows")
    law = analysis.growth_law(records)
    if law is not None:
        a, k = law
        grid = [1 + i * 0.05 * (max(n for n, _ in points) - 1) for i in range(21)]
        ax.plot(grid, [a * n ** k for n in grid], "-", color="black", label=f"{a:.3g} s × (m+l)^{k:.2f}")
    ax.set(xlabel="blocks run per step (m + l)", ylabel="s per optimizer step", title="block-wise cost")
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# paper Fig. 3: w black, RTN blue, GPTQ red, QAFT green; a segment takes a blend of its ends' colours
LANDSCAPE_COLORS = {"fp": "black", "rtn": "tab:blue", "gptq": "tab:red", "qaft": "tab:green"}


def _end_color(label: str):
    return matplotlib.colors.to_rgb(LANDSCAPE_COLORS[label.split("@")[0]])


def landscape(result: dict, bits: int):
    """Paper Fig. 3 at ``bits``: NLL against the L2 distance from ``w`` (stack weights), training
    (calibration) loss left, validation right. Thin gray lines: radial sweeps ``w + lam e`` (one
    per direction and sign); circles: ``w`` (black), ``w_RTN`` (blue), ``w_GPTQ`` (red), ``w_QAFT``
    (green); coloured lines: the straight segments between them (colour: the blend of the ends')."""
    points = result["points"]
    fp = next(p for p in points if p["spec"]["kind"] == "fp")
    ends = {"fp": fp, **{f"{p['spec']['method']}@{bits}": p for p in points
                         if p["spec"]["kind"] == "run" and p["spec"]["bits"] == bits}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    far = max(p["distance"] for p in ends.values())
    for ax, split in zip(axes, ("train", "validation")):
        rays = defaultdict(list)
        for p in points:
            if p["spec"]["kind"] == "radial":
                rays[(p["spec"]["seed"], p["spec"]["sign"])].append((p["distance"], p[split]))
        for i, ray in enumerate(rays.values()):
            xs, ys = zip(*sorted([(0.0, fp[split]), *ray]))
            ax.plot(xs, ys, "-", color="0.75", lw=0.8, label="random directions" if i == 0 else None)
        segments = defaultdict(list)
        for p in points:
            s = p["spec"]
            if s["kind"] == "segment" and s["b"].endswith(f"@{bits}"):
                segments[(s["a"], s["b"])].append((s["alpha"], p["distance"], p[split]))
        for (a, b), seg in segments.items():
            path = sorted([(0.0, ends[a]["distance"], ends[a][split]), *seg, (1.0, ends[b]["distance"], ends[b][split])])
            color = tuple((x + y) / 2 for x, y in zip(_end_color(a), _end_color(b)))
            ax.plot([d for _, d, _ in path], [v for _, _, v in path], "-", color=color, lw=1.5, alpha=0.9)
        for label, p in ends.items():
            method = label.split("@")[0]
            ax.plot(p["distance"], p[split], "o", color=LANDSCAPE_COLORS[method], ms=8, mec="white", zorder=5,
                    label="w (FP)" if method == "fp" else f"w_{method.upper()}")
        ax.set_xlim(-0.02 * far, 2.5 * far)
        ax.set(xlabel="L2 distance from w (stack weights)", ylabel=f"{split} NLL (nats/token)",
               title=f"{split}, int{bits} — {result['model']}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def basin_fits(result: dict, split: str = "train"):
    """The basin radius, beyond the paper: per direction, the rise of the NLL above ``L(w)``
    (average of +e and -e, log-log) with its fitted saturating bowl ``A lam^n / (lam^n + R^n)``,
    ``R`` marked; vertical lines: ``||w_RTN - w||`` at each width."""
    from repro.studies import landscape as landscape_mod

    basin = landscape_mod.basin_radius(result, split)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (seed, (lams, rise)) in enumerate(landscape_mod.radial_profiles(result, split).items()):
        color = f"C{i}"
        ax.plot(lams, [max(r, 1e-4) for r in rise], "o", color=color, ms=4)
        fit = basin["fits"][seed]
        grid = [lams[0] * (lams[-1] / lams[0]) ** (k / 60) for k in range(61)]
        ax.plot(grid, [fit["A"] * g ** fit["n"] / (g ** fit["n"] + fit["R"] ** fit["n"]) for g in grid], "-",
                color=color, lw=1, label=f"direction {seed}: R={fit['R']:.3g}, n={fit['n']:.2f}"
                + ("" if fit["accepted"] else " (not accepted)"))
    for p in result["points"]:
        s = p["spec"]
        if s["kind"] == "run" and s["method"] == "rtn":
            ax.axvline(p["distance"], color="tab:blue", lw=0.8, ls=":")
            ax.text(p["distance"], 1.2e-4, f"RTN int{s['bits']}", rotation=90, fontsize=7, color="tab:blue")
    ax.set(xscale="log", yscale="log", xlabel="distance from w", ylabel=f"{split} NLL rise over w (nats)",
           title=f"basin radius R(w) = {basin['R']:.3g}" + (" (lower bound)" if basin["bound"] else "")
           + f" — {result['model']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def eta_vs_rho(analysis: dict):
    """The paper's explanation tested: misalignment ``eta = NLL_GPTQ - NLL_QAFT`` (test split)
    against ``rho = ||w_RTN - w|| / R(w)``, one point per model and width; ``rho = 1`` dotted."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    models = sorted({r["model"] for r in analysis["rows"]})
    colors = _model_colors(models)
    for r in analysis["rows"]:
        ax.plot(r["rho"], r["eta"], "o", color=colors[r["model"]], mfc="none" if r["R_is_bound"] else colors[r["model"]])
        ax.annotate(f"int{r['bits']}", (r["rho"], r["eta"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for model in models:
        ax.plot([], [], "o", color=colors[model], label=model)
    ax.axvline(1, color="gray", ls=":", lw=1)
    ax.axhline(analysis["gap"], color="gray", ls="--", lw=0.8)
    ax.set(xscale="log", xlabel="rho = ||w_RTN - w|| / R(w)", ylabel="eta = NLL GPTQ - NLL QAFT (test)",
           title=f"Spearman {analysis['spearman']:.2f} over {analysis['n']} (model, width)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_drawn(figures: dict, directory: Path | str) -> list[Path]:
    """Draw each ``name -> draw()`` (a study's ``figures``) and save it as ``directory/<name>.png`` (returned)
    and as ``<name>.svg`` beside it (vector, for papers), one figure open at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in figures.items():
        fig = draw()
        paths.append(directory / f"{name}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        fig.savefig(paths[-1].with_suffix(".svg"), bbox_inches="tight")
        plt.close(fig)
    return paths


def seed_spread(records, metric: str = "nll_test"):
    """The seed study (notebook 07): ``metric`` against width, one colour per method; each seed's run
    a small dot, the mean over seeds a line with the range of seeds as a band; FP dashed."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    runs = {}
    for r in _quantized(records):
        c = r["config"]
        runs.setdefault(c["method"], {}).setdefault(c["bits"], []).append(r[metric])
    for method, by_bits in runs.items():
        bits = sorted(by_bits)
        means = [sum(by_bits[b]) / len(by_bits[b]) for b in bits]
        color = METHOD_COLORS.get(method)
        for b in bits:
            ax.scatter([b] * len(by_bits[b]), by_bits[b], s=10, color=color, alpha=0.6)
        ax.plot(bits, means, marker="o", color=color,
                label=f"{METHODS[method].label} ({max(len(v) for v in by_bits.values())} seed(s))")
        ax.fill_between(bits, [min(by_bits[b]) for b in bits], [max(by_bits[b]) for b in bits], color=color, alpha=0.15)
    _reference_lines(ax, records, metric)
    ax.set_xlabel("bits")
    ax.set_ylabel(metric.replace("_", " ") + " (nats/token)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
