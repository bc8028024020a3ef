import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repro import quant
from repro.models import stack_linears

from tiny_models import tiny_model

bits_st = st.integers(min_value=2, max_value=8)


def _student_t(g, n, df):
    """Heavy-tailed (Student-t, ``df`` integer) sample, like LLM weights."""
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(n, int(df), generator=g).pow(2).sum(1)
    return 0.1 * z / torch.sqrt(chi2 / df)


@settings(max_examples=40, deadline=None)
@given(bits=bits_st, seed=st.integers(0, 10_000), observer=st.sampled_from(["minmax", "mse"]))
def test_grid_properties(bits, seed, observer):
    w = _student_t(torch.Generator().manual_seed(seed), 2048, 4)
    scale = quant.compute_scale(w, bits, observer)
    q = quant.quantize(w, scale, bits)
    codes = quant.codes(q, scale, bits)
    assert torch.allclose(q / scale, codes.float(), atol=1e-4)  # q lies on integer codes
    assert codes.abs().max() <= 2 ** (bits - 1) - 1  # symmetric range, no -2^(B-1)
    assert torch.equal(quant.quantize(-w, scale, bits), -q)  # symmetric
    assert torch.equal(quant.quantize(q, scale, bits), q)  # Q(Q(w)) = Q(w)
    assert torch.equal(codes.float() * scale, q)  # codes recovered exactly


def test_ste_gradient_is_identity():
    w = torch.randn(64, requires_grad=True)
    upstream = torch.randn(64)
    (quant.fake_quant(w, torch.tensor(0.05), 3) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_observer_scales_against_brute_force(seed, bits):
    w = _student_t(torch.Generator().manual_seed(seed), 10_000, 3)
    err = {obs: quant.quant_error(w, quant.compute_scale(w, bits, obs), bits) for obs in quant.OBSERVERS}
    # brute force: 1000 candidate scales between 1% and 100% of the minmax scale
    top = w.abs().max() / quant.qmax(bits)
    brute = min(quant.quant_error(w, top * r, bits) for r in torch.linspace(0.01, 1, 1000))
    assert err["histogram"] <= err["minmax"] * (1 + 1e-6)
    assert err["mse"] <= 1.001 * brute
    # torch's HistogramObserver is NOT near-optimal for a symmetric grid: its greedy search
    # shrinks min and max independently and stops at the first increase, and the symmetric
    # scale then takes the larger side. Measured ratio to brute force: 1.01-1.12 at int8,
    # 2-8 at int4/int3 (README, "Observers"). Pin that the MSE search beats it, so the
    # finding is re-checked whenever torch changes.
    assert err["mse"] <= err["histogram"]


@pytest.mark.parametrize("bad", [1, 9, 0, 4.5, True, "4"])
def test_bits_outside_range_rejected(bad):
    with pytest.raises(ValueError, match="2..8"):
        quant.check_bits(bad)


def test_unknown_observer_rejected():
    with pytest.raises(ValueError, match="histogram, mse, minmax"):
        quant.compute_scale(torch.ones(4), 4, "percentile")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prepare_then_bake_leaves_grid_weights(family):
    model = tiny_model(family)
    before = {n: m.weight.detach().clone() for n, m in stack_linears(model).items()}
    ids = torch.randint(0, 128, (2, 16))
    fp_logits = model(input_ids=ids).logits
    scales = quant.prepare(stack_linears(model), 3, "minmax")
    fq_logits = model(input_ids=ids).logits
    assert not torch.allclose(fp_logits, fq_logits)
    assert len(scales) == len(before) > 0
    baked_scales = quant.bake(stack_linears(model))
    assert baked_scales.keys() == before.keys()
    assert torch.allclose(model(input_ids=ids).logits, fq_logits, atol=1e-5)
    for name, m in stack_linears(model).items():
        assert not quant.is_prepared(m)
        assert isinstance(m.weight, torch.nn.Parameter)
        c = quant.codes(m.weight, baked_scales[name], 3)
        assert torch.equal(c.float() * baked_scales[name], m.weight.detach())  # exact recovery
        assert torch.equal(m.weight.detach(), quant.quantize(before[name], scales[name], 3))


def test_prepared_model_trains_latent_weights():
    model = tiny_model("llama")
    quant.prepare(stack_linears(model), 4, "minmax")
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for m in stack_linears(model).values():
        assert quant.fp_weight(m).grad is not None and quant.fp_weight(m).grad.abs().sum() > 0


def test_histogram_observer_clip_range_ignores_bits():
    """torch's HistogramObserver searches its range for 2**8 levels whatever quant_min/max say:
    the clip range q * scale is the same at 4 and 2 bits as at 8, while the exact MSE range
    shrinks with the grid. (If torch ever fixes this, the README's observer section changes.)"""
    w = _student_t(torch.Generator().manual_seed(0), 32_768, 3)
    clip = {b: float(quant.compute_scale(w, b, "histogram")) * quant.qmax(b) for b in (8, 4, 2)}
    assert clip[4] == pytest.approx(clip[8], rel=1e-5) and clip[2] == pytest.approx(clip[8], rel=1e-5)
    mse_clip = {b: float(quant.compute_scale(w, b, "mse")) * quant.qmax(b) for b in (8, 4)}
    assert mse_clip[4] < 0.5 * mse_clip[8]


def test_prepare_refuses_another_bit_width_and_a_window_prepares_only_its_linears():
    model = tiny_model("llama")
    linears = stack_linears(model)
    window = {n: m for n, m in linears.items() if ".1." in n}  # block 1 only
    quant.prepare(window, 8, "minmax")
    assert all(quant.is_prepared(m) == (n in window) for n, m in linears.items())
    assert quant.prepare(window, 8, "minmax").keys() == window.keys()  # same width: idempotent
    with pytest.raises(ValueError, match="already in fake-quant mode at int8 per tensor, not int4 per tensor"):
        quant.prepare(window, 4, "minmax")
    with pytest.raises(ValueError, match="at int8 per tensor, not int8 per channel"):
        quant.prepare(window, quant.Grid(8, "channel"), "minmax")
    assert quant.bake(linears).keys() == window.keys()


def test_prepare_and_bake_refuse_what_is_not_a_dict_of_linears_and_ill_fitting_scales():
    model = tiny_model("llama")
    linears = stack_linears(model)
    name, layer = next(iter(linears.items()))
    with pytest.raises(TypeError, match="dict name -> linear"):
        quant.prepare([layer], 4)
    with pytest.raises(TypeError, match="dict name -> linear"):
        quant.bake(layer)
    with pytest.raises(TypeError, match="embed is an instance of Embedding"):
        quant.prepare({"embed": model.get_input_embeddings()}, 4)
    with pytest.raises(ValueError, match=f"scales has no entry for {name}"):
        quant.prepare(linears, 4, scales={})
    out = layer.weight.shape[0]
    with pytest.raises(ValueError, match=r"scale of shape \[3, 1\] does not fit a weight of shape"):
        quant.prepare({name: layer}, 4, scales={name: torch.ones(3, 1)})
    assert not quant.is_prepared(layer)  # refused before anything changed
    quant.prepare({name: layer}, quant.Grid(4, "channel"), scales={name: torch.full((out, 1), 0.01)})
    assert quant.quantizer(layer).scale.shape == (out, 1)
    with pytest.raises(ValueError, match="does not fit"):
        quant.quantize(torch.randn(8, 16), torch.ones(16, 1), 4)


def test_nan_weight_is_refused_before_quantizing():
    w = torch.randn(8, 8)
    w[3, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf value"):
        quant.compute_scale(w, 4, "minmax")
