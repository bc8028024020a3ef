import math

import torch

from repro import evaluate, models, quant

from tiny_models import tiny_model


def test_nll_equals_hf_loss(family_model):
    _, model = family_model
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids).loss.item()
    assert math.isclose(evaluate.nll(model, ids, batch_size=3, desc=None), hf, rel_tol=1e-5)
    # token weighting: batching does not change the value
    assert math.isclose(evaluate.nll(model, ids, batch_size=2, desc=None), hf, rel_tol=1e-5)


def test_layer_mse_definition():
    model = tiny_model("gpt2")
    fp = models.fp_snapshot(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert all(v == 0 for v in evaluate.layer_mse(model, fp, ids, desc=None).values())
    quant.prepare(model, 3, "minmax")
    quant.bake(model)
    mse = evaluate.layer_mse(model, fp, ids, desc=None)
    assert len(mse) == 8 and all(v > 0 for v in mse.values())
    # direct check on one layer: the input it receives in the quantized model
    name, layer = next(iter(models.stack_linears(model).items()))
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    w_q, w = models.weight_matrix(layer), models.weight_matrix(layer, fp[name])
    expected = (x @ w_q.t() - x @ w.t()).pow(2).mean().item()
    assert math.isclose(mse[name], expected, rel_tol=1e-4)
    assert evaluate.weight_distance(model, fp) > 0
