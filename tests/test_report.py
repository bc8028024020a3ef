"""repro.report on synthetic records: table cells, bold minima, the FP row, marker rewriting,
the test-split misalignment summary, and `repro report` end to end on ci-tier record paths."""
import pytest

from fake_records import fake_record, gptq_info, qaft_info, sweep_records, table_dict

from repro import cli, report, store
from repro.config import make_config
from repro.studies import datasets, landscape, sweep

# test NLL per method and bits; validation = test + 0.5 unless a test overrides it
METHODS_ALL = ("rtn", "gptq", "qaft")
TEST_NLL = {"rtn": {8: 3.111, 4: 5.222, 3: 7.333}, "gptq": {8: 3.055, 4: 4.444, 3: 6.066},
            "qaft": {8: 3.022, 4: 4.111, 3: 5.505}}
MSE = {"rtn": 0.0423, "gptq": 0.0122, "qaft": 0.0484}  # own inputs; FP inputs: / 2; per bit-width x 2^(8-b)


def record(method, bits=None, observer="minmax", code="abc123def456", **fields):
    """``fake_record`` with this module's numbers; GPTQ's damping search over three linears, QAFT's two lr0s."""
    if method == "fp":
        fields = {"ppl_validation": 26.5, "mean_layer_mse": 0.0, "mean_layer_mse_fp_inputs": 0.0, **fields}
        return fake_record("fp", nll=2.790, val=3.277, observer=observer, seconds=0.0, code=code, **fields)
    nll, mse = TEST_NLL[method][bits], MSE[method] * 2 ** (8 - bits)
    info = {}
    if method == "gptq":
        grid = ["0.001", "1", "100"]  # held-out prefers 1 for the first layer only
        info = gptq_info([0.001, 0.001, 100.0], grid, lambda i, g: 1.0,
                         lambda i, g: {"0.001": 2.0 if i == 0 else 1.0, "1": 1.5, "100": 3.0}[g],
                         options={"damping_grid": [float(g) for g in grid]})
    if method == "qaft":
        rtn = TEST_NLL["rtn"][bits]
        info = qaft_info(rtn + 0.5, {lr: (nll + 0.5 + (0 if lr == 1e-4 else 0.25), [rtn, nll, nll + 0.01])
                                     for lr in (1e-4, 1e-3)}, epoch=1)
    fields = {"ppl_validation": 10.0 * bits, "mean_layer_mse": mse, "mean_layer_mse_fp_inputs": mse / 2, **fields}
    seconds = {"rtn": 1.0, "gptq": 564.4, "qaft": 437.0}[method] + bits
    return fake_record(method, bits, nll, observer=observer, seconds=seconds, info=info, code=code, **fields)


def records():
    return sweep_records(record)


def test_fig1_table():
    body, header = table_dict(sweep.fig1_table(records()))
    assert list(body) == ["FP", "int8", "int4"]  # FP first, then high to low bits
    assert body["FP"][:3] == ["2.790"] * 3
    cell = dict(zip(header, body["int4"]))
    assert (cell["RTN test NLL"], cell["GPTQ test NLL"], cell["QAFT test NLL"]) == ("5.222", "4.444", "4.111")
    assert cell["GPTQ MSE, FP inputs"] == "0.0976" and cell["GPTQ MSE, own inputs"] == "0.195"  # 3 sig. digits
    assert (cell["QAFT lr0"], cell["QAFT epoch"], cell["GPTQ s"], cell["QAFT s"]) == ("0.0001", "1", "568", "441")


def test_qaft_epochs_and_lr_tables():
    body, header = table_dict(sweep.qaft_epochs_table(records()))
    assert header == ["test NLL, epoch 0 (RTN)", "epoch 1", "epoch 2", "GPTQ test NLL"]
    assert body["int4"] == ["5.222", "**4.111**", "4.121", "4.444"]  # bold: the chosen epoch
    body, header = table_dict(sweep.lr_table(records()))
    assert header == ["validation NLL, lr0 0.0001", "validation NLL, lr0 0.001"]
    assert body["int8"] == ["**3.522**", "3.772"] and "†" not in sweep.lr_table(records())
    recs = records()
    for r in recs:
        if r["config"]["method"] == "qaft":
            r["info"]["runs"][1]["best_epoch"] = 0  # lr0 1e-3 never beat RTN
    table = sweep.lr_table(recs)
    body, _ = table_dict(table)
    assert body["int8"] == ["**3.522**", "3.772†"] and table.endswith("(this lr0 only made it worse).")


def test_rtn_table():
    body, header = table_dict(sweep.rtn_table(records()))
    assert list(body) == ["FP", "int8", "int4"]
    assert body["FP"] == ["3.277", "26.5", "2.790", "0", "0"]
    assert body["int4"] == ["5.722", "40", "5.222", "0.338", "0.677"]


def test_observer_table_bolds_column_minimum():
    recs = [record("fp"), record("rtn", 8, "minmax"), record("rtn", 4, "minmax"),
            record("rtn", 8, "mse", nll_validation=3.300, nll_test=3.500),
            record("rtn", 4, "mse", nll_validation=9.0, nll_test=9.5)]
    body, header = table_dict(sweep.observer_table(recs))
    assert header == ["int8 validation NLL (vs FP)", "int8 test NLL", "int4 validation NLL (vs FP)", "int4 test NLL"]
    assert body["mse"][:2] == ["**3.300** (+0.7%)", "3.500"]
    assert body["minmax"][:2] == ["3.611 (+10.2%)", "**3.111**"]
    assert body["minmax"][2].startswith("**5.722**") and not body["mse"][2].startswith("**")


def test_damping_table():
    body, header = table_dict(sweep.damping_table(records()))
    assert header == ["λ 0.001", "λ 1", "λ 100", "layers", "in-sample pick = held-out pick"]
    assert body["int8"] == ["2", "0", "1", "3", "2/3"]  # in sample (ties: the first) picks 0.001
    old = record("gptq", 4)
    for layer in old["info"]["layers"].values():
        del layer["held_out_losses"]
    assert table_dict(sweep.damping_table([old]))[0]["int4"][-1] == "—"


def test_misalignment_summary_uses_test_split():
    # validation says GPTQ wins int8, test says QAFT: the test winner is reported
    recs = [record("gptq", 8, nll_validation=3.0), record("qaft", 8, nll_validation=3.5)]
    text = sweep.misalignment_summary(recs)
    assert "QAFT has the lower test NLL (3.055 GPTQ vs 3.022 QAFT" in text
    assert "FP inputs: GPTQ lower (0.0061 GPTQ vs 0.0242 QAFT), **misaligned**" in text
    assert "own inputs: GPTQ lower (0.0122 GPTQ vs 0.0484 QAFT), **misaligned**" in text
    old = [{**r, "mean_layer_mse_fp_inputs": None} for r in recs]
    assert "FP inputs" not in sweep.misalignment_summary(old)
    assert "int4: best initial LR 0.0001" in sweep.lr_summary(records())


def test_first_epoch_summary_compares_qaft_after_one_epoch_with_gptq():
    assert sweep.first_epoch_summary(records()).splitlines() == [
        "- int8: after 1 epoch QAFT test NLL 3.022 beats GPTQ's 3.055 (Δ -0.0330).",
        "- int4: after 1 epoch QAFT test NLL 4.111 beats GPTQ's 4.444 (Δ -0.3330)."]
    assert sweep.first_epoch_summary([r for r in records() if r["config"]["method"] != "gptq"]) == "No QAFT/GPTQ pairs yet."


def test_update_markdown():
    text = "a\n<!-- report:x -->\nold\n<!-- /report:x -->\nb\n<!-- report:y -->\nkeep\n<!-- /report:y -->\n"
    out = report.update_markdown(text, {"x": "| new |"})
    assert out == text.replace("\nold\n", "\n\n| new |\n\n")  # y (not asked for) untouched
    assert report.update_markdown(out, {"x": "| new |"}) == out  # idempotent
    with pytest.raises(ValueError, match="zz"):
        report.update_markdown(text, {"x": "1", "zz": "2"})


def test_cli_report_rewrites_readme(tmp_path, capsys):
    outputs, readme = tmp_path / "out", tmp_path / "README.md"
    readme.write_text("# R\n" + "".join(f"<!-- report:{n} -->\nTODO\n<!-- /report:{n} -->\n"
                                         for n in [*sweep.SECTIONS, "gpu-memory"]) + "tail\n")
    for method, bits, code in [("fp", None, None), ("rtn", 4, "aaaaaaaaaaaa"), ("rtn", 3, "aaaaaaaaaaaa"),
                               ("gptq", 4, "bbbbbbbbbbbb"), ("gptq", 3, "bbbbbbbbbbbb"),
                               ("qaft", 4, "bbbbbbbbbbbb"), ("qaft", 3, "bbbbbbbbbbbb")]:
        store.write_json_atomic(store.record_path(make_config(method, bits, tier="ci"), outputs),
                                record(method, bits, code=code))
    mse = record("rtn", 4, "mse", code="cccccccccccc", nll_validation=5.7)  # the tier's int4 observer is histogram
    store.write_json_atomic(store.record_path(make_config("rtn", 4, tier="ci", observer="mse"), outputs), mse)
    capsys.readouterr()
    assert cli.main(["report", "--tier", "ci", "--outputs", str(outputs), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "TODO" not in text and text.startswith("# R\n") and text.endswith("tail\n")
    assert "| int4 | 5.222 | 4.444 | 4.111 |" in text and "**5.700** (+73.9%)" in text
    fig1 = text.split("<!-- report:fig1 -->")[1].split("<!-- /report:fig1 -->")[0]
    assert "code aaaaaaaaaaaa, bbbbbbbbbbbb, unknown" in fig1 and "`repro report --tier ci`" in fig1
    damping = text.split("<!-- report:damping -->")[1].split("<!-- /report:damping -->")[0]
    assert "code bbbbbbbbbbbb." in damping  # only the records the section draws on
    assert "cccccccccccc" in text.split("<!-- report:observers -->")[1]
    assert "| int4 | 5.222 | 4.444 | 4.111 |" in capsys.readouterr().out


def test_cli_report_without_records(tmp_path):
    with pytest.raises(SystemExit, match="repro batch --tier ci"):
        cli.main(["report", "--tier", "ci", "--outputs", str(tmp_path)])
    with pytest.raises(SystemExit, match="no section fig1 from the records under .*: the sections there are none"):
        cli.main(["report", "--tier", "ci", "--outputs", str(tmp_path), "--section", "fig1"])


def test_cli_report_one_section(tmp_path):
    outputs, readme = tmp_path / "out", tmp_path / "README.md"
    readme.write_text("<!-- report:fig1 -->\nTODO\n<!-- /report:fig1 -->\n<!-- report:damping -->\nkeep\n<!-- /report:damping -->\n")
    for method, bits in [("fp", None), ("rtn", 4), ("gptq", 4), ("qaft", 4)]:
        store.write_json_atomic(store.record_path(make_config(method, bits, tier="ci"), outputs), record(method, bits))
    assert cli.main(["report", "--tier", "ci", "--outputs", str(outputs), "--readme", str(readme), "--section", "fig1"]) == 0
    text = readme.read_text()
    assert "TODO" not in text and "code abc123def456" in text.split("report:damping")[0]
    assert "\nkeep\n" in text  # a section not chosen is left as it was, though its records are there
    assert cli.main(["figures", "--tier", "ci", "--outputs", str(outputs), "--figure", "nll_vs_bits_ci"]) == 0
    assert sorted(p.name for p in (outputs / "figures").iterdir()) == ["nll_vs_bits_ci.png", "nll_vs_bits_ci.svg"]
    with pytest.raises(SystemExit, match="no figure nosuch"):
        cli.main(["figures", "--tier", "ci", "--outputs", str(outputs), "--figure", "nosuch"])


def test_layer_share_table_counts_layers_not_means():
    per_layer = {"rtn": [1.0, 1.0, 100.0], "gptq": [0.5, 0.5, 150.0], "qaft": [2.0, 0.9, 90.0]}

    table = sweep.layer_share_table([record(m, 4, layer_mse=per_layer[m]) for m in ("rtn", "gptq", "qaft")])
    lines = [line for line in table.splitlines() if line.startswith("| int4")]
    # GPTQ lowers 2 of 3 layers although its mean (dominated by the third layer) is higher
    assert lines[0] == "| int4 | FP inputs | 2/3 | 2/3 | 2/3 |"
    assert lines[1] == "| int4 | own inputs | 2/3 | 2/3 | 2/3 |"
    assert "—" in sweep.layer_share_table(records())  # no per-layer values: a dash, not a crash


def test_fig1_table_without_seconds_for_compared_outputs():
    body, header = table_dict(sweep.fig1_table(records(), seconds=False))
    assert header[-3:] == ["QAFT lr0", "QAFT epoch", "QAFT − GPTQ test NLL [95% CI]"] and all(len(v) == len(header) for v in body.values())


def test_damping_by_kind_table():
    body = sweep.damping_by_kind_table([record("gptq", 8)])
    lines = [line for line in body.splitlines() if line.startswith("| int8")]
    # LAYERS: up_proj (block 0) 0.001, down_proj 0.001, up_proj (block 1) 100
    assert lines == ["| int8 | up_proj | 1 | 1 |", "| int8 | down_proj | 1 |  |"]


def test_damping_scoring_table_pairs_in_sample_and_held_out():
    held = record("gptq", 4)
    held["info"]["options"]["holdout"] = 0.25
    in_sample = record("gptq", 4, nll_test=4.999, mean_layer_mse_fp_inputs=0.5)
    in_sample["info"]["options"]["holdout"] = 0
    body, header = table_dict(sweep.damping_scoring_table([held, in_sample]))
    assert header == ["test NLL, in sample", "test NLL, held out 0.25", "MSE FP inputs, in sample",
                      "MSE FP inputs, held out 0.25"]
    assert body["int4"] == ["4.999", "4.444", "0.5", "0.0976"]


def test_precision_table_decides_on_validation_and_flags_bf16_over_one_percent_worse():
    pairs = []
    for model, bits, bf16, fp32 in (("smollm2-135m", 4, 5.02, 5.0), ("smollm2-135m", 8, 8.0, 7.5),
                                    ("gemma3-270m", 4, 7.0, 7.5)):
        a = record("qaft", bits, nll_validation=bf16, nll_test=bf16 + 1)
        b = record("qaft", bits, nll_validation=fp32, nll_test=fp32 + 2)  # the test split never decides
        a["config"]["model"] = b["config"]["model"] = model
        a["info"]["step_s"], b["info"]["step_s"] = 1.0, 2.0
        pairs.append((a, b))
    a, b = pairs[0]
    for r, shift in ((a, 0.0), (b, 0.5)):  # per-window test NLL on the same windows: a paired interval
        r["nll_test_windows"], r["windows"] = [6.0 + shift + 0.01 * i for i in range(8)], {"test": "w"}
    table = sweep.precision_table(pairs)
    assert "| smollm2-135m | int4 | 5.020 | 5.000 | +0.40% | yes | -14.00% | **-0.500 [-0.500, -0.500]** | 1.00 | 2.00 |" \
        in table
    assert "| smollm2-135m | int8 | 8.000 | 7.500 | +6.67% | **no** | -5.26% | — | 1.00 | 2.00 |" in table
    assert "+6.67% | **no**" in table
    assert "| gemma3-270m | int4 | 7.000 | 7.500 | -6.67% | yes |" in table  # better in bf16: kept


def test_fallback_summary_names_the_layers_that_fell_back():
    clean = record("gptq", 4)
    assert sweep.fallback_summary([clean, record("rtn", 4)]).startswith("No GPTQ layer fell back")
    bad = record("gptq", 8)
    bad["info"]["warning"] = "1 layer(s) fell back to RTN (Cholesky failed at every damping): model.layers.0.mlp.up_proj"
    text = sweep.fallback_summary([clean, bad])
    assert text.count("**Warning**") == 1 and "int8" in text and "model.layers.0.mlp.up_proj" in text


def _analysis(pairs, bound=False):
    rows = [{"model": "m", "bits": b, "distance_rtn": rho * 10, "R": 10.0, "R_is_bound": bound, "rho": rho, "eta": eta}
            for b, (rho, eta) in zip((8, 6, 4, 3), pairs)]
    mis = sorted(r["rho"] for r in rows if r["eta"] > 0.05)
    agree = sum((r["rho"] > 1) == (r["eta"] > 0.05) for r in rows)
    return {"rows": rows, "spearman": 1.0, "gap": 0.05, "threshold_agrees": agree, "n": len(rows),
            "misaligned_rho": mis, "aligned_rho": sorted(r["rho"] for r in rows if r["eta"] <= 0.05)}


def test_radius_summary_states_whether_rho_one_separates_misalignment():
    holds = landscape.radius_summary(_analysis([(0.1, 0.01), (0.5, 0.02), (2.0, 1.0), (5.0, 3.0)]))
    assert "the paper's explanation holds" in holds
    fails = landscape.radius_summary(_analysis([(0.1, 0.01), (0.5, 0.9), (2.0, 1.0), (5.0, 3.0)]))
    assert "does not hold here" in fails and "misalignment already at rho ≤ 1 (0.50)" in fails
    bound = landscape.radius_summary(_analysis([(0.1, 0.01), (0.5, 0.9), (2.0, 1.0), (5.0, 3.0)], bound=True))
    assert "every rho is an upper bound" in bound and "already at rho ≤ 0.50" in bound
    untestable = landscape.radius_summary(_analysis([(0.1, 0.01), (2.0, 1.0)], bound=True))
    assert "cannot be tested" in untestable and "holds" not in untestable
    none = landscape.radius_summary(_analysis([(0.1, 0.01), (0.5, 0.02)]))
    assert "No misalignment" in none


def test_corpora_table_and_summary_per_corpus():
    wiki = [record(m, b) for m in METHODS_ALL for b in (8, 4)] + [record("fp")]
    news = []
    for r in [record(m, b) for m in METHODS_ALL for b in (8, 4)]:
        r["config"] = {**r["config"], "corpus": "news"}
        if r["config"]["method"] == "qaft" and r["config"]["bits"] == 8:
            r["nll_test"] = 3.5  # QAFT loses to GPTQ here: no misalignment at int8 on news
        news.append(r)
    for r in news:  # per-window NLL at int4: QAFT clearly lowest, GPTQ and RTN tied window for window but one
        if r["config"]["bits"] == 4:
            shift = {"qaft": -1.0, "gptq": 0.0, "rtn": 0.0}[r["config"]["method"]]
            windows = [5.0 + shift, 5.5 + shift, 4.5 + shift, 5.0 + shift]
            if r["config"]["method"] == "rtn":
                windows[0] += 1.0
            r.update(nll_test_windows=windows, windows={"test": "same"}, nll_test=sum(windows) / 4)
    table = datasets.corpora_table(wiki + news)
    assert "| news | int8 | — | 3.111 | 3.055 | 3.500 | -0.445 | GPTQ < RTN < QAFT |" in table
    assert "| news | int4 | — | 5.250 | 5.000 | 4.000 | **+1.000 [+1.000, +1.000]** | QAFT < GPTQ ≈ RTN |" in table
    assert "| wiki | int4 | 2.790 | 5.222 | 4.444 | 4.111 | +0.333 | QAFT < GPTQ < RTN |" in table
    summary = datasets.corpora_summary(wiki + news)
    assert "- news: QAFT beats GPTQ by more than 0.05 nats at int4 (+1.000 [+1.000, +1.000]); not at int8 (-0.445)." in summary
    assert "does **not** hold on every corpus" in summary
    assert "- news, int4: not distinguishable at this sample size: GPTQ − RTN = -0.250 [" in summary
    assert "news, int8" not in summary.split("does **not**")[1]  # no per-window NLL there: no GPTQ-RTN line
    assert "holds on every corpus" in datasets.corpora_summary([r for r in wiki if r["config"]["bits"] != 8])


def test_portable_table_prints_fp_and_rtn_numbers_and_checks_the_rest():
    recs = [*records(), record("qaft", 4, nll_validation=TEST_NLL["rtn"][4] + 0.6), record("gptq", 8, nll_test=float("nan"))]
    table = report.portable_table(recs)
    lines = [line for line in table.splitlines() if line.startswith("| m ")]
    assert len(lines) == len(recs)
    assert "| FP | 2.790 | finite |" in lines[0]  # FP first
    assert any("| int8 | RTN | 3.111 | finite |" in line for line in lines)
    qaft = [line for line in lines if "| QAFT |" in line]
    assert [line.endswith("finite, val ≤ epoch 0 |") for line in qaft].count(True) == 2
    assert sum(line.endswith("finite, val ABOVE epoch 0 |") for line in qaft) == 1  # worse than its RTN start
    assert sum("NOT FINITE" in line for line in lines) == 1
    assert all("(CPU-dependent)" in line for line in lines if "| GPTQ |" in line or "| QAFT |" in line)


def test_every_deviation_of_the_cpu_tier_from_the_paper_has_one_reason(monkeypatch):
    from repro import config

    found = config.deviations("cpu")
    # the paper tier's protocol choices (issue 26): in-sample damping scoring, the lr0 selected after its epochs
    assert found["methods.gptq.holdout"] == (0, 0.25) and found["methods.qaft.select"] == ("final", "epoch")
    assert "methods.qaft.mixed_precision" not in found  # equal settings are not deviations
    table = sweep.deviations_table("cpu")
    assert len(table.splitlines()) == 2 + len(config.deviation_reasons("cpu"))
    assert "| `methods.gptq.holdout` | 0 | 0.25 |" in table
    real = config.load_tier

    def edited(reasons):
        monkeypatch.setattr(config, "load_tier", lambda t: {**real(t), "paper_deviations": reasons} if t == "cpu" else real(t))

    reasons = real("cpu")["paper_deviations"]
    edited({k: v for k, v in reasons.items() if k != "seq_len"})
    with pytest.raises(ValueError, match="no reason for seq_len"):
        config.deviation_reasons("cpu")
    edited({**reasons, "methods.qaft.mixed_precision": "stale"})
    with pytest.raises(ValueError, match="methods.qaft.mixed_precision no longer differ"):
        config.deviation_reasons("cpu")
