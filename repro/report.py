"""Conclusions computed from records (so notebook prose never carries hand-typed numbers)."""
from __future__ import annotations

from collections import defaultdict


def _table(records):
    table = defaultdict(dict)
    for r in records:
        if r["config"]["bits"] is not None:
            table[r["config"]["method"]][r["config"]["bits"]] = r
    return table


def misalignment_summary(records, local: str = "gptq", global_: str = "qaft") -> str:
    """Markdown: per bit-width, which method wins the global NLL and which the layer MSE."""
    table = _table(records)
    lines = []
    for b in sorted(set(table.get(local, {})) & set(table.get(global_, {})), reverse=True):
        lo, gl = table[local][b], table[global_][b]
        nll_winner = global_ if gl["nll_validation"] < lo["nll_validation"] else local
        mse_winner = local if lo["mean_layer_mse"] < gl["mean_layer_mse"] else global_
        aligned = "aligned" if nll_winner == mse_winner else "**misaligned**"
        lines.append(
            f"- int{b}: {nll_winner.upper()} has the lower validation NLL "
            f"({lo['nll_validation']:.3f} {local.upper()} vs {gl['nll_validation']:.3f} {global_.upper()}, "
            f"Δ {gl['nll_validation'] - lo['nll_validation']:+.3f}); {mse_winner.upper()} has the lower mean "
            f"layer MSE ({lo['mean_layer_mse']:.3g} vs {gl['mean_layer_mse']:.3g}) — {aligned}.")
    if not lines:
        return f"No bit-width has both {local} and {global_} records yet."
    return "\n".join(lines)


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
