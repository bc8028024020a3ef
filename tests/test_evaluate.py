import math

import pytest
import torch

from repro import evaluate, models, quant, stack

from tiny_models import tiny_model


def test_nll_equals_hf_loss(family_model):
    _, model = family_model
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids).loss.item()
    assert math.isclose(evaluate.nll(model, ids, batch_size=3, desc=None), hf, rel_tol=1e-5)
    # token weighting: batching does not change the value
    assert math.isclose(evaluate.nll(model, ids, batch_size=2, desc=None), hf, rel_tol=1e-5)


def _layer_inputs(model, layer, ids):
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_mse_both_input_readings(family):
    model = tiny_model(family)
    fp = models.fp_snapshot(model)
    reference = tiny_model(family)  # the same FP weights (seeded), never quantized
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for inputs in ("own", "fp"):
        assert all(v == 0 for v in evaluate.layer_mse(model, fp, ids, inputs=inputs, desc=None).values())
    quant.prepare(models.stack_linears(model), 3, "minmax")
    quant.bake(models.stack_linears(model))
    baked = {n: m.weight.detach().clone() for n, m in models.stack_linears(model).items()}
    own = evaluate.layer_mse(model, fp, ids, desc=None)
    fp_in = evaluate.layer_mse(model, fp, ids, inputs="fp", desc=None)
    assert list(own) == list(models.stack_linears(model)) and all(v > 0 for v in own.values())
    # the FP pass exchanges weights in place and restores them exactly, snapshot included
    for n, m in models.stack_linears(model).items():
        assert torch.equal(m.weight, baked[n]) and not torch.equal(fp[n], baked[n])
    # block 0's first linear sees the embeddings in both readings; a deep layer does not
    names = list(own)
    assert own[names[0]] == pytest.approx(fp_in[names[0]], rel=1e-6)
    deep = names[-1]  # last linear of the last block
    w_q, w = models.weight_matrix(models.stack_linears(model)[deep]), models.weight_matrix(
        models.stack_linears(model)[deep], fp[deep])
    for inputs, net, mse in (("own", model, own), ("fp", reference, fp_in)):
        x = _layer_inputs(net, models.stack_linears(net)[deep], ids)
        expected = (x @ (w_q - w).t()).pow(2).mean().item()
        assert mse[deep] == pytest.approx(expected, rel=1e-4), inputs
    assert own[deep] != pytest.approx(fp_in[deep], rel=1e-3)  # the readings differ at depth
    assert evaluate.weight_distance(model, fp) > 0
    with pytest.raises(ValueError, match="inputs"):
        evaluate.layer_mse(model, fp, ids, inputs="quantized", desc=None)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_layer_mse_through_shared_gram_matrices_equals_the_direct_error(family):
    """q/k/v and gate/up (GPT-2: c_attn, c_fc alone) are measured through their input's Gram
    matrix: the same numbers as the direct error of every linear's captured input."""
    model = tiny_model(family)
    fp = models.fp_snapshot(model)
    quant.prepare(models.stack_linears(model), 3, "minmax")
    quant.bake(models.stack_linears(model))
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    through_grams = evaluate.layer_mse(model, fp, ids, batch_size=2, desc=None)
    linears = models.stack_linears(model)
    assert list(through_grams) == list(linears)
    inputs = {name: [] for name in linears}
    with evaluate.forward_hooks((m, lambda m_, a, o, name=name: inputs[name].append(a[0].reshape(-1, a[0].shape[-1])))
                                for name, m in linears.items()), torch.no_grad():
        evaluate.decoder_pass(model, ids, 2)
    for name, m in linears.items():
        d = models.weight_matrix(m) - models.weight_matrix(m, fp[name])
        direct = (torch.cat(inputs[name]) @ d.t()).pow(2).mean().item()
        assert through_grams[name] == pytest.approx(direct, rel=1e-5), name
    groups = evaluate.shared_inputs(model)  # c_attn | c_proj | c_fc | c_proj, or q/k/v | o | gate/up | down
    assert len(groups) == 4 * len(models.blocks(model))
    assert [len(names) for names in groups.values()][:4] == ([1, 1, 1, 1] if family == "gpt2" else [3, 1, 2, 1])
    attention = models.blocks(model)[0]
    hidden = model.config.hidden_size
    if family != "gpt2":
        outs = [attention.self_attn.q_proj.out_features, attention.self_attn.k_proj.out_features,
                attention.self_attn.v_proj.out_features]
        assert evaluate.gram_is_cheaper(hidden, outs)
        assert not evaluate.gram_is_cheaper(attention.mlp.down_proj.in_features, [hidden])
    assert not evaluate.gram_is_cheaper(hidden, [hidden])  # o_proj: a tie stays direct


def test_sequences_the_model_cannot_take_are_refused_with_the_fix():
    model = tiny_model("llama")
    too_long = torch.zeros(1, models.max_length(model) + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"seq_len=\d+ is outside what the model allows"):
        evaluate.nll(model, too_long, desc=None)
    with pytest.raises(ValueError, match="no sequences"):
        evaluate.nll(model, too_long[:0, :8], desc=None)
    with pytest.raises(ValueError, match="integer tensor, got a torch.float32 tensor"):
        evaluate.nll(model, torch.zeros(2, 8), desc=None)
    with pytest.raises(ValueError, match=r"token ids \[n, seq_len\]"):
        evaluate.nll(model, torch.zeros(8, dtype=torch.long), desc=None)
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate.nll(model, torch.zeros(2, 8, dtype=torch.long), batch_size=0, desc=None)
    with pytest.raises(ValueError, match=r"seq_len=\d+ is outside"):  # GPTQ / block-wise catch inputs the same way
        stack.capture(model, too_long, 1)
    other = models.fp_snapshot(tiny_model("opt"))
    with pytest.raises(ValueError, match="FP weights do not match this model's stack"):
        evaluate.layer_mse(model, other, torch.zeros(1, 8, dtype=torch.long), desc=None)


def test_layer_mse_refuses_a_model_in_fake_quant_mode():
    model = tiny_model("opt")
    fp = models.fp_snapshot(model)
    quant.prepare(models.stack_linears(model), 4, "minmax")
    with pytest.raises(ValueError, match="bake"):
        evaluate.layer_mse(model, fp, torch.zeros(1, 8, dtype=torch.long), inputs="fp", desc=None)


def test_chunked_nll_equals_unchunked(family_model):
    """Logits computed a few tokens at a time (7 here, across window boundaries) give the full-logits
    cross-entropy, window by window."""
    _, model = family_model
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, n_full = evaluate.sequence_nll(model, ids)
        chunked, n = evaluate.chunked_nll_sum(model, ids, chunk_bytes=4 * 128 * 7)
        second, _ = evaluate.sequence_nll(model, ids[1:])
    assert n * len(ids) == n_full == 2 * 23
    assert float(chunked.sum()) == pytest.approx(float(full), rel=1e-5)
    assert float(chunked[1]) == pytest.approx(float(second), rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma3"])
def test_fp_input_layer_mse_from_gram_matrices(family):
    """tr(dW G dW^T)/(n out) with the FP model's input Gram matrices equals the FP-input pass."""
    model = tiny_model(family)
    fp = models.fp_snapshot(model)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    grams = evaluate.input_grams(model, ids, batch_size=2, desc=None)
    linears = models.stack_linears(model)
    assert set(grams) == set(linears) and all(n == 3 * 16 for _, n in grams.values())
    if family == "gemma3":  # q/k/v read one tensor: one Gram matrix, shared
        assert grams["model.layers.0.self_attn.q_proj"][0] is grams["model.layers.0.self_attn.v_proj"][0]
    assert evaluate.gram_bytes(model) >= sum(4 * G.numel() for G, _ in {id(g[0]): g for g in grams.values()}.values())
    quant.prepare(models.stack_linears(model), 3, "minmax")
    quant.bake(models.stack_linears(model))
    from_grams = evaluate.layer_mse_from_grams(model, fp, grams)
    from_pass = evaluate.layer_mse(model, fp, ids, batch_size=2, inputs="fp", desc=None)
    assert list(from_grams) == list(from_pass)
    for name in from_pass:
        assert from_grams[name] == pytest.approx(from_pass[name], rel=1e-4, abs=1e-12), name
