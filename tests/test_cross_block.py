"""The cross-block study on fake records and a tiny model: locality order, the spectrum, summary,
memory and sweep tables, the time growth law, the plots, the configs, the batch plan, block-output MSE."""
import math
import random

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from repro import analysis, batch, evaluate, models, plots
from repro.config import RunConfig, load_tier
from repro.studies import cross_block

from fake_records import fake_record, table_rows
from tiny_models import tiny_model

# label -> blockwise options (None: not block-wise), in locality order
SPECTRUM = {"RTN": None, "GPTQ": None, "block PTQ": {"window": 1}, "MB-PTQ m=2": {"window": 2},
            "MB-PTQ m=2 (equal steps/block)": {"window": 2, "steps_per": "block"},
            "LA-PTQ l=1": {"lookahead": 1}, "LA-PTQ l=2": {"lookahead": 2}, "QAFT": None}


def memory(window_weights=4000, lookahead_weights=0, optimizer_state=8000, saved_activations=1000, cuda_peak=None):
    return {"window_weights": window_weights, "lookahead_weights": lookahead_weights, "optimizer_state": optimizer_state,
            "saved_activations": saved_activations, "cuda_peak": cuda_peak}


def window(start=0, m=1, l=0, steps=8, wall_s=1.0, params=1000, **mem):
    """One entry of ``info["windows"]`` as ``repro.methods.blockwise.blockwise`` records it."""
    return {"blocks": list(range(start, start + m)), "lookahead_stop": start + m + l, "window": m, "lookahead": l,
            "stride": m, "steps": steps, "trainable_params": params, "wall_s": wall_s,
            "memory_bytes": memory(window_weights=4 * params, optimizer_state=8 * params, **mem)}


def record(method, bits=3, nll=4.0, windows=None, layer_mse=(0.1, 0.2, 0.3), **kw):
    """``fake_record`` at int3 with three linears' MSE; a block-wise one's ``info`` names its variant and
    holds ``windows`` (default: one ``window()``)."""
    r = fake_record(method, bits, nll, layer_mse=layer_mse, **kw)
    if method == "blockwise":
        from repro.methods.blockwise import variant

        r["info"] = {"variant": variant(r["config"]["options"]), "windows": [window()] if windows is None else windows}
    return r


def spectrum_records(bits=3, model="m"):
    """One record per SPECTRUM label; test NLL falls along the spectrum, QAFT lowest."""
    out = [record("fp", nll=3.0, model=model, block_mse=0.0)]
    for i, (label, options) in enumerate(SPECTRUM.items()):
        method = label.lower() if options is None else "blockwise"
        out.append(record(method, bits, nll=6.0 - 0.25 * i, model=model, options=options, block_mse=1.0 + i,
                          seconds=10.0 * (i + 1)))
    return out


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ----------------------------------------------------------------------------- report
def test_locality_orders_the_spectrum_and_labels_it():
    recs = spectrum_records()
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    assert [analysis.method_label(r) for r in sorted(shuffled, key=analysis.locality)] == ["FP", *SPECTRUM]
    assert [analysis.method_label(r) for r in analysis.spectrum_records(shuffled, 3)] == list(SPECTRUM)  # no FP
    assert analysis.spectrum_records(shuffled, 4) == [] and analysis.spectrum_records(shuffled, 3, model="other") == []
    sees = {analysis.method_label(r): analysis.sees(r) for r in recs}
    assert sees["RTN"] == "one weight tensor" and sees["GPTQ"] == "one linear layer"
    assert sees["QAFT"] == "whole network (NLL)" and sees["block PTQ"] == "1 block"
    assert sees["MB-PTQ m=2"] == "2 blocks" and sees["LA-PTQ l=2"] == "1 block + 2 FP downstream"


def test_median_layer_mse():
    assert analysis.median_layer_mse(record("rtn", layer_mse=(3.0, 1.0, 2.0)), "layer_mse") == 2.0
    assert analysis.median_layer_mse(record("rtn", layer_mse=(4.0, 1.0, 3.0, 2.0)), "layer_mse") == 2.5
    assert analysis.median_layer_mse(record("rtn", layer_mse=(4.0, 1.0, 3.0, 2.0))) == 1.25  # FP inputs: / 2
    assert analysis.median_layer_mse(record("rtn", layer_mse=())) is None
    assert analysis.median_layer_mse({"config": {}}) is None


def test_spectrum_table():
    table = cross_block.spectrum_table(spectrum_records() + spectrum_records(model="other"), 3, model="m")
    body, header = table_rows(table)
    assert [r[0] for r in body] == list(SPECTRUM)
    cells = {r[0]: dict(zip(header, r)) for r in body}
    assert cells["QAFT"]["test NLL"] == "**4.250**" and cells["RTN"]["test NLL"] == "6.000"
    assert sum("**" in r[header.index("test NLL")] for r in body) == 1
    assert cells["LA-PTQ l=1"]["objective sees"] == "1 block + 1 FP downstream"
    assert cells["RTN"]["median layer MSE, FP inputs"] == "0.1" and cells["RTN"]["median layer MSE, own inputs"] == "0.2"
    assert cells["GPTQ"]["block-output MSE"] == "2" and cells["GPTQ"]["method s"] == "20"
    no_seconds, header = table_rows(cross_block.spectrum_table(spectrum_records(), 3, seconds=False))
    assert "method s" not in header and len(header) == 8 and all(len(r) == 8 for r in no_seconds)
    assert cross_block.spectrum_table(spectrum_records(), 4) == "No int4 records yet."


def test_training_budget_counts_steps_and_the_sequences_each_weight_saw():
    """QAFT: steps of every lr0 tried, sequences per weight of the chosen one; block-wise: every window's
    steps, and per block the steps of the windows holding it x the mini-batch (4 here), averaged."""
    qaft = record("qaft", options={"epochs": 1, "batch_size": 1},
                  info={"lr": 1e-3, "batch_size": 2, "grad_accum": 3,
                        "runs": [{"lr": 1e-4, "steps": 10}, {"lr": 1e-3, "steps": 8}]})
    assert analysis.training_budget(qaft) == (18, 8 * 2 * 3)
    block = record("blockwise", options={"window": 1}, windows=[window(i, 1, 0, 32) for i in range(3)])
    assert analysis.training_budget(block) == (96, 32 * 4)
    overlapping = record("blockwise", options={"window": 2, "stride": 1},
                         windows=[window(0, 2, 0, 10), window(1, 2, 0, 10)])  # block 1 in both windows
    assert analysis.training_budget(overlapping) == (20, (40 + 80 + 40) / 3)
    assert analysis.training_budget(record("gptq")) is None and analysis.training_budget(record("rtn")) is None
    body, header = table_rows(cross_block.spectrum_table([record("rtn"), qaft, block], 3))
    cells = {r[0]: dict(zip(header, r)) for r in body}
    assert (cells["RTN"]["optimizer steps"], cells["RTN"]["sequences per weight"]) == ("—", "—")
    assert (cells["QAFT"]["optimizer steps"], cells["QAFT"]["sequences per weight"]) == ("18", "48")
    assert (cells["block PTQ"]["optimizer steps"], cells["block PTQ"]["sequences per weight"]) == ("96", "128")


def test_qaft_at_the_blockwise_budget_is_named_apart_and_read_with_the_study(monkeypatch):
    control = record("qaft", options={"epochs": 4, "batch_size": 4, "lr_grid": [1e-3]})
    assert analysis.method_label(control) == "QAFT (4 epochs × 4 seq/step)"
    assert analysis.method_label(record("qaft", options={"epochs": 1, "batch_size": 1})) == "QAFT"
    assert analysis.locality(control) == analysis.locality(record("qaft"))  # the whole network's objective
    asked = []
    monkeypatch.setattr(cross_block, "read_records", lambda configs, outputs: asked.extend(configs) or [])
    cross_block.records("cpu", "smollm2-135m", None)
    qaft = [c for c in asked if c.method == "qaft"]
    assert [(c.bits, c.options["epochs"], c.options["batch_size"]) for c in qaft] == [(4, 1, 1), (4, 4, 4)]


def timed_records(a=0.1, k=0.8, steps=8):
    """Block-wise records whose windows take ``a (m + l)^k`` seconds per optimizer step."""
    t = lambda m, l: steps * a * (m + l) ** k  # noqa: E731
    return [record("blockwise", options={"window": 1}, windows=[window(i, 1, 0, steps, t(1, 0)) for i in range(3)]),
            record("blockwise", options={"window": 2}, windows=[window(0, 2, 0, steps, t(2, 0)), window(2, 1, 0, steps, t(1, 0))]),
            record("blockwise", options={"window": 4}, windows=[window(0, 4, 0, steps, t(4, 0))]),
            record("blockwise", options={"lookahead": 2}, windows=[window(0, 1, 2, steps, t(1, 2)), window(2, 1, 0, 0, 5.0)]),
            record("gptq")]


def test_window_times_and_growth_law():
    recs = timed_records()
    points = analysis.window_times(recs)
    assert len(points) == 7  # the window with 0 steps is left out
    assert sorted({n for n, _ in points}) == [1, 2, 3, 4]
    assert all(math.isclose(t, 0.1 * n ** 0.8) for n, t in points)
    a, k = analysis.growth_law(recs)
    assert a == pytest.approx(0.1, rel=1e-9) and k == pytest.approx(0.8, rel=1e-9)
    a, k = analysis.growth_law(timed_records(a=2.0, k=1.5, steps=3))
    assert a == pytest.approx(2.0, rel=1e-9) and k == pytest.approx(1.5, rel=1e-9)
    summary = cross_block.growth_summary(recs)
    assert "0.1 s × (m + l)^0.80" in summary and "fit over 7 windows" in summary
    single = [timed_records()[0]]  # block PTQ only: one size
    assert analysis.growth_law(single) is None and analysis.growth_law([]) is None
    assert cross_block.growth_summary(single).startswith("Fewer than two window sizes")


def cell(block, others, model="m", bits=3):
    """Block PTQ at 4.0 and block-wise ``others`` {options-label: (nll, block mse)}, RTN/GPTQ/QAFT around."""
    recs = [record("fp", nll=3.0, model=model),
            record("blockwise", bits, 4.0, model=model, options={"window": 1}, block_mse=block)]
    recs += [record("blockwise", bits, nll, model=model, options=opts, block_mse=mse)
             for opts, (nll, mse) in others]
    recs += [record(method, bits, nll, model=model, block_mse=mse)
             for method, nll, mse in (("rtn", 6.0, 9.0), ("gptq", 5.0, 5.0), ("qaft", 3.7, 3.0))]
    return recs


def test_cross_block_summary_verdicts_and_agreement():
    others = [({"lookahead": 1}, (4.2, 2.0)), ({"window": 2}, (3.8, 1.5)),  # 5% worse, 5% better
              ({"window": 2, "steps_per": "block"}, (4.02, 1.2))]  # 0.5% worse
    text = cross_block.cross_block_summary(cell(1.0, others))
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("- m int3: block PTQ 4.000; ")
    assert "MB-PTQ m=2 3.800 (Δ -0.200: helps)" in lines[0]
    assert "MB-PTQ m=2 (equal steps/block) 4.020 (Δ +0.020: no effect (within 1%))" in lines[0]
    assert "LA-PTQ l=1 4.200 (Δ +0.200: hurts)" in lines[0]
    assert lines[0].index("MB-PTQ m=2 3.800") < lines[0].index("(equal steps/block)") < lines[0].index("LA-PTQ")
    assert "RTN" not in lines[0] and "GPTQ" not in lines[0]  # the block-wise variants and QAFT against block PTQ
    assert lines[0].endswith("; QAFT 3.700 (Δ -0.300: lower).")
    assert lines[1] == ("  Lowest test NLL: QAFT (3.700); lowest block-output MSE: block PTQ (1) — "
                        "**not** the same method.")
    agree = cross_block.cross_block_summary(cell(4.0, [(o, (nll, mse + 3)) for o, (nll, mse) in others]))
    # (with the others' block MSE + 3, QAFT's 3.0 is the lowest)
    assert agree.splitlines()[1].endswith("lowest block-output MSE: QAFT (3) — the same method.")
    no_mse = cross_block.cross_block_summary([r | {"mean_block_output_mse": None} for r in cell(1.0, others)])
    assert no_mse.splitlines()[1] == "  Lowest test NLL: QAFT (3.700)."
    assert cross_block.cross_block_summary([]) == "No block-wise records yet."


def test_cross_block_summary_cells_in_order():
    recs = cell(1.0, [], model="b", bits=3) + cell(1.0, [], model="b", bits=4) + cell(1.0, [], model="a", bits=3)
    heads = [line for line in cross_block.cross_block_summary(recs).splitlines() if line.startswith("- ")]
    assert [h.split(":")[0] for h in heads] == ["- a int3", "- b int4", "- b int3"]  # model, then bits high to low


def test_memory_table():
    big = dict(params=2_000_000, saved_activations=12_345_678, lookahead_weights=3_000_000)
    recs = [record("blockwise", options={"lookahead": 1}, windows=[window(0, 1, 1, **big), window(1, 1, 0, params=10)]),
            record("blockwise", options={"window": 1}, windows=[window(0, params=5000, cuda_peak=50_000_000),
                                                                 window(1, params=500_000, cuda_peak=7_000_000)]),
            record("qaft")]
    body, header = table_rows(cross_block.memory_table(recs))
    assert [r[0] for r in body] == ["block PTQ int3", "LA-PTQ l=1 int3"]  # locality order, QAFT left out
    la = dict(zip(header, body[1]))
    # predicted = 2 x 8 MB weights + 16 MB Adam + 12.3 MB saved = 44.3 MB
    assert (la["window params"], la["weights MB"], la["Adam MB"], la["autograd saved MB"], la["look-ahead MB"],
            la["predicted peak MB"], la["CUDA peak MB"]) == ("2000000", "8.0", "16.0", "12.3", "3.0", "44.3", "—")
    block = dict(zip(header, body[0]))  # the largest window, not the first
    assert (block["window params"], block["predicted peak MB"], block["CUDA peak MB"]) == ("500000", "8.0", "7.0")
    assert cross_block.memory_table([record("rtn")]) == "No block-wise records yet."


def test_blockwise_sweep_table():
    sweep = [({"steps": 64, "lr": 1e-3}, 4.30), ({"steps": 8, "lr": 1e-4}, 4.50),
             ({"steps": 8, "lr": 1e-3, "mixed_precision": "bf16"}, 4.20), ({"steps": 8, "lr": 1e-3}, 4.40)]
    recs = [record("blockwise", options=o, val=v, nll=v - 0.4, seconds=s) for s, (o, v) in enumerate(sweep)]
    body, header = table_rows(cross_block.blockwise_sweep_table(recs + [record("gptq", val=4.0)]))
    assert header[:6] == ["variant", "bits", "steps per window", "lr", "training precision", "validation NLL"]
    # fp32 before bf16, then by steps and lr
    assert [r[2:6] for r in body] == [["8", "0.0001", "fp32", "4.500"], ["8", "0.001", "fp32", "4.400"],
                                      ["64", "0.001", "fp32", "4.300"], ["8", "0.001", "bf16", "**4.200**"]]
    assert body[3][:2] == ["block PTQ", "int3"] and body[3][6:] == ["3.800", "2"]
    # a record that leaves steps/lr to the method's defaults is read with them
    (row,), _ = table_rows(cross_block.blockwise_sweep_table([record("blockwise", options={"window": 2}, val=4.0)]))
    assert row[:4] == ["MB-PTQ m=2", "int3", "64", "0.0001"]
    assert cross_block.blockwise_sweep_table([record("gptq")]) == "No block-wise sweep records."


def test_the_variants_are_read_at_the_lr_block_ptq_chose_on_validation(monkeypatch):
    """Gemma 3's block PTQ at lr 1e-4 has the lowest validation NLL of its lr runs: the study reads every
    block-wise variant (and the equal-steps control) at 1e-4; a model with only the tier's run keeps 1e-3."""
    validation = {1e-4: 5.2, 3e-4: 5.6, 1e-3: 9.9}
    asked = []

    def read(configs, outputs):
        asked.extend(configs)
        return [record("blockwise", bits=c.bits, model=c.model, options=c.options, val=validation[c.options["lr"]])
                for c in configs if c.method == "blockwise" and c.options.get("window") == 1
                and not c.options.get("lookahead") and c.options["lr"] in validation
                and (c.model == "gemma3-270m" or c.options["lr"] == 1e-3)]
    monkeypatch.setattr(cross_block, "read_records", read)
    assert cross_block.chosen_lr("cpu", "gemma3-270m", None) == 1e-4
    assert cross_block.chosen_lr("cpu", "smollm2-135m", None) == 1e-3
    asked.clear()
    cross_block.records("cpu", "gemma3-270m", None)
    variants = [c for c in asked if c.method == "blockwise" and c.model == "gemma3-270m"][-4:]  # after chosen_lr's
    assert [c.options["lr"] for c in variants] == [1e-4] * 4
    assert {(c.options.get("window", 1), c.options.get("lookahead", 0), c.options.get("steps_per", "window"))
            for c in variants} == {(1, 0, "window"), (2, 0, "window"), (1, 1, "window"), (2, 0, "block")}
    assert "block-wise lr 0.0001" in cross_block.sections("cpu", None)["spectrum-gemma3-270m"]


def test_a_learning_rate_sweep_of_another_model_gets_its_own_section(monkeypatch):
    """Block PTQ at several lr on Gemma 3 (cpu tier): ``blockwise-sweep-gemma3-270m``; SmolLM2, with only
    its default run, gets no sweep section."""
    def read(configs, outputs):
        return [record("blockwise", bits=c.bits, model=c.model, options=c.options, val=4.0 + c.options["lr"])
                for c in configs if c.method == "blockwise" and c.options.get("window") == 1
                and not c.options.get("lookahead") and c.options.get("mixed_precision") != "no"
                and (c.model == "gemma3-270m" or c.options["lr"] == 1e-3)]
    monkeypatch.setattr(cross_block, "read_records", read)
    found = cross_block.sections("cpu", None)
    assert "blockwise-sweep" not in found and "blockwise-sweep-gemma3-270m" in found
    body, header = table_rows(found["blockwise-sweep-gemma3-270m"].split("\n\n")[0])
    assert [row[header.index("lr")] for row in body] == ["3e-05", "0.0001", "0.0003", "0.001", "0.003"]


# ----------------------------------------------------------------------------- plots
@pytest.mark.filterwarnings("ignore:No artists with labels")  # the empty spectrum's legend
def test_spectrum_plot():
    fig = plots.spectrum(spectrum_records() + spectrum_records(model="other"), 3, model="m")
    assert isinstance(fig, Figure)
    top, bottom = fig.axes
    ticks = [t.get_text() for t in bottom.get_xticklabels()]
    assert [t.split("\n")[0] for t in ticks] == list(SPECTRUM)
    assert ticks[2] == "block PTQ\n(1 block)"
    assert list(top.lines[0].get_ydata()) == [6.0 - 0.25 * i for i in range(len(SPECTRUM))]
    assert top.lines[1].get_ydata()[0] == 3.0  # FP, dashed
    assert len(bottom.lines) == 3  # median layer MSE in both readings, block-output MSE
    empty = plots.spectrum([], 3)
    assert isinstance(empty, Figure) and empty.axes[1].get_xticklabels() == []


def test_window_time_plot():
    fig = plots.window_time(timed_records())
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    points, fit = ax.lines
    assert len(points.get_xdata()) == 7 and fit.get_xdata()[0] == 1 and fit.get_xdata()[-1] == pytest.approx(4)
    assert fit.get_ydata()[-1] == pytest.approx(0.1 * 4 ** 0.8)
    assert len(plots.window_time([timed_records()[0]]).axes[0].lines) == 1  # one size: points, no fit
    _, ax = plt.subplots()
    assert plots.window_time([], ax=ax) is ax.figure and len(ax.lines) == 0


# ----------------------------------------------------------------------------- configs and batch plan
def test_cross_block_configs_ci():
    tier = load_tier("ci")
    configs = cross_block.configs("ci")
    assert [c.method for c in configs] == ["fp", "rtn", "gptq", "qaft"] + ["blockwise"] * len(tier["cross_block"]["variants"])
    assert {c.model for c in configs} == {tier["model"]} and {c.bits for c in configs} == {None, 3}
    assert [c.label() for c in configs[4:]] == ["block PTQ int3", "MB-PTQ m=2 int3", "LA-PTQ l=1 int3"]
    for c, v in zip(configs[4:], tier["cross_block"]["variants"]):
        assert c.options == {**tier["methods"]["blockwise"], **v} and c.tier == "ci"
    two = cross_block.configs("ci", "gemma3-270m", bits=[4, 3])
    assert [(c.method, c.bits) for c in two[:7]] == [("fp", None), ("rtn", 4), ("rtn", 3), ("gptq", 4), ("gptq", 3),
                                                      ("qaft", 4), ("qaft", 3)]
    assert [c.label() for c in two[7:]] == [f"{v} int{b}" for b in (4, 3) for v in ("block PTQ", "MB-PTQ m=2", "LA-PTQ l=1")]
    assert two[8].observer == "mse" and two[8].model == "gemma3-270m"  # gemma's int4 observer (smollm2: histogram)
    own = cross_block.configs("ci", bits=4, variants=[{"window": 3, "steps": 2}])
    assert [c.label() for c in own] == ["fp", "rtn int4", "gptq int4", "qaft int4", "MB-PTQ m=3 int4"]
    assert own[-1].options["steps"] == 2 and own[-1].options["lr"] == tier["methods"]["blockwise"]["lr"]


def test_run_config_labels():
    label = lambda **o: RunConfig(method="blockwise", bits=3, options=o).label()  # noqa: E731
    assert label(window=2) == "MB-PTQ m=2 int3" and label() == "block PTQ int3" and label(lookahead=1) == "LA-PTQ l=1 int3"
    assert label(window=2, steps_per="block") == "MB-PTQ m=2 (equal steps/block) int3"
    assert RunConfig(method="rtn", bits=4).label() == "rtn int4" and RunConfig(method="fp").label() == "fp"


def test_batch_plan_groups_by_model_and_pareto_last():
    jobs = batch.plan("ci")
    models_ = load_tier("ci")["models"]
    cross = [j for j in jobs if j.notebook == "04_cross_block"]
    assert [j.model for j in cross] == models_
    for j in cross:
        assert {c.model for c in j.configs} == {j.model} and "blockwise" in {c.method for c in j.configs}
    per_model = [j.model for j in jobs if j.model is not None]
    assert per_model == sorted(per_model, key=models_.index)  # all of the first model's jobs, then the second's
    pareto = [i for i, j in enumerate(jobs) if j.notebook == "02_pareto"]
    assert len(pareto) == 1 and jobs[pareto[0]].model is None
    assert pareto[0] > max(i for i, j in enumerate(jobs) if j.model is not None)


# ----------------------------------------------------------------------------- block-output MSE
def test_block_outputs_and_recording_block_mse():
    model = tiny_model("llama", layers=2, hidden=32)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    reference = evaluate.block_outputs(model, ids, batch_size=2, desc=None)
    assert len(reference) == 2 and [len(batch_) for batch_ in reference] == [2, 2]  # mini-batches x blocks
    assert reference[0][0].shape == (2, 16, 32) and reference[1][1].shape == (1, 16, 32)
    assert reference[0][0].dtype == torch.float32
    stored = sum(t.numel() * t.element_size() for batch_ in reference for t in batch_)
    assert evaluate.hidden_bytes(model, ids) == 4 * 2 * ids.numel() * 32 == stored
    with evaluate.recording_block_mse(model, reference) as mse:
        evaluate.nll(model, ids, batch_size=2, desc=None)
    assert mse == [0.0, 0.0]
    with torch.no_grad():
        models.blocks(model)[1].mlp.down_proj.weight[0, 0] += 1.0
    with evaluate.recording_block_mse(model, reference) as mse:
        evaluate.nll(model, ids, batch_size=2, desc=None)
    assert mse[0] == 0.0 and mse[1] > 0
