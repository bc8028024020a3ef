"""Record derivations that tables (``repro.report``, the studies) and figures (``repro.plots``)
share: records grouped by method and width, the Pareto points and front, the locality spectrum's
order and labels, the block-wise window-time growth law, a record's grid name.

Pure functions of records (the JSON dicts ``repro.runs.run`` returns); nothing here draws or formats.
"""
from __future__ import annotations

import math
from collections import defaultdict

from repro.methods import QUANTIZERS, describe


def by_method_bits(records):
    """``{method: {bits: record}}`` of ``records`` (a reference, FP or FPFT, under ``bits`` None)."""
    table = defaultdict(dict)
    for r in records:
        table[r["config"]["method"]][r["config"]["bits"]] = r
    return table


def widths(table, methods=QUANTIZERS):
    return sorted({b for m in methods for b in table.get(m, {}) if b is not None}, reverse=True)


def fp_record(records):
    return next((r for r in records if r["config"]["method"] == "fp"), None)


def chosen_run(info):
    """QAFT: the run of the chosen lr0."""
    return next((r for r in info.get("runs", []) if math.isclose(r["lr"], info["lr"])), None)


def chosen_epoch(info):
    return info.get("epoch", info.get("best_epoch"))


FP_BITS = 16  # the paper's models are float16: the FP reference point sits at 16 bits per weight


def pareto_points(records, metric: str = "nll_test") -> list[dict]:
    """Paper Fig. 2's points, one per record: ``{model, method, bits, size_gb, nll, record}`` with
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
                       "bits": bits, "nll": r[metric], "record": r,
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


def model_order(points) -> list[str]:
    """Models from the smallest stack to the largest (ties: by name)."""
    size = {}
    for p in points:
        size[p["model"]] = min(size.get(p["model"], math.inf), p["size_gb"] / p["bits"])
    return sorted(size, key=lambda m: (size[m], m))


def by_model_bits(points) -> dict:
    """``{(model, bits): {method: point}}`` (FP under bits 16)."""
    cells = defaultdict(dict)
    for p in points:
        cells[(p["model"], p["bits"])][p["method"]] = p
    return cells


def on_front(points) -> set:
    return {(p["model"], p["method"], p["bits"]) for p in pareto_front(points)}


# Runs of a method at options other than its tier's that tables and figures name apart from the tier's run:
# (method, the options it sets, label). QAFT at 4 epochs of mini-batches of 4 sequences: at the cpu tier each
# weight then sees 32 steps x 4 sequences per lr0, block PTQ's budget per block (`repro run --method qaft
# --bits 4 --option epochs=4 --option batch_size=4`).
CONTROLS = [("qaft", {"epochs": 4, "batch_size": 4}, "QAFT (4 epochs × 4 seq/step)")]


def method_label(record) -> str:
    """RTN, GPTQ, QAFT, FP, the block-wise variant (block PTQ, MB-PTQ m=2, LA-PTQ l=1 ...), or a
    control's label (``CONTROLS``)."""
    config = record["config"]
    options = config.get("options") or {}
    for method, sets, label in CONTROLS:
        if config["method"] == method and all(options.get(k) == v for k, v in sets.items()):
            return label
    return describe(config).label


def training_budget(record) -> tuple[int, float] | None:
    """``(optimizer steps, sequences per weight)`` of a method that trains, None for one that does
    not (FP, RTN, GPTQ). Steps count every lr0 a fine-tuning tried (what it cost); sequences per
    weight is how many calibration sequences reached each trained weight's gradient in the run
    that produced the weights: the chosen lr0's steps x sequences per step for QAFT and FPFT, and
    for the block-wise methods, per block, the steps of each window holding it x the mini-batch
    (``config.batch_size``), averaged over the blocks."""
    config, info = record["config"], record.get("info") or {}
    if "runs" in info:  # QAFT, FPFT
        chosen = chosen_run(info)
        return sum(run["steps"] for run in info["runs"]), chosen["steps"] * info["batch_size"] * info["grad_accum"]
    if "windows" in info:  # block PTQ, MB-PTQ, LA-PTQ
        per_block = defaultdict(int)
        for w in info["windows"]:
            for block in w["blocks"]:
                per_block[block] += w["steps"] * config["batch_size"]
        return sum(w["steps"] for w in info["windows"]), sum(per_block.values()) / len(per_block)
    return None


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


def grid_of(record) -> str:
    """A record's scales: "per tensor" (the paper's), "per channel" or "g<group size>"."""
    from repro.quant import MAX_BITS, Grid

    c = record["config"]  # records from before the option: per tensor; FP: the per-tensor name
    return Grid(c["bits"] or MAX_BITS, c.get("granularity", "tensor"), c.get("group_size", Grid.group_size)).name


def grid_names(records) -> list[str]:
    order = {"per tensor": 0, "per channel": 1}
    return sorted({grid_of(r) for r in records if r["config"]["method"] != "fp"}, key=lambda g: (order.get(g, 2), g))
