"""Paired bootstrap intervals and the verdicts they allow (repro.uncertainty), and the per-window NLL
records carry for them (repro.evaluate)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_records import fake_record
from repro import evaluate, uncertainty
from repro.studies import sweep
from tiny_models import tiny_model

values = st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=40)


@settings(max_examples=40, deadline=None)
@given(values, st.floats(-5, 5, allow_nan=False), st.integers(0, 2**31 - 1))
def test_interval_holds_the_mean_is_seeded_and_antisymmetric(a, shift, seed):
    b = [x - shift for x in a][::-1]
    iv = uncertainty.paired_bootstrap(a, b, n_boot=500, seed=seed)
    assert iv.low - 1e-9 <= iv.mean <= iv.high + 1e-9
    assert iv == uncertainty.paired_bootstrap(a, b, n_boot=500, seed=seed)  # same call, same interval
    back = uncertainty.paired_bootstrap(b, a, n_boot=500, seed=seed)
    assert math.isclose(back.mean, -iv.mean, abs_tol=1e-9)
    assert math.isclose(back.low, -iv.high, abs_tol=1e-9) and math.isclose(back.high, -iv.low, abs_tol=1e-9)


def test_a_constant_shift_is_decided_and_noise_is_not():
    torch.manual_seed(0)
    base = (torch.rand(64) * 3 + 2).tolist()
    shifted = [x + 0.05 for x in base]  # every window 0.05 nats worse: paired, the interval is tight
    iv = uncertainty.paired_bootstrap(shifted, base)
    assert iv.low > 0 and math.isclose(iv.mean, 0.05, abs_tol=1e-12)
    assert uncertainty.verdict(iv, "B", "A").startswith("B > A: B − A = +0.050")
    noise = [x + float(e) for x, e in zip(base, torch.randn(64) * 0.5)]  # zero-mean noise, 64 windows
    assert "not distinguishable" in uncertainty.verdict(uncertainty.paired_bootstrap(noise, base), "B", "A")
    assert uncertainty.interval_cell(iv).startswith("**+0.050") and uncertainty.interval_cell(None) == "—"


def test_unpaired_or_empty_input_is_refused():
    with pytest.raises(ValueError, match="equally shaped"):
        uncertainty.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="equally shaped"):
        uncertainty.paired_bootstrap([], [])


def test_compare_pairs_records_only_on_the_same_windows():
    a = fake_record("gptq", 4, 5.0, nll_test_windows=[5.0, 5.2, 4.8], windows={"test": "abc"})
    b = fake_record("qaft", 4, 4.0, nll_test_windows=[4.1, 4.0, 3.9], windows={"test": "abc"})
    iv = uncertainty.compare(b, a)
    assert iv.n == 3 and iv.high < 0
    assert uncertainty.compare(b, {**a, "windows": {"test": "other"}}) is None
    assert uncertainty.compare(b, {**a, "nll_test_windows": None}) is None
    text = sweep.misalignment_summary([a, b])
    assert "QAFT has the lower test NLL" in text and "QAFT < GPTQ: QAFT − GPTQ = -1.000" in text
    tied = {**b, "nll_test_windows": [5.1, 5.1, 4.8], "nll_test": 5.0}
    assert "Test NLL not distinguishable" in sweep.misalignment_summary([a, tied])


def test_a_mean_interval_brackets_a_record_and_gaps_pair_four():
    iv = uncertainty.mean_interval([1.0, 2.0, 3.0, 4.0])
    assert iv.mean == 2.5 and 1.0 <= iv.low < 2.5 < iv.high <= 4.0
    assert uncertainty.mean_interval(None) is None
    same = {"windows": {"test": "w"}}
    fp = fake_record("fp", None, 3.0, nll_test_windows=[3.0, 3.2, 2.8, 3.0], **same)
    fpft = fake_record("fpft", None, 2.6, nll_test_windows=[2.6, 2.8, 2.4, 2.6], info={"lr": 1e-3, "best_epoch": 1},
                       **same)  # fine-tuning alone: 0.4 nats on every window
    gptq = fake_record("gptq", 4, 5.0, nll_test_windows=[5.0, 5.1, 4.9, 5.0], **same)
    qaft = fake_record("qaft", 4, 4.0, nll_test_windows=[4.0, 4.2, 3.8, 4.0], **same)
    net = uncertainty.compare_gaps(gptq, fp, qaft, fpft)  # (GPTQ − FP) − (QAFT − FPFT) = 2.0 − 1.4
    assert math.isclose(net.mean, 0.6, abs_tol=1e-9) and net.low > 0
    assert uncertainty.compare_gaps(gptq, fp, qaft, {**fpft, "windows": {"test": "x"}}) is None
    text = sweep.fine_tuning_summary([fp, fpft, gptq, qaft])
    assert "FP > FPFT: FP − FPFT = +0.400" in text
    assert "(GPTQ − FP) − (QAFT − FPFT) **+0.600" in text and "(60% of the lead): QAFT still ahead" in text
    assert sweep.fine_tuning_summary([fp, gptq, qaft]) == "No FP and FPFT records yet."
    # the seed study's replicates are set aside: FPFT ran at one seed, so the lead is that seed's too
    seeded = [{**r, "seed_windows": {"0": r["nll_test_windows"], "1": other}}
              for r, other in ((gptq, [6.0, 6.1, 5.9, 6.0]), (qaft, [3.0, 3.2, 2.8, 3.0]))]
    assert uncertainty.compare(*seeded).mean > 1.5  # over both seeds: (1.0 + 3.0) / 2
    assert sweep.fine_tuning_summary([fp, fpft, *seeded]) == text
    table = sweep.fig1_table([fp, fpft, gptq, qaft], seconds=False)
    assert "| FPFT | 2.600 | 2.600 | 2.600 |" in table and "| 0.001 | 1 | — |" in table


def test_per_window_nll_averages_to_the_mean():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (5, 12))
    mean, windows = evaluate.nll(model, ids, batch_size=2, desc=None, per_window=True)
    assert len(windows) == 5 and math.isclose(sum(windows) / 5, mean, rel_tol=1e-9)
    assert math.isclose(evaluate.nll(model, ids[1:2], desc=None), windows[1], rel_tol=1e-6)
    assert evaluate.windows_id(ids) == evaluate.windows_id(ids.clone()) != evaluate.windows_id(ids.flip(0))
