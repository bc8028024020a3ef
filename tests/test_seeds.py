"""The seed study (repro.studies.seeds): runs over seeds on the same windows, the interval over seeds and
windows, and which verdicts survive it (fake records: no model)."""
import math

import pytest
import torch

from fake_records import fake_record
from repro import uncertainty
from repro.config import load_tier, make_config
from repro.studies import seeds


def test_the_study_runs_gptq_and_qaft_at_each_seed_and_fp_rtn_once():
    configs = seeds.configs("ci")
    tier_seeds = load_tier("ci")["seeds"]["seeds"]
    assert len(tier_seeds) >= 2 and 0 in tier_seeds  # seed 0 is the main job's run
    by = {(c.method, c.seed) for c in configs}
    assert by == {("fp", 0), ("rtn", 0), *((m, s) for m in ("gptq", "qaft") for s in tier_seeds)}
    assert {c.bits for c in configs if c.method != "fp"} == {4}
    main = make_config("gptq", 4, "ci")  # seed 0 is the main job's run: the same record
    assert main.key() in {c.key() for c in configs}
    assert len({c.key() for c in configs if c.method == "qaft"}) == len(tier_seeds)


def test_a_two_level_bootstrap_spans_the_seeds():
    """Over [seeds, windows], the interval widens with the seed-to-seed spread; one seed is the plain
    paired bootstrap's mean; shapes must agree."""
    torch.manual_seed(0)
    base = torch.rand(16, dtype=torch.float64) + 3
    tight = uncertainty.paired_bootstrap(torch.stack([base + 0.2] * 3), torch.stack([base] * 3))
    assert tight.seeds == 3 and math.isclose(tight.mean, 0.2, abs_tol=1e-12) and tight.low > 0.19
    spread = uncertainty.paired_bootstrap(torch.stack([base + 0.6, base + 0.2, base - 0.2]), torch.stack([base] * 3))
    assert spread.low < 0 < spread.high and math.isclose(spread.mean, 0.2, abs_tol=1e-9)
    assert "× 3 seeds" in uncertainty.verdict(spread, "A", "B")
    with pytest.raises(ValueError, match="equally shaped"):
        uncertainty.paired_bootstrap(torch.zeros(2, 4), torch.zeros(3, 4))


def _records(qaft_shift):
    """FP/RTN once; GPTQ and QAFT at seeds 0-2 on the same 8 windows: QAFT below GPTQ by
    ``qaft_shift[seed]`` nats on every window."""
    windows = [4.0 + 0.1 * i for i in range(8)]
    same = {"windows": {"test": "w"}}

    def rec(method, seed, shift=0.0):
        r = fake_record(method, None if method == "fp" else 4, sum(windows) / 8 + shift,
                        nll_test_windows=[w + shift for w in windows], **same)
        r["config"]["seed"] = seed
        return r

    return [rec("fp", 0, -1.0), rec("rtn", 0, 1.0),
            *(rec("gptq", s) for s in range(3)), *(rec("qaft", s, -d) for s, d in enumerate(qaft_shift))]


@pytest.fixture
def tier_seeds(monkeypatch):
    real = seeds.load_tier
    monkeypatch.setattr(seeds, "load_tier", lambda tier: {**real("ci"), "seeds": {"seeds": [0, 1, 2]}})
    return "ci"


def test_a_verdict_that_holds_at_every_seed_survives_and_one_that_flips_does_not(tier_seeds, monkeypatch):
    steady = _records([0.5, 0.5, 0.5])
    monkeypatch.setattr(seeds, "records", lambda tier, model, outputs: steady)
    attached = seeds.attach(steady, "ci", None)
    main = {(r["config"]["method"], r["config"]["seed"]): r for r in attached}
    assert sorted(main[("gptq", 0)]["seed_windows"]) == [0, 1, 2] and "seed_windows" in main[("rtn", 0)]
    text = seeds.survival_summary(attached, "ci")
    assert "QAFT − GPTQ: seed 0 **-0.500" in text and "3 seeds **-0.500" in text and "does not survive" not in text
    assert "3 of 3 verdicts are decided at seed 0" in text
    table = seeds.seed_table(steady)
    assert "| m | int4 | QAFT | 3.850 ± 0.000 | 3 | 3.850, 3.850, 3.850 |" in table
    assert "| m | FP | FP | 3.350 | 1 | — |" in table

    flipping = _records([0.5, -0.6, 0.1])  # QAFT ahead at seed 0 only
    monkeypatch.setattr(seeds, "records", lambda tier, model, outputs: flipping)
    text = seeds.survival_summary(seeds.attach(flipping, "ci", None), "ci")
    assert "QAFT − GPTQ: seed 0 **-0.500" in text and "(not distinguishable) — **does not survive**" in text


def test_without_every_seed_records_pass_through(tier_seeds, monkeypatch):
    partial = [r for r in _records([0.5, 0.5, 0.5]) if r["config"]["seed"] != 2]
    monkeypatch.setattr(seeds, "records", lambda tier, model, outputs: partial)
    assert seeds.attach(partial, "ci", None) is partial
    assert "No run has every seed" in seeds.survival_summary(partial, "ci")
