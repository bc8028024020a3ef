"""repro.plots on synthetic records: the figures' panels, the Fig. 1 scatter's coordinates,
the damping panels with and without held-out losses, and save_figures' files."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from repro import plots

LAYERS = [f"model.layers.{b}.{n}" for b in range(2) for n in ("self_attn.q_proj", "mlp.up_proj")]
GRID = ["0.001", "0.01", "0.1", "1"]
NLL = {"fp": 3.0, "rtn": {8: 3.1, 4: 4.5}, "gptq": {8: 3.05, 4: 3.6}, "qaft": {8: 3.02, 4: 3.4}}
MSE_SCALE = {"rtn": 3.0, "gptq": 1.0, "qaft": 2.0}  # GPTQ lowest layer MSE, QAFT above it


def record(method, bits, model="m1", held_out=True):
    """A record of the new schema; layer MSE = scale * 2^(-bits) * (1 + layer position)."""
    nll = NLL[method] if method == "fp" else NLL[method][bits] + (0.5 if model == "m2" else 0.0)
    scale = 0.0 if method == "fp" else MSE_SCALE[method] * 2.0 ** -bits
    mse = {n: scale * (1 + i) for i, n in enumerate(LAYERS)}
    fp_mse = {n: v / 2 for n, v in mse.items()}
    r = {"config": {"method": method, "bits": bits, "observer": "mse", "model": model},
         "nll_validation": nll + 0.01, "nll_test": nll,
         "layer_mse": mse, "mean_layer_mse": np.mean(list(mse.values())),
         "layer_mse_fp_inputs": fp_mse, "mean_layer_mse_fp_inputs": np.mean(list(fp_mse.values())),
         "weight_mse": scale, "info": {}}
    if method == "gptq":
        # in-sample loss falls toward low damping; held-out loss is lowest at 0.1
        r["info"]["layers"] = {n: {"damping": 0.1 if i % 2 else 0.01,
                                   "losses": {g: (1 + i) * (1 + float(g)) for g in GRID},
                                   **({"held_out_losses": {g: (1 + i) * (2 + abs(np.log10(float(g)) + 1))
                                                           for g in GRID}} if held_out else {})}
                               for i, n in enumerate(LAYERS)}
    if method == "qaft":
        r["info"] = {"lr": 1e-4, "rtn": {"nll_validation": NLL["rtn"][bits]},
                     "runs": [{"lr": lr, "best_nll_validation": nll + lr,
                               "history": [{"epoch": e, "nll_test": nll + 0.1 / (e + 1)} for e in range(3)]}
                              for lr in (1e-5, 1e-4)]}
    return r


def records(model="m1", qaft_bits=(8, 4)):
    return ([record("fp", None, model)] + [record(m, b, model) for m in ("rtn", "gptq") for b in (8, 4)]
            + [record("qaft", b, model) for b in qaft_bits])


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


def test_save_figures_writes_pngs(tmp_path):
    paths = plots.save_figures(records(), tmp_path / "figs", suffix="_t")
    names = {p.name for p in paths}
    assert {"misalignment_t.png", "misalignment_scatter_t.png", "damping_t.png"} <= names
    for p in paths:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    without_qaft = plots.save_figures([r for r in records() if r["config"]["method"] != "qaft"], tmp_path / "b")
    assert "misalignment_scatter.png" not in {p.name for p in without_qaft}
