"""Paper Fig. 2 on hand-made records: the Pareto front's dominance and ties, the points' weight
sizes (FP at 16 bits), the table and summary (with a method missing), and the plots' symbols."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from fake_records import fake_record, sweep_records, table_dict

from repro import analysis, plots
from repro.studies import pareto, sweep

STACK = {"small": 80_000_000, "large": 400_000_000}
# test NLL per model, method, bits (FP: bits None); QAFT below GPTQ everywhere, gap larger at int3
NLL = {"small": {"fp": {None: 3.50}, "rtn": {8: 3.60, 3: 6.00}, "gptq": {8: 3.55, 3: 5.00},
                 "qaft": {8: 3.52, 3: 4.40}},
       "large": {"fp": {None: 3.00}, "rtn": {8: 3.10, 3: 5.50}, "gptq": {8: 3.04, 3: 4.20},
                 "qaft": {8: 3.02, 3: 3.90}}}


def record(method, bits, model):
    nll = NLL[model][method][bits]
    return fake_record(method, bits, nll, val=nll + 0.1, model=model, stack_params=STACK[model],
                       weight_size_gb=123.0)  # stale on purpose: sizes come from stack_params and bits


def records(skip=()):
    return [r for model in NLL for r in sweep_records(record, (8, 3), model=model)
            if (model, r["config"]["method"], r["config"]["bits"]) not in skip]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def pt(size, nll, name="x"):
    return {"model": name, "method": "qaft", "bits": 4, "size_gb": size, "nll": nll}


def test_pareto_front_dominance_and_ties():
    a, b, c = pt(1, 5, "a"), pt(2, 4, "b"), pt(3, 4.5, "c")  # c: larger and worse than b
    assert analysis.pareto_front([c, b, a]) == [a, b]
    same_size_lower = pt(2, 3.9, "d")  # equal size, lower NLL wins
    assert analysis.pareto_front([a, b, same_size_lower]) == [a, same_size_lower]
    same_nll_smaller = pt(1.5, 4, "e")  # equal NLL, smaller size wins
    assert analysis.pareto_front([b, same_nll_smaller]) == [same_nll_smaller]
    tie = pt(2, 4, "twin")  # identical (size, NLL): both stay
    assert {p["model"] for p in analysis.pareto_front([a, b, tie, c])} == {"a", "b", "twin"}
    assert analysis.pareto_front([a]) == [a] and analysis.pareto_front([]) == []
    assert analysis.pareto_front([a, pt(0.5, float("nan"), "nan")]) == [a]


def test_pareto_points_sizes():
    points = {(p["model"], p["method"], p["bits"]): p for p in analysis.pareto_points(records())}
    fp = points[("small", "fp", 16)]
    assert fp["size_gb"] == pytest.approx(STACK["small"] * 16 / 8 / 1e9) and fp["nll"] == 3.50
    assert points[("large", "gptq", 3)]["size_gb"] == pytest.approx(STACK["large"] * 3 / 8e9)
    int4 = fake_record("gptq", 4, 4.0, model="small", stack_params=10**9)
    assert analysis.pareto_points([int4]) == [{"model": "small", "method": "gptq", "bits": 4, "size_gb": 0.5,
                                               "nll": 4.0, "record": int4}]
    assert analysis.pareto_points(records(), "nll_validation")[0]["nll"] == pytest.approx(3.60)
    no_size = {**record("rtn", 8, "small"), "stack_params": None}
    assert analysis.pareto_points([no_size]) == []


def test_pareto_table():
    rows, header = table_dict(pareto.pareto_table(records()), key=2, named=True)
    assert header[-2:] == ["GPTQ − QAFT [95% CI]", "on Pareto front"]
    assert list(rows) == [("small", "FP (16)"), ("small", "int8"), ("small", "int3"),
                          ("large", "FP (16)"), ("large", "int8"), ("large", "int3")]  # small stack first
    row = rows[("large", "int3")]
    assert (row["size GB"], row["RTN test NLL"], row["GPTQ test NLL"], row["QAFT test NLL"]) == \
        ("0.15", "5.500", "4.200", "3.900")
    # large int3 QAFT (0.15 GB, 3.90) is dominated by small int8 QAFT (0.08 GB, 3.52)
    assert row["GPTQ − QAFT [95% CI]"] == "+0.300" and row["on Pareto front"] == "—"
    # front: small QAFT int3 (0.03 GB), int8 (0.08), small FP (0.16), large QAFT int8 (0.4), large FP (0.8)
    assert [rows[k]["on Pareto front"] for k in rows] == ["FP", "QAFT", "QAFT", "FP", "QAFT", "—"]
    assert rows[("small", "FP (16)")]["RTN test NLL"] == "3.500" and rows[("small", "FP (16)")]["size GB"] == "0.16"


def test_pareto_summary():
    text = pareto.pareto_summary(records())
    assert "5 of 14 points, 2 model(s)): QAFT 3, FP 2." in text
    assert "small QAFT int3 (0.03 GB, 4.400), small QAFT int8 (0.08 GB, 3.520), small FP (0.16 GB, 3.500)" in text
    assert "- int3: +0.450 over 2 model(s) (small +0.600, large +0.300)" in text
    assert "- int8: +0.025 over 2 model(s) (small +0.030, large +0.020)" in text
    assert "QAFT is decidedly below GPTQ at every (model, bits) pair (4/4)." in text
    assert "The mean gap grows as bits fall" in text and "Missing" not in text


def test_pareto_summary_and_table_with_missing_method():
    recs = records(skip={("large", "qaft", 3), ("small", "fp", None)})
    text = pareto.pareto_summary(recs)
    assert "- int3: +0.600 over 1 model(s) (small +0.600)" in text
    assert "(3/3)" in text and "Missing records: small FP, large int3 QAFT." in text
    rows, _ = table_dict(pareto.pareto_table(recs), key=2, named=True)
    assert rows[("large", "int3")]["QAFT test NLL"] == "—" and rows[("large", "int3")]["GPTQ − QAFT [95% CI]"] == "—"
    assert ("small", "FP (16)") not in rows
    worse = records() + [{**record("qaft", 8, "large"), "nll_test": 3.10}]  # replaces large int8 QAFT
    assert "3/4 (model, bits) pairs; not at: large int8 (GPTQ below, -0.060)" in pareto.pareto_summary(worse)
    only_rtn = [r for r in records() if r["config"]["method"] in ("fp", "rtn")]
    assert "no gap to report" in pareto.pareto_summary(only_rtn)
    assert pareto.pareto_summary([]) == pareto.pareto_table([]) == "No records with a weight size yet."


def markers(ax):
    """{gid: Line2D} of the plot's lines (``model:method``, ``model:method:line``, ``model:fp``, ``front``)."""
    return {ln.get_gid(): ln for ln in ax.lines if ln.get_gid()}


def test_pareto_plot_symbols():
    fig = plots.pareto(records())
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "GB" in ax.get_xlabel() and "test NLL" in ax.get_ylabel()
    lines = markers(ax)
    rtn, gptq, qaft, fp = (lines[f"small:{m}"] for m in ("rtn", "gptq", "qaft", "fp"))
    assert rtn.get_marker() == "o" and rtn.get_markerfacecolor() == "none"  # hollow
    assert gptq.get_marker() == "s" and qaft.get_marker() == "o" and qaft.get_markerfacecolor() != "none"
    assert matplotlib.colors.same_color(fp.get_markerfacecolor(), "black")
    assert matplotlib.colors.same_color(rtn.get_markeredgecolor(), qaft.get_markerfacecolor())  # model colour
    assert not matplotlib.colors.same_color(lines["small:qaft"].get_markerfacecolor(),
                                            lines["large:qaft"].get_markerfacecolor())
    join = lines["large:qaft:line"]  # gray, ordered by size
    assert matplotlib.colors.same_color(join.get_color(), "gray") and list(join.get_xdata()) == sorted(join.get_xdata())
    assert np.allclose(qaft.get_xdata(), [STACK["small"] * b / 8e9 for b in (3, 8)])
    front = lines["front"]
    assert np.allclose(front.get_xdata(), [0.03, 0.08, 0.16, 0.4, 0.8])
    assert np.allclose(front.get_ydata(), [4.40, 3.52, 3.50, 3.02, 3.00])
    strips = [c for c in ax.collections if (c.get_gid() or "").startswith("large:strip")]
    assert {c.get_gid() for c in strips} == {"large:strip:8", "large:strip:3"}
    ys = strips[[c.get_gid() for c in strips].index("large:strip:3")].get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.min(), 3.90) and np.isclose(ys.max(), 4.20)  # spans QAFT to GPTQ
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["small", "large"] and {"RTN", "GPTQ", "QAFT", "FP (16-bit)", "Pareto front"} <= set(labels)


def test_pareto_plot_bits_filter_keeps_fp():
    ax = plots.pareto(records(), bits=3).axes[0]
    lines = markers(ax)
    assert np.allclose(lines["small:qaft"].get_xdata(), [0.03])
    assert "small:fp" in lines and "large:fp" in lines
    assert "int3" in ax.get_title()
    both = markers(plots.pareto(records(), bits=[8, 3]).axes[0])
    assert len(both["small:rtn"].get_xdata()) == 2


def test_pareto_gap_plot_and_save_figures(tmp_path):
    ax = plots.pareto_gap(records(skip={("large", "qaft", 3)})).axes[0]
    small, large = (ln for ln in ax.lines if ln.get_label() in ("small", "large"))
    assert list(small.get_xdata()) == [3, 8] and np.allclose(small.get_ydata(), [0.6, 0.03])
    assert list(large.get_xdata()) == [8] and ax.xaxis_inverted()
    rtn = [r for r in records() if r["config"]["method"] in ("fp", "rtn")]  # the other figures need more fields
    saved = plots.save_drawn(sweep.record_figures(rtn, "_t"), tmp_path)
    assert {p.name for p in saved} == {"nll_vs_bits_t.png", "pareto_t.png"}
    fp_only = [r for r in records() if r["config"]["method"] == "fp"]
    assert "pareto.png" not in {p.name for p in plots.save_drawn(sweep.record_figures(fp_only), tmp_path / "fp")}


def test_pareto_verdicts_use_the_paired_interval_when_records_have_windows():
    """With per-window test NLL, a gap counts only when its interval excludes 0: a noisy +0.02 is
    "not distinguishable", not "QAFT below"."""
    noisy = [0.5, -0.4, 0.45, -0.5]  # mean +0.0125 over the windows GPTQ and QAFT share
    recs = []
    for r in records():
        c = r["config"]
        base = [r["nll_test"]] * 4
        if c["method"] == "gptq" and c["bits"] == 8 and c["model"] == "large":
            r = {**r, "nll_test": r["nll_test"] - 0.02 + 0.0125}
            base = [x + e - 0.02 for x, e in zip(base, noisy)]
        recs.append({**r, "nll_test_windows": base, "windows": {"test": "w"}})
    text = pareto.pareto_summary(recs)
    assert "3/4 (model, bits) pairs; not at: large int8 (not distinguishable" in text
    rows, _ = table_dict(pareto.pareto_table(recs), key=2, named=True)
    assert rows[("small", "int3")]["GPTQ − QAFT [95% CI]"] == "**+0.600 [+0.600, +0.600]**"
