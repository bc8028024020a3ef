"""The papers' figures from result records (the dicts ``repro.runs.run`` returns).

Every function takes a list of records (plus options), draws with matplotlib and returns the
``Figure``; none of them computes anything a record does not already hold.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

METHOD_COLORS = {"fp": "black", "rtn": "tab:blue", "gptq": "tab:orange", "qaft": "tab:green",
                 "block": "tab:red", "mb": "tab:purple", "la": "tab:brown"}
OBSERVER_COLORS = {"histogram": "tab:red", "mse": "tab:purple", "minmax": "tab:blue"}


def _fp_level(records, metric):
    levels = [r[metric] for r in records if r["config"]["method"] == "fp"]
    return levels[0] if levels else None


def _quantized(records):
    return [r for r in records if r["config"]["bits"] is not None]


def nll_vs_bits(records, metric: str = "nll_validation", ax=None):
    """Grouped bars: ``metric`` per bit-width (x) and method (colour); FP as a dashed line."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    quant = _quantized(records)
    bits = sorted({r["config"]["bits"] for r in quant}, reverse=True)
    methods = list(dict.fromkeys(r["config"]["method"] for r in quant))
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        values = {r["config"]["bits"]: r[metric] for r in quant if r["config"]["method"] == method}
        xs = [i + j * width for i, b in enumerate(bits) if b in values]
        ax.bar(xs, [values[b] for b in bits if b in values], width, label=method,
               color=METHOD_COLORS.get(method))
    fp = _fp_level(records, metric)
    if fp is not None:
        ax.axhline(fp, color="black", ls="--", lw=1, label=f"FP ({fp:.2f})")
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
    table = defaultdict(dict)
    for r in _quantized(records):
        table[r["config"]["method"]][r["config"]["bits"]] = r
    return table


def misalignment(records, methods=("rtn", "gptq", "qaft")):
    """Paper Fig. 1: global NLL (upper) and mean layer-wise MSE (lower) per bit-width and method."""
    fig, (ax_nll, ax_mse) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    table = _by_method_bits(records)
    for method in methods:
        rs = sorted(table.get(method, {}).items())
        if not rs:
            continue
        bits = [b for b, _ in rs]
        style = dict(marker="o", color=METHOD_COLORS.get(method), label=method)
        ax_nll.plot(bits, [r["nll_validation"] for _, r in rs], **style)
        ax_mse.plot(bits, [r["mean_layer_mse"] for _, r in rs], **style)
    fp = _fp_level(records, "nll_validation")
    if fp is not None:
        ax_nll.axhline(fp, color="black", ls="--", lw=1, label="FP")
    ax_nll.set(ylabel="validation NLL (nats/token)", title="global objective")
    ax_mse.set(ylabel="mean layer-wise MSE", yscale="log", xlabel="bits", title="local objective")
    ax_mse.invert_xaxis()
    ax_nll.legend(fontsize=8)
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
        run = next(r for r in info["runs"] if r["lr"] == info["lr"])
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


def damping_plot(records):
    """Paper App. C: GPTQ's chosen damping per linear across the stack (one line per record,
    log y) and how often each grid value was chosen."""
    fig, (ax, ax_hist) = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    gptq = [r for r in records if r["config"]["method"] == "gptq"]
    for i, r in enumerate(gptq):
        layers = r["info"]["layers"]
        chosen = [v["damping"] for v in layers.values()]
        color = plt.get_cmap("viridis")(i / max(len(gptq) - 1, 1))
        ax.plot(range(len(chosen)), [c if c is not None else float("nan") for c in chosen], ".", ms=4,
                color=color, label=f"int{r['config']['bits']}")
        grid = [float(g) for g in next(iter(layers.values()))["losses"]]
        counts = [sum(c == g for c in chosen) for g in grid]
        ax_hist.plot(grid, counts, "o-", color=color)
    ax.set(yscale="log", xlabel="linear (forward order)", ylabel="chosen damping λ")
    ax_hist.set(xscale="log", xlabel="damping λ", ylabel="layers choosing it")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figures(records, directory: Path | str, suffix: str = "") -> list[Path]:
    """Draw every figure the records support and save each as ``directory/<name><suffix>.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    methods = {r["config"]["method"] for r in records}
    figures = {"nll_vs_bits": lambda: nll_vs_bits(records)}
    if methods & {"gptq", "qaft"}:
        figures["misalignment"] = lambda: misalignment(records)
    if "gptq" in methods:
        figures["damping"] = lambda: damping_plot(records)
    if "qaft" in methods:
        figures["qaft_epochs"] = lambda: qaft_epochs(records)
        figures["lr_sweep"] = lambda: lr_sweep(records)
    paths = []
    for name, draw in figures.items():
        fig = draw()
        paths.append(directory / f"{name}{suffix}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
