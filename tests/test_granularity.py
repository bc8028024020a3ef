"""Per-channel and group-wise scales: the grid per group, GPTQ's group scales against a plain
column-by-column oracle, every method through ``RunConfig.granularity``, the per-tensor path
unchanged, kept weights, and the embedded model at g128."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch
from test_gptq import correlated_problem, rel
from tiny_models import FAMILIES, tiny_model

from repro import models, quant, runs, store
from repro.config import HASH_EXCLUDE, SHARED_VERSIONS, RunConfig, make_config
from repro.methods import METHODS
from repro.methods.gptq import damping_search, gptq_quantize, hessian_factor
from repro.quant import Grid, codes, compute_scale, expand_scale, quantize, row_scales


def weight(out=12, inp=40, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity,group_size,shape", [("channel", 128, (12, 1)), ("group", 16, (12, 3)),
                                                            ("group", 8, (12, 5)), ("group", 64, (12, 1))])
def test_codes_are_integers_in_range_per_group(granularity, group_size, shape, bits, observer):
    W = weight()
    scale = compute_scale(W, Grid(bits, granularity, group_size), observer)
    assert scale.shape == shape and bool((scale > 0).all())
    Q = quantize(W, scale, bits, group_size)
    c = codes(Q, scale, bits, group_size)
    q = quant.qmax(bits)
    assert c.dtype == torch.int8 and int(c.abs().max()) <= q
    assert torch.equal(c.float() * expand_scale(scale, W.shape[1], group_size), Q)  # exactly code * scale
    assert torch.equal(quantize(Q, scale, bits, group_size), Q)  # on the grid: Q(Q(W)) = Q(W)
    assert torch.equal(quantize(-W, scale, bits, group_size), -Q)  # symmetric
    # each group is its own per-tensor problem: its scale is the observer's on that slice alone
    width = W.shape[1] if granularity == "channel" else group_size
    for g, part in enumerate(W.split(width, dim=1)):
        for row in range(0, W.shape[0], 5):
            alone = compute_scale(part[row], bits, observer)
            torch.testing.assert_close(scale[row, g], alone, rtol=2e-3 if observer == "mse" else 0, atol=0)


def test_finer_scales_lower_the_weight_error():
    W = weight(out=64, inp=256, seed=1)
    W[3, 7] = 12.0  # one outlier: per tensor, it stretches every weight's grid
    errs = {g: quant.quant_error(W, compute_scale(W, Grid(3, g, 32), "mse"), 3) if g == "tensor" else
            float((quantize(W, compute_scale(W, Grid(3, g, 32), "mse"), 3, 32) - W).pow(2).mean())
            for g in quant.GRANULARITIES}
    assert errs["group"] < errs["channel"] < errs["tensor"]


def test_bad_grids_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="granularity 'row'.*tensor, channel, group"):
        compute_scale(weight(), Grid(4, "row"), "minmax")
    with pytest.raises(ValueError, match="histogram observer is per tensor only.*mse.*minmax"):
        compute_scale(weight(), Grid(4, "channel"), "histogram")
    with pytest.raises(ValueError, match="group_size=0"):
        RunConfig(method="rtn", bits=4, granularity="group", group_size=0, observer="minmax")
    with pytest.raises(ValueError, match="histogram.*per tensor only"):
        RunConfig(method="rtn", bits=4, granularity="channel", observer="histogram")
    with pytest.raises(ValueError, match="act_order=False"):
        make_config("gptq", 4, "ci", granularity="group", observer="minmax", options={"act_order": True})
    with pytest.raises(ValueError, match="pass the group_size"):
        quantize(weight(), compute_scale(weight(), Grid(4, "group", 16), "minmax"), 4)


def test_per_tensor_keys_and_grid_are_unchanged():
    """Records made before granularity existed keep their keys (so they stay valid), and the
    per-tensor grid is the same computation as before: a 0-d scale, quantize by broadcasting."""
    config = RunConfig(method="rtn", bits=4, model="smollm2-135m", observer="mse")
    # the key as before the grid (and eval_windows, start, dtype, gptq_protocol_ppl) fields existed: their defaults do not enter it
    content = {k: v for k, v in dataclasses.asdict(config).items()
               if k not in (*HASH_EXCLUDE, "granularity", "group_size", "eval_windows", "start", "dtype", "device_map",
                         "gptq_protocol_ppl")}
    content.update(method_version=METHODS["rtn"].version, **SHARED_VERSIONS)
    assert config.key() == hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    assert config.label() == "rtn int4"
    assert RunConfig(method="rtn", bits=4, granularity="channel", observer="mse").key() != config.key()
    g64 = RunConfig(method="rtn", bits=4, granularity="group", group_size=64, observer="mse")
    assert g64.key() != RunConfig(method="rtn", bits=4, granularity="group", observer="mse").key()
    assert g64.label() == "rtn int4 g64"
    W = weight()
    scale = compute_scale(W, 4, "mse")
    assert scale.dim() == 0 and torch.equal(quantize(W, scale, 4), (W / scale).round().clamp(-7, 7) * scale)


# ----------------------------------------------------------------------------- GPTQ per group
def reference_group_gptq(W, H, bits, damping, group_size, observer="minmax"):
    """Column-by-column OBS with group scales: at the first column of each group its scales are
    set by the observer from the group's current (already updated) columns, as the original
    GPTQ's ``groupsize`` option; no Cholesky, no lazy blocks."""
    W, H = W.clone(), H.clone()
    H = H + damping * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    scales = torch.zeros(W.shape[0], math.ceil(W.shape[1] / group_size), dtype=W.dtype)
    for j in range(W.shape[1]):
        if j % group_size == 0:
            scales[:, j // group_size] = row_scales(W[:, j:j + group_size], bits, observer)
        Q[:, j] = quantize(W[:, j], scales[:, j // group_size], bits)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q, scales


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("group_size,block_size", [(32, 128), (64, 32), (48, 7), (200, 128)])
def test_gptq_per_group_equals_the_unbatched_oracle(group_size, block_size, observer):
    W, _, H = correlated_problem(seed=group_size)
    scale = torch.zeros(W.shape[0], math.ceil(W.shape[1] / group_size), dtype=W.dtype)
    Q = gptq_quantize(W, H, scale, 4, damping=0.01, block_size=block_size, group_size=group_size,
                      observer=observer)
    Q_ref, scale_ref = reference_group_gptq(W, H, 4, 0.01, group_size, observer)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)  # every group's scale, as the oracle set it
    assert rel(Q, Q_ref) <= 1e-5
    assert torch.equal(Q, quantize(Q, scale, 4, group_size))  # on the grid of the scales it returns
    if group_size < W.shape[1]:  # later groups' scales follow the updated weights, not the FP ones
        assert not torch.equal(scale, compute_scale(W, Grid(4, "group", group_size), observer))


def test_gptq_per_channel_equals_the_oracle_at_fixed_channel_scales():
    W, _, H = correlated_problem(seed=3)
    scale = compute_scale(W, Grid(3, "channel"), "minmax")
    Q = gptq_quantize(W, H, scale, 3, damping=0.01, block_size=32)
    Q_ref, _ = reference_group_gptq(W, H, 3, 0.01, W.shape[1])  # one group = the channel, set at column 0
    assert rel(Q, Q_ref) <= 1e-5


def test_damping_search_returns_the_chosen_candidates_group_scales():
    W, _, H = correlated_problem(out=24, inp=96, dtype=torch.float32)
    grid = [1e-2, 1.0, 100.0]
    scale = torch.zeros(24, 3)
    Q, chosen, losses, _, failures = damping_search(W, H, scale, 3, grid, group_size=32, batch=2)
    assert failures == [] and chosen == min(grid, key=losses.get)
    alone = torch.zeros(24, 3)
    torch.testing.assert_close(Q, gptq_quantize(W, H, alone, 3, chosen, group_size=32))
    torch.testing.assert_close(scale, alone)
    assert torch.equal(Q, quantize(Q, scale, 3, 32))
    A = hessian_factor(H, 1.0)
    assert A.shape == (96, 96)


# ----------------------------------------------------------------------------- every method, tiny models
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_prepare_and_bake_per_group_on_every_family(family, granularity):
    """Conv1D (GPT-2) stores [in, out]: scales are per output channel of the [out, in] matrix."""
    model = tiny_model(family)
    linears = models.stack_linears(model)
    fp = {name: models.weight_matrix(m).detach().clone() for name, m in linears.items()}
    scales = quant.prepare(linears, Grid(3, granularity, 16), "minmax")
    for name, m in linears.items():
        out, inp = fp[name].shape
        assert scales[name].shape == ((out, math.ceil(inp / 16)) if granularity == "group" else (out, 1))
        fq = quant.quantizer(m)
        expected = quantize(fp[name], scales[name], 3, fq.group_size)
        torch.testing.assert_close(models.weight_matrix(m, m.weight).detach(), expected, rtol=0, atol=0)
        c = fq.codes(quant.fp_weight(m).detach())
        assert torch.equal(fq.dequantize(c), m.weight.detach())
    # gradients reach the latent weights through the STE, with their grouped scales
    model(torch.randint(0, 64, (1, 8))).logits.sum().backward()
    assert all(quant.fp_weight(m).grad is not None for m in linears.values())
    baked = quant.bake(linears)
    for name, m in linears.items():
        W = models.weight_matrix(m).detach()
        c = codes(W, baked[name], 3, 16 if granularity == "group" else None)
        assert int(c.abs().max()) <= 3
        torch.testing.assert_close(W, quantize(fp[name], scales[name], 3, 16 if granularity == "group" else None),
                                   rtol=0, atol=0)


def test_weight_size_counts_the_scales():
    model = tiny_model("llama")
    n = models.stack_param_count(model)
    rows = sum(models.weight_matrix(m).shape[0] for m in models.stack_linears(model).values())
    groups = sum(m_out * math.ceil(m_in / 16) for m_out, m_in in
                 (models.weight_matrix(m).shape for m in models.stack_linears(model).values()))
    assert models.weight_size_gb(model, 4) == n * 4 / 8 / 1e9  # per tensor: the paper's count
    assert models.weight_size_gb(model, Grid(4, "channel")) == pytest.approx((n * 4 + 16 * rows) / 8 / 1e9)
    assert models.weight_size_gb(model, Grid(4, "group", 16)) == pytest.approx((n * 4 + 16 * groups) / 8 / 1e9)


def test_kept_weights_round_trip_group_scales(tmp_path):
    """GPTQ's group scales are found during the sweep: kept weights store them, not the observer's."""
    model = tiny_model("gpt2")
    linears = models.stack_linears(model)
    fp = models.fp_snapshot(model)
    config = RunConfig(method="gptq", bits=3, model="tiny", granularity="group", group_size=16,
                       observer="minmax", save_weights=True)
    grid_scales = {}
    with torch.no_grad():
        for name, m in linears.items():
            W = models.weight_matrix(m)
            scale = 1.1 * compute_scale(W, Grid(3, "group", 16), "minmax")  # not what the observer gives
            W.copy_(quantize(W, scale, 3, 16))
            grid_scales[name] = scale
    path = store.weights_path(config, tmp_path)
    store.save_weights(model, config, {}, path, fp, "now", grid_scales)
    kept = runs.load_weights(config, tmp_path)
    for name, m in linears.items():
        assert torch.equal(kept[name], m.weight.detach())  # the stored layout, Conv1D included


# ----------------------------------------------------------------------------- embedded model
@pytest.mark.embedded
def test_embedded_g128_int4_rtn_stays_near_fp(ci_outputs):
    """Measured at the ci tier (SmolLM2, 4 x 128-token test sequences): FP 2.868, per-tensor RTN
    int4 9.654, g128 minmax 3.290 nats/token. The margin: g128 within 0.6 nats of FP, where per
    tensor is 6.8 nats away."""
    fp = runs.run(make_config("fp", None, "ci"), ci_outputs)
    g128 = runs.run(make_config("rtn", 4, "ci", granularity="group", observer="minmax"), ci_outputs)
    assert g128["nll_test"] - fp["nll_test"] < 0.6
    assert g128["config"]["group_size"] == 128
    assert g128["weight_size_gb"] > 4 * g128["stack_params"] / 8 / 1e9  # scales counted


def test_granularity_summary_calls_the_misalignment_by_its_interval():
    """A GPTQ − QAFT gap counts as misalignment only where its paired interval excludes 0; a gap
    inside the noise is "not distinguishable" and tests no threshold; LA-PTQ − block PTQ carries its
    interval."""
    from fake_records import fake_record
    from repro.studies import granularity

    def rec(method, grid, nll, windows, options=None):
        r = fake_record(method, 3, nll, nll_test_windows=windows, windows={"test": "w"}, options=options,
                        weight_distance=2.0)
        r["config"].update({"granularity": grid, "group_size": 128})
        return r

    clear = [rec("rtn", "tensor", 9.0, [9.0] * 4), rec("gptq", "tensor", 8.0, [8.0, 8.1, 7.9, 8.0]),
             rec("qaft", "tensor", 5.0, [5.0, 5.1, 4.9, 5.0])]
    noisy = [rec("rtn", "group", 4.0, [4.0] * 4), rec("gptq", "group", 3.6, [3.1, 4.1, 3.2, 4.0]),
             rec("qaft", "group", 3.59, [3.9, 3.3, 4.0, 3.16]),
             rec("blockwise", "group", 3.7, [3.6, 3.8, 3.7, 3.7], {"window": 1}),
             rec("blockwise", "group", 3.6, [3.5, 3.7, 3.6, 3.6], {"lookahead": 1})]
    text = granularity.granularity_summary([fake_record("fp", None, 3.0), *clear, *noisy], radius=1.0)
    tensor_line, group_line = (ln for ln in text.splitlines() if ln.startswith("- **"))
    assert "QAFT decidedly below GPTQ (GPTQ − QAFT [95% CI]) at int3 (**+3.000" in tensor_line
    assert "at no width" in group_line and "not distinguishable at int3 (+0.010" in group_line
    assert "LA-PTQ l=1 − block PTQ: int3 **-0.100 [-0.100, -0.100]**" in group_line
    assert "holds at 1 of 1 decided" in text and "1 cell(s) cannot test the threshold" in text
