"""Every registered method keeps the contract of ``repro.methods`` (tiny random models, seconds):
only the stack's linear weights change, the module tree comes back as it went in, the info is
JSON-able, and a method that keeps weights leaves them on the grid ``save_weights`` stores."""
import json

import pytest
import torch
from test_qaft import tiny_data
from tiny_models import FAMILIES, tiny_model

from repro import models, store
from repro.methods import MAIN, METHODS, QUANTIZERS, REFERENCES
from repro.config import RunConfig

# small options per method, so each finishes in about a second on a 2-layer model
FAST = {"gptq": {"damping_grid": [0.01, 1.0]}, "qaft": {"epochs": 1, "lr_grid": [1e-3]},
        "fpft": {"epochs": 1, "lr_grid": [1e-3]},
        "blockwise": {"steps": 2, "eval_every": 1, "window": 2, "lookahead": 1}}


def everything_but_stack_weights(model) -> dict:
    stack = {f"{name}.weight" for name in models.stack_linears(model)}
    state = {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items() if name not in stack}
    return {"state": state, "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_changes_only_the_stack_linear_weights(method, family, tmp_path):
    model = tiny_model(family)
    model.eval()
    before = everything_but_stack_weights(model)
    stack_before = {n: m.weight.detach().clone() for n, m in models.stack_linears(model).items()}
    options = dict(FAST.get(method, {}))
    if method in ("qaft", "fpft"):
        options["checkpoint_dir"] = str(tmp_path / "ck")
    config = RunConfig(method=method, bits=3 if METHODS[method].quantizes else None, model="tiny", observer="minmax",
                       batch_size=2, options=options)
    info = METHODS[method].run(model, tiny_data(seq_len=12), config)
    info.pop("grid_scales", None)  # tensors for save_weights, not part of the record
    json.dumps(info)  # what it records is JSON-able

    after = everything_but_stack_weights(model)
    assert after["modules"] == before["modules"]  # wrappers and parametrizations removed
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    changed = [n for n, t in before["state"].items() if not torch.equal(t, after["state"][n])]
    assert not changed, f"{method} changed {changed} (only the stack's linear weights may change)"
    stack_after = {n: m.weight for n, m in models.stack_linears(model).items()}
    assert all(w.shape == stack_before[n].shape and w.dtype == stack_before[n].dtype for n, w in stack_after.items())
    if method != "fp":
        assert any(not torch.equal(w, stack_before[n]) for n, w in stack_after.items())  # it did quantize / train
        if METHODS[method].keeps_weights:  # on the grid: save_weights refuses weights that are not
            store.save_weights(model, config, info, tmp_path / "w.safetensors", fp_weights=stack_before)


def test_the_main_methods_are_registered_in_spectrum_order():
    assert set(MAIN) <= set(METHODS) and MAIN[0] == "fp" and QUANTIZERS == MAIN[-len(QUANTIZERS):]
    assert all(METHODS[m].quantizes for m in QUANTIZERS) and not any(METHODS[m].quantizes for m in REFERENCES)
    spectrum = [METHODS[m].describe().spectrum for m in QUANTIZERS]
    assert spectrum == sorted(spectrum)
    assert len({METHODS[m].color for m in METHODS}) == len(METHODS)  # one colour each in the figures


def test_the_check_sees_a_method_that_folds_a_scale_into_a_norm():
    """What the contract forbids (e.g. SmoothQuant/AWQ-style folding into a norm) is what the check
    above compares: a norm weight changed in place shows up."""
    model = tiny_model("llama")
    before = everything_but_stack_weights(model)
    norm = next(m for n, m in model.named_modules() if n.endswith("input_layernorm"))
    with torch.no_grad():
        norm.weight.mul_(2.0)
    after = everything_but_stack_weights(model)
    assert [n for n, t in before["state"].items() if not torch.equal(t, after["state"][n])] == [
        "model.layers.0.input_layernorm.weight"]
