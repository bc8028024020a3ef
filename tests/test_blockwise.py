"""Block-wise PTQ / MB-PTQ / LA-PTQ and the shared stack utility: objectives computed by hand,
frozen look-ahead blocks, grid membership, failure paths, all five families, the embedded model."""
import importlib
import types

import pytest
import torch

from repro import quant
from repro.models import blocks, fp_snapshot, stack_linears
from repro.config import RunConfig
from repro.stack import capture, run_blocks
from repro.config import load_tier
from tiny_models import FAMILIES, tiny_model

bw = importlib.import_module("repro.methods.blockwise")  # the module (repro.methods.blockwise is also the function's name)

CALIBRATION = torch.randint(0, 128, (9, 40), generator=torch.Generator().manual_seed(1))


def _data():
    return types.SimpleNamespace(calibration=CALIBRATION)


def _config(**options):
    return RunConfig(method="blockwise", bits=3, observer="minmax", batch_size=2,
                     options={"steps": 16, "lr": 1e-3, "eval_every": 4, **options})


def _held(config):
    return CALIBRATION[-max(1, round(bw.blockwise_options(config)["holdout"] * len(CALIBRATION))):]


def _hidden_states(model, seqs):
    with torch.no_grad():
        return model(input_ids=seqs, output_hidden_states=True).hidden_states


# ----------------------------------------------------------------------------- the stack utility
@pytest.mark.parametrize("family", FAMILIES)
def test_stack_replays_every_block_with_its_own_arguments(family):
    """Running the caught block-0 inputs through blocks 0..d-1 gives the model's own hidden state
    at depth d. Gemma 3 here alternates sliding-window and global blocks with different rotary
    bases over 40 tokens (window 16): block 0's arguments replayed for block 1 would differ."""
    model = tiny_model(family, layers=3, hidden=48)
    if family == "gemma3":
        model.config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        model = type(model)(model.config).eval()
    reference = _hidden_states(model, CALIBRATION)
    batches = capture(model, CALIBRATION, batch_size=4)
    assert [len(b.hidden) for b in batches] == [4, 4, 1]
    with torch.no_grad():
        for depth in range(len(blocks(model))):  # the last entry of hidden_states is after the final norm
            got = torch.cat([run_blocks(blocks(model), 0, depth, b) for b in batches])
            torch.testing.assert_close(got, reference[depth], rtol=1e-5, atol=1e-5)


def test_windows_cover_the_stack():
    assert bw.windows(5, 1, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert bw.windows(5, 2, 2) == [(0, 2), (2, 4), (4, 5)]
    assert bw.windows(5, 3, 1) == [(0, 3), (1, 4), (2, 5)]
    assert bw.windows(4, 4, 4) == [(0, 4)]


@pytest.mark.parametrize("options, name", [({}, "block PTQ"), ({"window": 2}, "MB-PTQ m=2"),
                                           ({"lookahead": 2}, "LA-PTQ l=2"),
                                           ({"window": 2, "steps_per": "block"}, "MB-PTQ m=2 (equal steps/block)"),
                                           ({"window": 4, "stride": 2}, "MB-PTQ m=4 stride 2")])
def test_variant_names(options, name):
    assert bw.variant(options) == name


@pytest.mark.parametrize("options, match", [({"windows": 2}, "unknown block-wise option"),
                                            ({"window": 0}, "window"), ({"lookahead": -1}, "lookahead"),
                                            ({"stride": 3, "window": 2}, "stride"), ({"lr": 0}, "lr"),
                                            ({"steps_per": "epoch"}, "steps_per"), ({"holdout": 0}, "holdout")])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        bw.blockwise_options(_config(**options))


# ----------------------------------------------------------------------------- objectives by hand
@pytest.mark.parametrize("lookahead", [0, 1])
def test_initial_loss_is_the_block_output_mse_computed_by_hand(lookahead):
    """Before any step the window's held-out loss is RTN of block 0 (then FP block 1 for l=1)
    against the FP model's hidden state at depth 1 + l, computed here from output_hidden_states."""
    model = tiny_model("llama", layers=3, hidden=48)
    config = _config(steps=0, lookahead=lookahead)
    held = _held(config)
    target = _hidden_states(model, held)[1 + lookahead]
    block0 = {n: m for n, m in stack_linears(model).items() if ".0." in n}
    quant.prepare(block0, 3, "minmax")
    with torch.no_grad():
        quantized = model(input_ids=held, output_hidden_states=True).hidden_states[1 + lookahead]
    by_hand = float((quantized - target).pow(2).mean())
    quant.bake(block0)
    model = tiny_model("llama", layers=3, hidden=48)
    info = bw.blockwise(model, _data(), config)
    assert info["windows"][0]["held_loss_initial"] == pytest.approx(by_hand, rel=1e-5)
    assert info["windows"][0]["lookahead_stop"] == 1 + lookahead


def test_identity_quantizer_gives_zero_loss_and_leaves_weights(monkeypatch):
    monkeypatch.setattr(quant, "quantize", lambda w, scale, bits, group_size=None: w.clone())
    model = tiny_model("llama", layers=2, hidden=48)
    fp = fp_snapshot(model)
    info = bw.blockwise(model, _data(), _config(window=2))
    w = info["windows"][0]
    assert w["held_loss_initial"] == 0 and w["train_loss_first"] == 0 and w["train_loss_last"] == 0
    for name, m in stack_linears(model).items():
        assert torch.equal(m.weight.detach(), fp[name])


def test_lookahead_blocks_stay_full_precision_and_untrained(monkeypatch):
    """LA-PTQ l=1 on block 0: when block 0 is baked, block 1 is still bit-identical to FP and has
    received no gradient; block 0 was trained (its codes differ from RTN's)."""
    model = tiny_model("llama", layers=2, hidden=48)
    fp = fp_snapshot(model)
    seen = []
    real_bake = bw.bake

    def bake_and_check(linears):
        if not seen:  # the first window is done: block 0 baked next, block 1 looked ahead
            for name, m in stack_linears(model).items():
                if ".1." in name:
                    assert not quant.is_prepared(m) and m.weight.grad is None
                    assert torch.equal(m.weight.detach(), fp[name])
        seen.append(sorted(linears))
        return real_bake(linears)

    monkeypatch.setattr(bw, "bake", bake_and_check)
    info = bw.blockwise(model, _data(), _config(lookahead=1, steps=32))
    assert [set(n.split(".")[2] for n in names) for names in seen] == [{"0"}, {"1"}]
    assert info["windows"][0]["lookahead_stop"] == 2 and info["windows"][1]["lookahead_stop"] == 2  # truncated
    block0 = {n: m for n, m in stack_linears(model).items() if ".0." in n}
    assert any(not torch.equal(m.weight.detach(), quant.quantize(fp[n], quant.compute_scale(fp[n], 3, "minmax"), 3))
               for n, m in block0.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_mb_ptq_leaves_every_weight_on_the_grid(family):
    model = tiny_model(family, layers=2, hidden=48)
    fp = fp_snapshot(model)
    info = bw.blockwise(model, _data(), _config(window=2, steps=8))
    assert [w["blocks"] for w in info["windows"]] == [[0, 1]] and info["finalised_by"] == {"0": 0, "1": 0}
    for name, m in stack_linears(model).items():
        assert not quant.is_prepared(m)
        scale = quant.compute_scale(fp[name], 3, "minmax")
        W = m.weight.detach()
        assert torch.equal(quant.codes(W, scale, 3).float() * scale, W)  # on the grid
    w = info["windows"][0]
    assert w["held_loss_best"] <= min(w["held_loss_initial"], w["held_loss_final"]) and 0 < w["train_s"] <= w["wall_s"]
    assert w["trainable_params"] == sum(m.weight.numel() for m in stack_linears(model).values())
    assert info["optimizer_steps"] == 8 and set(info["calibration_block_output_mse"]) == {"0", "1"}


def test_mb_ptq_trains_every_block_of_the_window():
    """On tiny GPT-2 (whose held-out loss falls within 32 steps; tiny random Llamas fit their 8
    calibration sequences without generalising, so their best state stays RTN) both blocks of
    the window move off RTN's codes, and the objective goes down."""
    model = tiny_model("gpt2", layers=2, hidden=48)
    fp = fp_snapshot(model)
    info = bw.blockwise(model, _data(), _config(window=2, steps=32))
    w = info["windows"][0]
    assert w["held_loss_best"] < w["held_loss_initial"] and w["best_step"] > 0
    trained = set()
    for i, block in enumerate(blocks(model)):
        for name, m in stack_linears(model).items():
            if any(x is m for x in block.modules()):
                scale = quant.compute_scale(fp[name], 3, "minmax")
                if not torch.equal(m.weight.detach(), quant.quantize(fp[name], scale, 3)):
                    trained.add(i)
    assert trained == {0, 1}


def test_equal_steps_per_block_control_scales_the_steps():
    model = tiny_model("llama", layers=4, hidden=32)
    info = bw.blockwise(model, _data(), _config(window=2, steps=8, steps_per="block"))
    assert [w["steps"] for w in info["windows"]] == [16, 16] and info["optimizer_steps"] == 32


def test_overlapping_windows_record_who_finalised_each_block():
    model = tiny_model("llama", layers=4, hidden=32)
    info = bw.blockwise(model, _data(), _config(window=3, stride=1, steps=4))
    assert [w["blocks"] for w in info["windows"]] == [[0, 1, 2], [1, 2, 3]]
    assert info["finalised_by"] == {"0": 0, "1": 1, "2": 1, "3": 1}
    assert not any(quant.is_prepared(m) for m in stack_linears(model).values())


def test_a_non_finite_loss_stops_the_window_with_a_reason_and_keeps_its_best_state(monkeypatch):
    """(The STE's clamp keeps the forward finite even for absurd learning rates, so the NaN is injected.)"""
    calls = [0]
    real_mse = bw._mse

    def mse_with_a_nan(out, target):
        calls[0] += 1
        loss = real_mse(out, target)
        return loss * float("nan") if calls[0] == 6 else loss

    monkeypatch.setattr(bw, "_mse", mse_with_a_nan)
    model = tiny_model("gpt2", layers=2, hidden=32)
    info = bw.blockwise(model, _data(), _config(steps=16, eval_every=100))
    first = info["windows"][0]
    # call 1: window 0's initial held-out loss (one held-out batch); calls 2..: its steps, so step 5 is NaN
    assert first["stop_reason"] and "non-finite training loss" in first["stop_reason"], first
    assert first["steps"] == 4 and info["windows"][1]["stop_reason"] is None
    assert all(torch.isfinite(m.weight).all() for m in stack_linears(model).values())


# ----------------------------------------------------------------------------- embedded model
@pytest.mark.embedded
def test_embedded_block_ptq_beats_rtn(ci_outputs):
    from repro.config import make_config
    from repro.runs import run

    rtn = run(make_config("rtn", 3, tier="ci"), outputs=ci_outputs)  # notebook 04 reads both
    block = run(make_config("blockwise", 3, tier="ci"), outputs=ci_outputs)
    assert block["nll_test"] < rtn["nll_test"], (block["nll_test"], rtn["nll_test"])
    assert block["info"]["variant"] == "block PTQ" and len(block["info"]["windows"]) == 30


def test_the_paper_tier_runs_notebook_04_on_the_cross_block_papers_models():
    from repro import batch

    jobs = [j for j in batch.plan("paper") if j.notebook == "04_cross_block"]
    assert sorted(j.model for j in jobs) == sorted(load_tier("paper")["cross_block"]["models"])
    assert "meta-llama/Llama-2-7b-hf" in [j.model for j in jobs]


def test_a_non_finite_start_is_recorded_and_no_step_is_taken(monkeypatch):
    monkeypatch.setattr(bw, "_mse", lambda out, target: (out.float() - target.float()).pow(2).mean() * float("nan"))
    model = tiny_model("llama", layers=2, hidden=32)
    flags = [p.requires_grad for p in model.parameters()]
    info = bw.blockwise(model, _data(), _config(steps=4))
    assert all(w["steps"] == 0 and "before training" in w["stop_reason"] for w in info["windows"])
    assert [p.requires_grad for p in model.parameters()] == flags  # restored, renamed weights included
    assert not any(quant.is_prepared(m) for m in stack_linears(model).values())
