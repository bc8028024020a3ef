"""GPTQ: exactness against a plain column-by-column OBS solver, loss bookkeeping, the damping
search and its failure paths, whole-model runs on tiny GPT-2/OPT/Llama/Mistral, embedded model."""
from __future__ import annotations

import types

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from repro import evaluate
from repro.methods.gptq import (accumulate_hessian, damping_search, gptq, gptq_quantize, solve_memory,
                                hessian_factor, layer_loss, merge_hessians, split_calibration)
from repro.models import fp_snapshot, stack_linears, weight_matrix
from repro.quant import codes, compute_scale, quantize
from repro.config import RunConfig


def correlated_problem(out=40, inp=200, tokens=1000, seed=0, dtype=torch.float64):
    """W [out, in], inputs X [tokens, in] with strongly correlated features, H from X."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=dtype) / inp ** 0.5
    X = torch.randn(tokens, inp, generator=g, dtype=dtype) @ mix + 0.3 * torch.randn(
        tokens, 1, generator=g, dtype=dtype)
    W = torch.randn(out, inp, generator=g, dtype=dtype)
    H, n = None, 0
    for chunk in X.split(333):  # streamed, uneven chunks
        H, n = accumulate_hessian(H, n, chunk)
    return W, X, H


def reference_gptq(W, H, scale, bits, damping, act_order=False):
    """Column-by-column OBS (GPTQ paper eqs. 2-3, fixed order), no Cholesky, no lazy blocks:
    quantize column j, spread its error with the current inverse Hessian, eliminate j."""
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.arange(W.shape[1])
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H = H + damping * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = quantize(W[:, j], scale, bits)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q[:, torch.argsort(perm)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- pure functions
def test_streamed_hessian_and_layer_loss_match_the_data():
    W, X, H = correlated_problem()
    torch.testing.assert_close(H, 2 / len(X) * X.T @ X)
    dW = quantize(W, W.abs().max() / 3, 3) - W
    direct = ((X @ dW.T) ** 2).mean()  # mean over tokens x outputs of the output error
    torch.testing.assert_close(layer_loss(dW, H), direct)


def test_hessian_factor_is_the_upper_factor_of_the_damped_hessian():
    _, _, H = correlated_problem()
    A = hessian_factor(H, 0.1)
    damped = H + 0.1 * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
    assert torch.equal(A, A.triu()) and bool((torch.diag(A) > 0).all())
    torch.testing.assert_close(A @ A.T, damped)
    # A^-1 is the reference's factor U of the damped inverse: U^T U = H^-1
    U = torch.linalg.inv(A)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [32, 128, 7])
@pytest.mark.parametrize("bits", [2, 4])
def test_batched_gptq_equals_unbatched_reference(bits, block_size, act_order):
    W, _, H = correlated_problem(seed=bits + block_size)
    H[:, 5] = H[5, :] = 0  # one dead input
    scale = compute_scale(W, bits, "minmax")
    Q = gptq_quantize(W, H, scale, bits, damping=0.01, block_size=block_size, act_order=act_order)
    Q_ref = reference_gptq(W, H, scale, bits, damping=0.01, act_order=act_order)
    assert Q.dtype == W.dtype and Q.shape == W.shape
    assert rel(Q, Q_ref) <= 1e-5
    assert torch.equal(Q, quantize(Q, scale, bits))  # on the grid
    assert bool((Q[:, 5] == 0).all())  # dead input column zeroed


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_layer_mse_not_above_rtn_on_correlated_inputs(bits, seed):
    W, X, H = correlated_problem(out=64, inp=128, tokens=2000, seed=seed, dtype=torch.float32)
    scale = compute_scale(W, bits, "mse")
    rtn_loss = float(layer_loss(quantize(W, scale, bits) - W, H))
    gptq_loss = float(layer_loss(gptq_quantize(W, H, scale, bits, damping=0.01) - W, H))
    assert gptq_loss <= rtn_loss
    assert gptq_loss < 0.8 * rtn_loss  # and clearly so: the inputs are strongly correlated


def test_damping_search_returns_the_argmin_of_its_own_grid():
    W, _, H = correlated_problem(out=48, inp=96, dtype=torch.float32)
    scale = compute_scale(W, 3, "minmax")
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
    Q, chosen, losses, held, failures = damping_search(W, H, scale, 3, grid, block_size=32, batch=3)
    assert failures == [] and list(losses) == grid and all(v is None for v in held.values())
    assert chosen == min(grid, key=losses.get)
    # every grid point's recorded loss is that of plain GPTQ at that damping, scored from H
    for d in grid:
        Q_d = gptq_quantize(W, H, scale, 3, d, block_size=32)
        assert losses[d] == pytest.approx(float(layer_loss(Q_d - W, H)), rel=1e-4)
    assert losses[chosen] == pytest.approx(float(layer_loss(Q - W, H)), rel=1e-6)
    assert len(set(losses.values())) > 1  # the grid matters on this problem


def test_damping_scored_out_of_sample_does_not_pick_the_floor():
    """With fewer fit tokens than inputs, the in-sample loss is lowest at the bottom of the grid
    (the weakest regulariser fits its own tokens best); held-out tokens disagree."""
    W, X, _ = correlated_problem(out=48, inp=96, tokens=1064, dtype=torch.float64)
    H_fit, n_fit = accumulate_hessian(None, 0, X[:64])
    H_held, n_held = accumulate_hessian(None, 0, X[64:])
    scale = compute_scale(W, 3, "minmax")
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    Q, chosen, losses, held, failures = damping_search(W, H_fit, scale, 3, grid, H_held=H_held)
    assert failures == []
    assert min(grid, key=losses.get) <= 1e-2  # in sample: the bottom of the grid wins
    assert chosen == min(grid, key=held.get) == 1.0  # held out: 100x stronger damping
    assert held[chosen] < 0.6 * held[grid[0]]
    for d in grid:  # the held-out score of a candidate is its layer loss on the held-out Hessian
        Q_d = gptq_quantize(W, H_fit, scale, 3, d)
        assert held[d] == pytest.approx(float(layer_loss(Q_d - W, H_held)), rel=1e-6)
    # merging the two running means gives the Hessian of all tokens
    H_all, _ = accumulate_hessian(None, 0, X)
    torch.testing.assert_close(merge_hessians(H_fit, n_fit, H_held, n_held), H_all)


def test_split_calibration():
    seqs = torch.arange(32).reshape(8, 4)
    fit, held = split_calibration(seqs, 0.25)
    assert torch.equal(fit, seqs[:6]) and torch.equal(held, seqs[6:])
    assert len(split_calibration(seqs, 0.0)[1]) == 0
    assert len(split_calibration(seqs, 0.01)[1]) == 1  # at least one sequence
    with pytest.raises(ValueError, match="holdout"):
        split_calibration(seqs[:1], 0.5)
    with pytest.raises(ValueError, match="holdout"):
        split_calibration(seqs, 1.0)


@pytest.mark.parametrize("options, match", [({"damping_grid": []}, "damping_grid"),
                                            ({"damping_grid": [0.01, 0.0]}, "damping_grid"),
                                            ({"damping_grid": [float("nan")]}, "damping_grid"),
                                            ({"damping_grid": 0.01}, "damping_grid=0.01: a non-empty list"),
                                            ({"damping_grid": [0.01, "abc"]}, "'abc' is not a finite number"),
                                            ({"dampinggrid": [0.01]}, "unknown GPTQ option")])
def test_bad_gptq_options_fail_before_any_work(options, match):
    with pytest.raises(ValueError, match=match):  # when the config is made, before a model loads
        RunConfig(method="gptq", bits=3, observer="minmax", options=options)
    config = RunConfig(method="gptq", bits=3, observer="minmax")
    config.options = options  # changed afterwards: gptq itself still refuses it
    with pytest.raises(ValueError, match=match):
        gptq(tiny_model("llama", hidden=48), types.SimpleNamespace(calibration=torch.zeros(2, 8, dtype=torch.long)), config)


def test_partial_cholesky_failures_are_recorded_and_skipped():
    W, _, _ = correlated_problem(out=16, inp=32, dtype=torch.float32)
    H = torch.eye(32)
    H[3, 3] = -0.5  # indefinite: needs damping * mean(diag H) > 0.5 to become positive definite
    scale = compute_scale(W, 4, "minmax")
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    Q, chosen, losses, _, failures = damping_search(W, H, scale, 4, grid)
    assert [losses[d] is None for d in grid] == [True, True, True, False, False]
    assert len(failures) == 3 and all(f.startswith("damping ") for f in failures)
    assert chosen in (1.0, 10.0)
    assert torch.equal(Q, quantize(Q, scale, 4))


@pytest.mark.parametrize("case", ["indefinite", "singular", "nan"])
def test_unfactorable_hessian_falls_back_to_rtn_with_a_warning(case):
    W, _, _ = correlated_problem(out=16, inp=24, dtype=torch.float32)
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
    if case == "indefinite":
        H = -torch.eye(24) - 0.1 * torch.ones(24, 24)  # negative definite: damping makes it worse
    elif case == "singular":  # rank one, and no damping to rescue it
        H, grid = torch.ones(24, 24), [0.0]
    else:
        H = torch.full((24, 24), float("nan"))
    scale = compute_scale(W, 4, "minmax")
    Q, chosen, losses, _, failures = damping_search(W, H, scale, 4, grid)
    assert chosen is None
    assert torch.equal(Q, quantize(W, scale, 4))
    assert all(v is None for v in losses.values())
    assert len(failures) == len(grid) + 1 and failures[-1].startswith("fallback:")
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_quantize(W, H, scale, 4, grid[0])


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_gptq_on_tiny_models(family):
    model = tiny_model(family, hidden=48)
    fp = fp_snapshot(model)
    calibration = torch.randint(0, 128, (5, 40), generator=torch.Generator().manual_seed(1))
    data = types.SimpleNamespace(calibration=calibration)
    config = RunConfig(method="gptq", bits=3, observer="minmax", batch_size=2,
                       options={"damping_grid": [1e-2, 1.0, 100.0], "block_size": 16, "holdout": 0})
    info = gptq(model, data, config)

    linears = stack_linears(model)
    assert list(info["layers"]) == list(linears) and info["fallbacks"] == []
    assert len(info["blocks"]) == 2 and set(info["wall_s"]) == {"capture", "hessian", "solve", "propagate"}
    for name, m in linears.items():
        rec = info["layers"][name]
        assert rec["tokens"] == calibration.numel() and rec["held_out_tokens"] == 0
        assert rec["damping"] == min((d for d in (1e-2, 1.0, 100.0)), key=lambda d: rec["losses"][f"{d:g}"])
        scale = torch.tensor(rec["scale"])
        assert torch.allclose(scale, compute_scale(fp[name], 3, "minmax"))
        W = m.weight.detach()
        assert not torch.equal(W, fp[name])
        assert torch.allclose(W, codes(W, scale, 3).float() * scale, atol=1e-6)  # on the grid

    # Sequential calibration: the first linear of every block sees the outputs of the quantized
    # blocks before it (unaffected by its own block), so its recorded loss at the chosen damping
    # equals the layer MSE measured afterwards on the calibration data through the quantized model.
    mse = evaluate.layer_mse(model, fp, calibration, batch_size=2, desc=None)
    called = []  # forward order (Phi-3 registers o_proj before qkv_proj)
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.append(name)) for name, m in linears.items()]
    with torch.no_grad():
        model(calibration[:1])
    for h in hooks:
        h.remove()
    for b in range(2):
        first = [n for n in called if f".{b}." in n][0]
        rec = info["layers"][first]
        assert rec["losses"][f"{rec['damping']:g}"] == pytest.approx(mse[first], rel=1e-3)


def test_whole_model_single_damping_and_conv1d_layout():
    """GPT-2's Conv1D stores [in, out]: the solved Q must land transposed in the weight."""
    model = tiny_model("gpt2", hidden=48)
    fp = fp_snapshot(model)
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    config = RunConfig(method="gptq", bits=4, observer="minmax", batch_size=4,
                       options={"damping_grid": [0.01]})
    info = gptq(model, types.SimpleNamespace(calibration=calibration), config)
    name = "transformer.h.0.mlp.c_fc"
    m = stack_linears(model)[name]
    assert tuple(m.weight.shape) == (48, 192) and info["layers"][name]["damping"] == 0.01
    # re-solve the first block's c_fc by hand from its FP inputs and compare
    model_fp = tiny_model("gpt2", hidden=48)
    block = model_fp.transformer.h[0]
    hold = []
    handle = block.mlp.c_fc.register_forward_hook(lambda mod, args, out: hold.append(args[0]))
    with torch.no_grad():
        model_fp(input_ids=calibration)
    handle.remove()
    H, n = None, 0
    for x in hold:
        H, n = accumulate_hessian(H, n, x)
    scale = compute_scale(fp[name], 4, "minmax")
    Q = gptq_quantize(weight_matrix(m, fp[name]), H, scale, 4, 0.01)
    torch.testing.assert_close(weight_matrix(m).detach(), Q, rtol=0, atol=1e-5)


def test_whole_model_held_out_damping_then_all_tokens():
    """Default scoring: the grid is solved on the fit sequences, the damping chosen by the
    held-out ones, and the layer solved once more at that damping on all sequences."""
    model = tiny_model("llama", hidden=48)
    fp = fp_snapshot(model)
    calibration = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(3))
    grid = [1e-3, 1e-1, 10.0]
    config = RunConfig(method="gptq", bits=3, observer="minmax", batch_size=3,
                       options={"damping_grid": grid, "block_size": 16, "holdout": 0.25})
    info = gptq(model, types.SimpleNamespace(calibration=calibration), config)
    for rec in info["layers"].values():
        assert rec["tokens"] == 6 * 24 and rec["held_out_tokens"] == 2 * 24
        assert rec["damping"] == min(grid, key=lambda d: rec["held_out_losses"][f"{d:g}"])
    # block 0's first linear sees FP inputs: re-solve it by hand from the merged Hessian
    name = next(iter(stack_linears(model)))
    hold = []
    model_fp = tiny_model("llama", hidden=48)
    first = stack_linears(model_fp)[name]
    handle = first.register_forward_hook(lambda mod, args, out: hold.append(args[0]))
    with torch.no_grad():
        model_fp(input_ids=calibration[:6])
        model_fp(input_ids=calibration[6:])
    handle.remove()
    (H_fit, n_fit), (H_held, n_held) = accumulate_hessian(None, 0, hold[0]), accumulate_hessian(None, 0, hold[1])
    rec = info["layers"][name]
    scale = compute_scale(fp[name], 3, "minmax")
    Q = gptq_quantize(fp[name], merge_hessians(H_fit, n_fit, H_held, n_held), scale, 3, rec["damping"], 16)
    torch.testing.assert_close(stack_linears(model)[name].weight.detach(), Q, rtol=0, atol=1e-5)


def test_linears_reading_one_input_share_its_hessian():
    """q/k/v and gate/up read the same tensor: one Hessian (and one factor per damping) serves
    them all, and each result equals a solve from that linear's own hooked inputs."""
    model = tiny_model("llama", hidden=48)
    fp = fp_snapshot(model)
    calibration = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(4))
    config = RunConfig(method="gptq", bits=3, observer="minmax", batch_size=2,
                       options={"damping_grid": [1e-2, 1.0], "block_size": 16, "holdout": 0})
    info = gptq(model, types.SimpleNamespace(calibration=calibration), config)
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    sources = {name.split(".", 3)[-1]: rec["hessian_from"].split(".", 3)[-1]
               for name, rec in info["layers"].items() if ".0." in name}
    assert sources == {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
                       "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
                       "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj",
                       "mlp.down_proj": "mlp.down_proj"}
    model_fp = tiny_model("llama", hidden=48)
    for name in (f"{attn}.v_proj", f"{mlp}.up_proj"):
        hold = []
        handle = stack_linears(model_fp)[name].register_forward_hook(lambda mod, args, out: hold.append(args[0]))
        with torch.no_grad():
            model_fp(input_ids=calibration)
        handle.remove()
        H, _ = accumulate_hessian(None, 0, torch.cat(hold))
        rec = info["layers"][name]
        Q = gptq_quantize(fp[name], H, torch.tensor(rec["scale"]), 3, rec["damping"], block_size=16)
        torch.testing.assert_close(stack_linears(model)[name].weight.detach(), Q, rtol=0, atol=1e-5)


def test_solve_memory_terms_of_a_llama_block():
    """The memory note's terms, by hand, for a Llama-2-7B block: shared inputs count once."""
    shapes = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
              "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
    readers = {"k": "q", "v": "q", "up": "gate"}
    terms = solve_memory(shapes, readers, tokens=128 * 4096, hidden_size=4096, k=8)
    assert terms["activations"] == 128 * 4096 * 4096 * 4
    assert terms["hessians"] == 2 * (3 * 4096 ** 2 + 11008 ** 2) * 4  # q, o, gate; down; fit + held out
    assert terms["search"] == (25 * 11008 ** 2 + 33 * 11008 * 4096) * 4  # down_proj's is the largest
    assert terms["total"] == terms["activations"] + terms["hessians"] + terms["search"]
    alone = solve_memory(shapes, {}, tokens=0, hidden_size=4096, k=1)  # one damping: no held-out Hessian
    assert alone["hessians"] == (6 * 4096 ** 2 + 11008 ** 2) * 4 and alone["activations"] == 0
    batched = solve_memory(shapes, readers, tokens=0, hidden_size=4096, k=2, grid_size=8)  # search_batch 2
    assert batched["search"] == (13 * 11008 ** 2 + 9 * 11008 * 4096) * 4  # every factor of the grid stays


# ----------------------------------------------------------------------------- embedded model
@pytest.mark.embedded
def test_embedded_gptq_beats_rtn_layer_mse(ci_outputs):
    from repro.config import make_config
    from repro.runs import run

    # share of layers whose error GPTQ must lower, measured at the ci tier (one damping, 1.0): 200/210 at
    # int4 and 160/210 at int3, where GPTQ's calibration inputs (its own quantized prefix) drift from FP
    for bits, share in ((4, 0.9), (3, 0.7)):
        rtn = run(make_config("rtn", bits, tier="ci"), outputs=ci_outputs)  # notebook 01 reads them
        gptq_record = run(make_config("gptq", bits, tier="ci"), outputs=ci_outputs)
        # Per layer, on the inputs of the FP network (paper eq. 2). The mean over layers is not the
        # check: one late down_proj with ~100x the others' activations dominates it.
        fp_inputs = gptq_record["layer_mse_fp_inputs"], rtn["layer_mse_fp_inputs"]
        lower = sum(fp_inputs[0][n] < fp_inputs[1][n] for n in fp_inputs[1])
        assert lower >= share * len(fp_inputs[1]), (bits, lower)
        info = gptq_record["info"]
        assert info["fallbacks"] == [] and len(info["layers"]) == 30 * 7
        assert all(rec["damping"] in info["options"]["damping_grid"] for rec in info["layers"].values())


@pytest.mark.embedded
def test_embedded_gptq_is_deterministic(tmp_path, ci_outputs):
    """A second computation of a config (fresh outputs) gives the session's record of it again
    (computed by the test above, or by a notebook at the tier's pinned thread count)."""
    from repro.config import make_config
    from repro.runs import run
    from repro.store import read_record

    config = make_config("gptq", 3, tier="ci")
    assert run(config, outputs=tmp_path)["cached"] is False
    run(config, outputs=ci_outputs)
    first, second = read_record(config, ci_outputs), read_record(config, tmp_path)  # both as stored
    volatile = ("wall_s", "created", "cached")
    strip = lambda r: {k: v for k, v in r.items() if k not in volatile}  # noqa: E731
    for r in (first, second):
        for layer in r["info"]["layers"].values():
            layer.pop("solve_s")
        r["info"].pop("blocks"), r["info"].pop("wall_s")
    assert strip(first) == strip(second)


def test_gptq_on_a_bfloat16_model_solves_in_float32_and_stays_bfloat16():
    """Half-precision loading (``RunConfig.dtype``): the Hessians and the solve are float32, the result is
    written back on the grid in the weights' own dtype."""
    model = tiny_model("llama", hidden=48).to(torch.bfloat16)
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    config = RunConfig(method="gptq", bits=4, observer="minmax", batch_size=2, dtype="bfloat16",
                       options={"damping_grid": [1e-2, 1.0], "holdout": 0})
    info = gptq(model, types.SimpleNamespace(calibration=calibration), config)
    for name, m in stack_linears(model).items():
        assert m.weight.dtype == torch.bfloat16
        scale = torch.tensor(info["layers"][name]["scale"])
        w = m.weight.detach().float()
        assert torch.equal(m.weight.detach(), (codes(w, scale, 4).float() * scale).to(torch.bfloat16))
    assert RunConfig(method="qaft", bits=4, observer="minmax", dtype="bfloat16").dtype is None  # float32 latent
    assert RunConfig(method="rtn", bits=4, observer="minmax", dtype="float32").key() == \
        RunConfig(method="rtn", bits=4, observer="minmax").key()
    with pytest.raises(ValueError, match="dtype='half'"):
        RunConfig(method="rtn", bits=4, observer="minmax", dtype="half")
