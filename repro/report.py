"""Markdown plumbing for the README and the notebooks: cell formats, tables, provenance lines,
the table every notebook shows whatever the CPU (``portable_table``), the main job's time table,
and ``update_markdown`` (writes tables between ``<!-- report:NAME -->`` markers).

Each study's own tables live in its module (``repro.studies``); record derivations that tables and
figures share in ``repro.analysis``. Units: NLL in nats/token (3 decimals), layer MSE in squared
activation units (3 significant digits), times in seconds. Layer MSEs are measured on the test
split, in two readings: ``mean_layer_mse_fp_inputs`` (each layer fed the FP model's inputs, the
paper's eq. 2) and ``mean_layer_mse`` (fed the quantized model's own inputs).
"""
from __future__ import annotations

import math
import re

from repro.analysis import grid_of, locality, method_label


MSE_READINGS = (("FP inputs", "mean_layer_mse_fp_inputs"), ("own inputs", "mean_layer_mse"))


DASH = "—"


def nll_cell(x) -> str:
    return DASH if x is None else f"{x:.3f}"


def g_cell(x) -> str:
    return DASH if x is None else f"{x:.3g}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header, rows) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)])


def seconds_cell(r) -> str:
    return DASH if r is None or not r.get("wall_s") else f"{r['wall_s']['method']:.0f}"


def bold_min(values, fmt=nll_cell):
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
        nll = nll_cell(r["nll_test"]) if c["method"] in PORTABLE_METHODS else "(CPU-dependent)"
        rows.append([c["model"], c["corpus"], DASH if c["method"] == "fp" else f"{grid_of(r)}, {c['observer']}",
                     DASH if c["bits"] is None else f"int{c['bits']}", method_label(r), nll, ", ".join(checks)])
    return markdown_table(["model", "corpus", "scales", "bits", "method", "test NLL", "checks"], rows)


def wall_s(jobs_runs_s, jobs_execute_s, workers_wall: float | None) -> float:
    """A batch's wall seconds: with worker processes (``repro batch --processes``), their wall time
    instead of the runs' seconds summed over them; plus executing the notebooks."""
    return (sum(jobs_runs_s) if workers_wall is None else workers_wall) + sum(jobs_execute_s)


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
    workers_wall = summary.get("workers_wall_s")
    total = wall_s([j["runs_s"] for j in summary["jobs"]], [j["execute_s"] for j in summary["jobs"]], workers_wall)
    if workers_wall is not None:  # the runs' minutes above are summed over the processes that computed them at once
        rows.append([f"runs, wall ({summary['processes']} processes at once)", "", "", "", f"{workers_wall / 60:.1f}", "",
                     f"{workers_wall / 60:.1f}"])
    rows.append(["**total**", "", "", sum(r[3] for r in rows if isinstance(r[3], int)), "", "", f"**{total / 60:.1f}**"])
    if extra:
        rows.append(["**total of today's main job**", "", "", "", "", "", f"**{(total - extra) / 60:.1f}**"])
    return (markdown_table(["notebook", "model", "status", "runs computed", "runs min", "execute min", "total min"], rows)
            + f"\n\n*From `{summary['tier']}/batch.json` ({summary['created']}, code {summary['code']}, "
              f"{summary['cached']} runs cached at the start).*")


def provenance(records, tier: str, command: str) -> str:
    """One italic line: tier, model(s), the distinct code hashes of ``records`` and the command."""
    models = sorted({r["config"]["model"] for r in records}) or ["none"]
    codes = sorted({(r.get("versions") or {}).get("code") or "unknown" for r in records}) or ["none"]
    return (f"*Generated from {len(records)} records by `{command}`: tier {tier}, model {', '.join(models)}, "
            f"code {', '.join(codes)}.*")


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
