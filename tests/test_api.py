"""repro.quantize: one call from a model and text (or Data) to a quantized stack, without a tier."""
import tempfile

import pytest
import torch

import repro
from repro import models, quant
from repro.api import calibration_data
from test_qaft import tiny_data
from tiny_models import VOCAB, tiny_model


class CharTokenizer:
    """A tokenizer stand-in: one id per character (mod the tiny vocabulary), BOS = 1 in front."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, **_):
        ids = [2 + ord(ch) % (VOCAB - 2) for ch in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def on_a_per_tensor_grid(model, bits: int) -> bool:
    """Every stack weight takes at most the 2q + 1 values of one scale's grid."""
    return all(m.weight.unique().numel() <= 2 * quant.qmax(bits) + 1 for m in models.stack_linears(model).values())


def test_rtn_needs_no_data_and_lands_on_the_grid():
    model = tiny_model("llama")
    fp = models.fp_snapshot(model)
    info = repro.quantize(model, method="rtn", bits=3)
    assert "scales" in info and on_a_per_tensor_grid(model, 3)
    assert any(not torch.equal(m.weight, fp[n]) for n, m in models.stack_linears(model).items())


def test_gptq_from_text_per_group():
    model = tiny_model("llama")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    info = repro.quantize(model, CharTokenizer(), "gptq", bits=4, granularity="group", group_size=16,
                          calibration=text, seq_len=16, n_calibration=8, damping_grid=[0.01, 1.0])
    assert set(info["layers"]) == set(models.stack_linears(model))


def test_qaft_keeps_its_resume_state_out_of_the_shared_cache_and_leaves_none_behind(tmp_path, monkeypatch):
    """The resume state goes to a fresh temporary directory (the shared cache's is keyed by a config that
    does not know a user's model), removed when the call returns."""
    cache, scratch = tmp_path / "cache", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("REPRO_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model = tiny_model("llama")
    info = repro.quantize(model, method="qaft", bits=4, calibration=tiny_data(seq_len=12), epochs=1, lr_grid=[1e-3])
    assert info["epochs"] == 1 and len(info["runs"]) == 1
    assert not cache.exists() and list(scratch.iterdir()) == []


def test_bad_choices_fail_before_any_work():
    model = tiny_model("llama")
    fp = models.fp_snapshot(model)
    with pytest.raises(ValueError, match="bits"):
        repro.quantize(model, method="rtn", bits=9)
    with pytest.raises(ValueError, match="unknown method"):
        repro.quantize(model, method="awq")
    with pytest.raises(ValueError, match="calibrates on data"):
        repro.quantize(model, method="gptq")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        repro.quantize(model, method="gptq", calibration="some text")
    with pytest.raises(ValueError, match="unknown QAFT option"):
        repro.quantize(model, method="qaft", calibration=tiny_data(), epoch=1)
    assert all(torch.equal(m.weight, fp[n]) for n, m in models.stack_linears(model).items())  # untouched


def test_calibration_windows_from_text():
    d = calibration_data(CharTokenizer(), ["first document " * 20, "second one " * 20], seq_len=10, n_calibration=8)
    assert d.calibration.shape == (7, 10) and d.validation.shape == (1, 10) and (d.calibration[:, 0] == 1).all()
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_data(CharTokenizer(), "short", seq_len=64)
