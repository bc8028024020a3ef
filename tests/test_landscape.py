"""Loss landscape: directions, exact restore, the bowl fit, the analyses on known numbers, kept weights."""
from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from repro import evaluate, runs, store
from repro.config import RunConfig, load_tier, make_config
from repro.methods.rtn import rtn
from repro.models import fp_snapshot, stack_linears
from repro.studies import landscape


def test_a_direction_is_a_seeded_unit_vector_over_the_stack():
    fp = fp_snapshot(tiny_model("llama"))
    e, again, other = landscape.direction(fp, 3), landscape.direction(fp, 3), landscape.direction(fp, 4)
    assert math.isclose(math.sqrt(sum(float(v.double().pow(2).sum()) for v in e.values())), 1.0, rel_tol=1e-6)
    assert all(torch.equal(e[n], again[n]) for n in fp) and not torch.equal(e[next(iter(fp))], other[next(iter(fp))])
    assert all(e[n].shape == w.shape for n, w in fp.items())
    # uniform on the sphere: no preferred sign, entries of size ~1/sqrt(D)
    flat = torch.cat([v.flatten() for v in e.values()])
    assert abs(float(flat.mean())) < 3 / flat.numel() ** 0.5 * 3
    assert math.isclose(float(flat.std()) * flat.numel() ** 0.5, 1.0, rel_tol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbed_weights_are_restored_exactly(family):
    """A radial step and a segment point are written in place (Conv1D's [in, out] layout too),
    change the loss, and leave the model bit-identical to before."""
    model = tiny_model(family)
    fp = fp_snapshot(model)
    seqs = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = evaluate.nll(model, seqs, desc=None)
    e = landscape.direction(fp, 0)
    lam = 0.5 * landscape.stack_norm(fp)
    with landscape.weights_set(model, fp) as put:
        assert math.isclose(put(lambda name, w: torch.add(w, e[name], alpha=lam)), lam, rel_tol=1e-5)
        assert evaluate.nll(model, seqs, desc=None) != before
        assert math.isclose(put(lambda name, w: torch.lerp(w, w + lam * e[name], 0.25)), lam / 4, rel_tol=1e-5)
    assert all(torch.equal(m.weight.detach(), fp[n]) for n, m in stack_linears(model).items())
    assert evaluate.nll(model, seqs, desc=None) == before


@pytest.mark.parametrize("n", [2.0, 1.5, 3.0])
def test_bowl_fit_recovers_a_known_bowl(n):
    A, R = 6.0, 0.3
    lams = [0.3 * 10 ** (k / 4 - 2) for k in range(14)]
    rise = [A * x ** n / (x ** n + R ** n) for x in lams]
    fit = landscape.fit_bowl(lams, rise)
    assert fit["R"] == pytest.approx(R, rel=0.02) and fit["A"] == pytest.approx(A, rel=0.02)
    assert fit["n"] == pytest.approx(n, abs=0.03)
    assert fit["plateau"] and fit["accepted"] == (1.6 <= n <= 2.4)
    assert fit["kappa"] == pytest.approx(2 * fit["A"] / fit["R"] ** 2)


def test_bowl_fit_without_a_plateau_gives_a_lower_bound():
    A, R = 6.0, 0.3
    lams = [0.3 * 10 ** (k / 4 - 2) for k in range(7)]  # up to 0.1: a third of R
    fit = landscape.fit_bowl(lams, [A * x ** 2 / (x ** 2 + R ** 2) for x in lams])
    assert not fit["accepted"]
    assert fit["R_lower"] <= R
    # two samples, the second past R without a plateau: the bound is the sample before the half-way rise
    fit = landscape.fit_bowl([0.5 * R, 1.94 * R], [A * x ** 2 / (x ** 2 + R ** 2) for x in (0.5 * R, 1.94 * R)])
    assert fit["R_lower"] == pytest.approx(0.5 * R)


def fake_result(profile, rtn_points, segment=None, norm=10.0):
    """A landscape result with two directions whose +e / -e rises average to ``profile(lam)``."""
    fp = 3.0
    points = [{"spec": {"kind": "fp"}, "distance": 0.0, "train": fp, "validation": fp}]
    for seed in (0, 1):
        for lam in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
            for sign, skew in ((1, 0.2), (-1, -0.2)):  # a gradient term that the average cancels
                value = fp + profile(lam) + skew * lam / 30
                points.append({"spec": {"kind": "radial", "seed": seed, "sign": sign, "radius": lam / norm},
                               "distance": lam * (1 + sign * 1e-7),  # float32 rounding: +e and -e differ
                               "train": value, "validation": value})
    for bits, (dist, nll) in rtn_points.items():
        points.append({"spec": {"kind": "run", "method": "rtn", "bits": bits}, "distance": dist, "train": nll,
                       "validation": nll})
    for alpha, nll in (segment or {}).items():
        points.append({"spec": {"kind": "segment", "a": "fp", "b": "rtn@4", "alpha": alpha}, "distance": 0.0,
                       "train": nll, "validation": nll})
    return {"model": "m", "tier": "ci", "norm": norm, "settings": {"tau": 0.1}, "points": points}


def test_profiles_average_out_the_gradient_and_rtn_is_compared_at_its_distance():
    result = fake_result(lambda x: 4 * x ** 2 / (x ** 2 + 9), {4: (3.0, 5.5), 8: (0.3, 3.0)}, {0.5: 7.0, 0.25: 4.0})
    lams, rise = landscape.radial_profiles(result)[0]
    assert lams == pytest.approx([0.1, 0.3, 1.0, 3.0, 10.0, 30.0], rel=1e-12)
    assert rise[3] == pytest.approx(2.0)  # exactly the bowl at R: the +-0.2 lam/30 terms cancelled
    basin = landscape.basin_radius(result)
    assert basin["R"] == pytest.approx(3.0, rel=0.03) and basin["accepted"] == 2 and not basin["bound"]
    assert basin["R_tau"] == pytest.approx(math.sqrt(2 * 0.1 / (2 * 4 / 9)), rel=0.05)
    rows = {r["bits"]: r for r in landscape.rtn_vs_random(result)}
    assert rows[4]["nll_random"] == pytest.approx(5.0) and rows[4]["excess"] == pytest.approx(0.5)
    barrier, = landscape.segment_barriers(result, 4)
    assert barrier["barrier"] == pytest.approx(7.0 - (3.0 + 5.5) / 2)  # at alpha 0.5, above the chord
    rising = fake_result(lambda x: x, {4: (3.0, 5.5)}, {0.5: 4.0, 0.75: 4.5})  # below the chord: no ridge
    assert landscape.segment_barriers(rising, 4)[0]["barrier"] == 0.0


def test_more_directions_get_their_own_basin_section_when_cached(monkeypatch, tmp_path):
    """``basin_directions``: R(w) over more directions than every landscape sweeps, a section of its own
    (``basin-MODEL``) once those points are cached, beside the main one (``landscape-MODEL``)."""
    bowl = lambda x: 4 * x ** 2 / (x ** 2 + 9)  # noqa: E731
    two = fake_result(bowl, {4: (3.0, 5.5)}, {0.5: 4.0})
    two.update(bits=[4], settings={"tau": 0.1, "directions": 2, "basin_directions": 3})
    three = {**two, "settings": {**two["settings"], "directions": 3},
             "points": two["points"] + [{**p, "spec": {**p["spec"], "seed": 2}} for p in two["points"]
                                        if p["spec"]["kind"] == "radial" and p["spec"]["seed"] == 0]}
    asked = []

    def cached_landscape(model, bits, tier, outputs, cached_only, corpus=None, directions=None):
        asked.append(directions)
        return three if directions == 3 and found_three else None

    monkeypatch.setattr(landscape, "cached", lambda tier, outputs: {"m": two})
    monkeypatch.setattr(landscape, "landscape", cached_landscape)
    found_three = False
    assert set(landscape.sections("ci", tmp_path)) == {"landscape-m"} and asked == [3]
    found_three = True
    found = landscape.sections("ci", tmp_path, command="repro report")
    assert "Basin radius over 3 directions" in found["basin-m"] and "3 of 3" in found["basin-m"]
    assert "2 of 2" in found["landscape-m"] and "Generated from" in found["basin-m"]
    two["settings"]["basin_directions"] = 2  # no more than every landscape sweeps: nothing to add
    assert landscape.more_directions(two, tmp_path) is None


def test_spearman_on_known_orders():
    assert landscape.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert landscape.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert landscape.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)  # average ranks
    assert math.isnan(landscape.spearman([1, 2], [2, 1]))


def test_bad_landscape_settings_fail_early():
    with pytest.raises(ValueError, match="directions"):
        landscape.settings("ci", directions=0)
    with pytest.raises(ValueError, match="basin_directions=True: an integer >= 1, or null"):
        landscape.settings("ci", basin_directions=True)
    with pytest.raises(ValueError, match="alphas"):
        landscape.settings("ci", alphas=[0.5, 1.0])
    with pytest.raises(ValueError, match="radii"):
        landscape.settings("ci", radii=[])


def test_the_tier_keeps_weights_of_the_landscape_runs_only():
    section = load_tier("ci")["landscape"]
    b = section["bits"][0]
    assert make_config("gptq", b, tier="ci").save_weights and make_config("qaft", b, tier="ci").save_weights
    assert not make_config("rtn", b, tier="ci").save_weights  # follows from its record's scales
    assert not make_config("gptq", 8, tier="ci").save_weights
    assert not make_config("gptq", b, tier="ci", model="gemma3-270m").save_weights
    # keeping weights does not change what a run is
    assert make_config("gptq", b, tier="ci").key() == make_config("gptq", b, tier="ci", save_weights=False).key()
    with pytest.raises(ValueError, match="save_weights"):
        RunConfig(method="fp", save_weights=True)


def test_kept_weights_round_trip_exactly(tmp_path):
    model = tiny_model("gpt2")
    config = RunConfig(method="rtn", bits=3, observer="minmax")
    info = rtn(model, types.SimpleNamespace(), config)
    path = tmp_path / "w.safetensors"
    store.save_weights(model, config, info, path)
    from safetensors.torch import load_file

    stored = load_file(str(path))
    for name, m in stack_linears(model).items():
        assert stored[name].dtype == torch.int8
        torch.testing.assert_close(stored[name].float() * stored[f"{name}.scale"], m.weight.detach(), rtol=0, atol=0)
    name, m = next(iter(stack_linears(model).items()))
    with torch.no_grad():
        m.weight.add_(1e-3)  # off the grid: refused, nothing written
    with pytest.raises(RuntimeError, match="not on its int3 grid"):
        store.save_weights(model, config, info, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob(".bad*"))


def test_kept_weights_lifecycle(tmp_path, monkeypatch):
    """A run keeps its weights when its config says so; a record without them is reused by
    ``run`` but computed again by ``load_weights``; a recomputation removes the stale file first
    and stamps the new one; weights off the grid cost the weights, not the record."""
    model = tiny_model("llama")
    fp = fp_snapshot(model)
    bench = types.SimpleNamespace(model=model, data=None, fp_weights=fp, fp_test_grams={},
                                  fp_test_hidden=(4, []))
    calls = []

    def fake_gptq(model, data, config):  # RTN onto the grid, as a stand-in for a slow method
        calls.append(1)
        return rtn(model, data, config)

    def fresh_bench(config):
        from repro.models import restore

        restore(model, fp)
        return bench

    monkeypatch.setattr(runs, "workbench", fresh_bench)
    monkeypatch.setattr(evaluate, "record_metrics", lambda *args, **kwargs: {"nll_validation": 1.0, "nll_test": 1.0})
    monkeypatch.setitem(runs.METHODS, "gptq", dataclasses.replace(runs.METHODS["gptq"], run=fake_gptq, version=99))
    plain = RunConfig(method="gptq", bits=3, observer="minmax", options={"damping_grid": [0.01]})
    runs.run(plain, tmp_path)
    path = store.weights_path(plain, tmp_path)
    assert not path.exists() and len(calls) == 1
    keeping = dataclasses.replace(plain, save_weights=True)
    assert runs.run(keeping, tmp_path)["cached"] and len(calls) == 1  # the record serves; weights not needed
    weights = runs.load_weights(keeping, tmp_path)  # needed now: computed again, kept
    assert len(calls) == 2 and path.exists()
    assert store.weights_stamp(keeping, tmp_path) == store.read_record(keeping, tmp_path)["created"]
    for name, m in stack_linears(model).items():
        assert torch.equal(weights[name], m.weight.detach())
    runs.load_weights(keeping, tmp_path)
    assert len(calls) == 2  # kept: read, not computed
    runs.run(plain, tmp_path, force=True)  # recomputed without keeping: the old weights are stale, gone
    assert not path.exists()

    def off_grid(model, data, config):
        info = rtn(model, data, config)
        with torch.no_grad():
            next(iter(stack_linears(model).values())).weight.add_(1e-3)
        return info

    monkeypatch.setitem(runs.METHODS, "gptq", dataclasses.replace(runs.METHODS["gptq"], run=off_grid, version=99))
    with pytest.warns(UserWarning, match="not on its int3 grid.*without them"):
        record = runs.run(keeping, tmp_path, force=True)
    assert record["key"] == keeping.key() and store.read_record(keeping, tmp_path) and not path.exists()


@pytest.mark.embedded
def test_processes_share_the_points_through_take(tmp_path, seed_records, ci_outputs):
    """`repro batch`'s workers share the landscape's points (``take``: one claim per point). A process
    that takes every other point writes exactly those and returns None; the landscape is then not
    complete (``cached_only``); a plain call measures only the rest, leaves the first process's points
    byte for byte, and returns every point."""
    import shutil
    from contextlib import contextmanager

    kept = [make_config(m, 4, "ci", model="smollm2-135m") for m in ("gptq", "qaft")]
    rtn = [make_config("rtn", b, "ci", model="smollm2-135m") for b in load_tier("ci")["bits"]]
    seed_records(tmp_path, kept + rtn)
    for config in kept:
        runs.load_weights(config, ci_outputs)  # kept there (computed first if no test has yet)
        shutil.copy(store.weights_path(config, ci_outputs), store.weights_path(config, tmp_path))
    taken = []

    @contextmanager
    def every_other(path):
        taken.append(path)
        yield len(taken) % 2 == 1

    assert landscape.landscape("smollm2-135m", [4], "ci", tmp_path, take=every_other, radii=[0.1]) is None
    points_dir = tmp_path / "records" / "landscape" / "smollm2-135m"
    first = {p: p.read_bytes() for p in points_dir.glob("*.json")}
    assert set(first) == set(taken[0::2]) and len(taken) > 4
    assert landscape.landscape("smollm2-135m", [4], "ci", tmp_path, cached_only=True, radii=[0.1]) is None
    result = landscape.landscape("smollm2-135m", [4], "ci", tmp_path, radii=[0.1])
    assert len(result["points"]) == len(taken) == len(list(points_dir.glob("*.json")))
    assert all(p.read_bytes() == content for p, content in first.items())


def test_notebook_05_precomputes_each_corpus_landscape_as_it_draws_it(monkeypatch):
    """Notebook 05's ``precompute`` (run by `repro batch`'s workers) asks for the points the notebook then
    reads: each corpus of the tier's ``datasets`` section, its widths and its landscape settings, with
    the workers' ``take``."""
    from repro.studies import NOTEBOOKS

    calls = []
    monkeypatch.setattr(landscape, "landscape", lambda *args, **kwargs: calls.append((args, kwargs)))
    take = object()
    NOTEBOOKS["05_datasets"].precompute("ci", "smollm2-135m", None, "OUT", take)
    section = load_tier("ci")["datasets"]
    assert calls == [(("smollm2-135m", section["bits"], "ci", "OUT"), {"corpus": corpus, "take": take, **section["landscape"]})
                     for corpus in section["corpora"]]
