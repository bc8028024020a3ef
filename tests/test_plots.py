"""repro.plots on synthetic records: the figures' panels, the Fig. 1 scatter's coordinates,
the damping panels with and without held-out losses, and the saved figure files."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from fake_records import LAYERS, fake_record, gptq_info, qaft_info, sweep_records

from repro import plots
from repro.studies import sweep

GRID = ["0.001", "0.01", "0.1", "1"]
NLL = {"fp": 3.0, "rtn": {8: 3.1, 4: 4.5}, "gptq": {8: 3.05, 4: 3.6}, "qaft": {8: 3.02, 4: 3.4}}
MSE_SCALE = {"rtn": 3.0, "gptq": 1.0, "qaft": 2.0}  # GPTQ lowest layer MSE, QAFT above it


def record(method, bits, model="m1", held_out=True):
    """``fake_record`` over the four ``LAYERS``: layer MSE = scale * 2^(-bits) * (1 + layer position)."""
    nll = NLL[method] if method == "fp" else NLL[method][bits] + (0.5 if model == "m2" else 0.0)
    scale = 0.0 if method == "fp" else MSE_SCALE[method] * 2.0 ** -bits
    info = {}
    if method == "gptq":
        # in-sample loss falls toward low damping; held-out loss is lowest at 0.1
        info = gptq_info([0.01, 0.1] * 2, GRID, lambda i, g: (1 + i) * (1 + float(g)),
                         (lambda i, g: (1 + i) * (2 + abs(np.log10(float(g)) + 1))) if held_out else None)
    if method == "qaft":
        info = qaft_info(NLL["rtn"][bits], {lr: (nll + lr, [nll + 0.1 / (e + 1) for e in range(3)])
                                            for lr in (1e-5, 1e-4)})
    return fake_record(method, bits, nll, val=nll + 0.01, model=model, info=info, weight_mse=scale,
                       layer_mse=[scale * (1 + i) for i in range(len(LAYERS))])


def records(model="m1", qaft_bits=(8, 4)):
    return [r for r in sweep_records(record, model=model)
            if r["config"]["method"] != "qaft" or r["config"]["bits"] in qaft_bits]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def dots(ax):
    """{legend label: scatter offsets} of an axes' scatter collections."""
    return {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}


def test_scatter_layout_and_nll_dots():
    rs = records("m1") + records("m2", qaft_bits=(8,))  # m2 has no QAFT int4
    fig = plots.misalignment_scatter(rs)
    assert isinstance(fig, Figure)
    axes = np.array(fig.axes).reshape(3, 2)  # rows: test NLL, layer MSE fp inputs, own inputs
    assert "m1" in axes[0, 0].get_title() and "m2" in axes[0, 1].get_title()
    assert axes[1, 0].get_title() == "layer MSE, FP inputs (paper eq. 2)"
    assert axes[2, 0].get_title() == "layer MSE, own inputs"
    assert axes[0, 0].get_xlabel().startswith("GPTQ") and axes[0, 0].get_ylabel().startswith("QAFT")
    for model, ax, bits in (("m1", axes[0, 0], (8, 4)), ("m2", axes[0, 1], (8,))):
        shift = 0.5 if model == "m2" else 0.0
        points = dots(ax)
        assert set(points) == {f"int{b}" for b in bits} | {"FP"}
        assert np.allclose(points["FP"], [[NLL["fp"], NLL["fp"]]])
        for b in bits:
            gptq, qaft, rtn = (NLL[m][b] + shift for m in ("gptq", "qaft", "rtn"))
            assert np.allclose(points[f"int{b}"], [[gptq, qaft]])
            line = next(ln for ln in ax.lines if ln.get_label() == f"_rtn int{b}")
            assert np.allclose(np.c_[line.get_xdata(), line.get_ydata()], [[gptq, qaft], [rtn, rtn]])
            dot = next(c for c in ax.collections if c.get_label() == f"int{b}")
            assert matplotlib.colors.same_color(line.get_color(), dot.get_facecolor()[0])
        assert ax.get_xlim() == ax.get_ylim()
        diagonal = ax.lines[-1]  # gray identity across the whole panel
        assert np.allclose(diagonal.get_xdata(), ax.get_xlim()) and np.allclose(diagonal.get_ydata(), ax.get_xlim())
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["int8", "int4", "FP"]


def test_scatter_layer_rows_one_dot_per_layer():
    fig = plots.misalignment_scatter(records())
    axes = np.array(fig.axes).reshape(3, 1)
    for row, key in ((1, "layer_mse_fp_inputs"), (2, "layer_mse")):
        ax = axes[row, 0]
        assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_xlim() == ax.get_ylim()
        points = dots(ax)
        assert set(points) == {"int8", "int4"}  # no FP dot: its layer MSE is zero
        for b in (8, 4):
            expected = [[record("gptq", b)[key][n], record("qaft", b)[key][n]] for n in LAYERS]
            assert np.allclose(points[f"int{b}"], expected)
            assert (points[f"int{b}"][:, 1] > points[f"int{b}"][:, 0]).all()  # QAFT above the diagonal


def test_scatter_column_without_pair_is_empty_with_note():
    rs = records("m1") + [r for r in records("m2") if r["config"]["method"] != "qaft"]
    axes = np.array(plots.misalignment_scatter(rs).axes).reshape(3, 2)
    for ax in axes[:, 1]:
        assert not ax.collections and not ax.lines
        assert any("no GPTQ/QAFT pair" in t.get_text() for t in ax.texts)
    assert dots(axes[0, 0])


def test_misalignment_three_rows_on_test_nll():
    rs = records()
    del rs[1]["mean_layer_mse_fp_inputs"]  # an old RTN record still draws
    fig = plots.misalignment(rs)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    ax_nll, ax_fp, ax_own = fig.axes
    assert "test NLL" in ax_nll.get_ylabel() and "FP inputs" in ax_fp.get_ylabel()
    gptq = next(ln for ln in ax_nll.lines if ln.get_label() == "gptq")
    assert np.allclose(gptq.get_xdata(), [4, 8]) and np.allclose(gptq.get_ydata(), [NLL["gptq"][4], NLL["gptq"][8]])
    rtn_fp = next(ln for ln in ax_fp.lines if ln.get_label() == "rtn")
    assert np.isnan(rtn_fp.get_ydata()[1]) and np.isfinite(rtn_fp.get_ydata()[0])
    qaft_own = next(ln for ln in ax_own.lines if ln.get_label() == "qaft")
    assert np.allclose(qaft_own.get_ydata(), [record("qaft", b)["mean_layer_mse"] for b in (4, 8)])


def test_damping_plot_panels_and_normalised_losses():
    old = record("gptq", 4, held_out=False)
    fig = plots.damping_plot([record("gptq", 8), old])
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    ax, ax_hist, ax_loss = fig.axes
    assert np.allclose(ax_hist.lines[0].get_ydata(), [0, 2, 2, 0])  # two layers chose 0.01, two 0.1
    held, insample, old_insample = ax_loss.lines[:3]  # the new record draws both, the old one in-sample only
    assert held.get_linestyle() == "-" and insample.get_linestyle() == old_insample.get_linestyle() == "--"
    assert len(ax_loss.lines) == 3
    assert np.allclose(held.get_xdata(), [float(g) for g in GRID])
    # held-out loss (1+i)(2+|log10 g + 1|) / (1+i)*2: minimum 1 at g = 0.1
    assert np.allclose(held.get_ydata(), [2.0, 1.5, 1.0, 1.5])
    # in-sample (1+i)(1+g) / (1+i)*2: falls toward low damping, below the held-out minimum
    assert np.allclose(insample.get_ydata(), [(1 + float(g)) / 2 for g in GRID])
    assert np.allclose(old_insample.get_ydata(), [(1 + float(g)) / 1.001 for g in GRID])


def test_save_figures_writes_pngs_and_svgs_within_their_edges(tmp_path):
    paths = plots.save_drawn(sweep.record_figures(records(), "_t"), tmp_path / "figs")
    names = {p.name for p in paths}
    assert {"misalignment_t.png", "misalignment_scatter_t.png", "damping_t.png"} <= names
    for p in paths:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in p.with_suffix(".svg").read_bytes()[:2000]  # the vector copy, for papers
    # Fig. 1's scatter of one model at the five widths: its legend (above the one panel column) fits
    # within the figure's width, not clipped at the left edge
    five = records() + [{**r, "config": {**r["config"], "bits": b}} for b in (6, 3, 2)
                        for r in records() if r["config"]["bits"] == 8]
    figure = sweep.record_figures(five, "_t")["misalignment_scatter_t"]()
    figure.canvas.draw()
    legend = figure.legends[0].get_window_extent()
    assert legend.x0 >= 0 and legend.x1 <= figure.bbox.width
    plt.close(figure)
    without_qaft = plots.save_drawn(sweep.record_figures([r for r in records() if r["config"]["method"] != "qaft"]),
                                    tmp_path / "b")
    assert "misalignment_scatter.png" not in {p.name for p in without_qaft}
