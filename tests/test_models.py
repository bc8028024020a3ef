import pytest
import torch

from repro import models

from tiny_models import tiny_model

EXPECTED_LINEARS = {
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
EXPECTED_LINEARS["mistral"] = EXPECTED_LINEARS["llama"]
EXPECTED_LINEARS["gemma3"] = EXPECTED_LINEARS["llama"]  # its q/k norms and four block norms are not linears
EXPECTED_LINEARS["qwen2"] = EXPECTED_LINEARS["llama"]
EXPECTED_LINEARS["phi3"] = ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]


def test_blocks_and_linears(family_model):
    family, model = family_model
    assert len(models.blocks(model)) == 2
    assert list(models.block_linears(models.blocks(model)[0])) == EXPECTED_LINEARS[family]
    stack = models.stack_linears(model)
    assert len(stack) == 2 * len(EXPECTED_LINEARS[family])
    # embeddings, LM head and norms are outside the stack
    stack_ids = {id(m) for m in stack.values()}
    head = model.get_output_embeddings()
    assert id(head) not in stack_ids
    assert all("embed" not in n and "wte" not in n and "norm" not in n and "ln_" not in n for n in stack)


def test_weight_matrix_is_out_by_in(family_model):
    family, model = family_model
    for m in models.stack_linears(model).values():
        x = torch.randn(3, models.weight_matrix(m).shape[1])
        y = m(x) - (m.bias if m.bias is not None else 0)
        assert torch.allclose(y, x @ models.weight_matrix(m).t(), atol=1e-5)


def test_sizes(family_model):
    _, model = family_model
    n = sum(m.weight.numel() for m in models.stack_linears(model).values())
    assert models.stack_param_count(model) == n
    assert models.weight_size_gb(model, 4) == pytest.approx(n * 4 / 8 / 1e9)
    assert models.max_length(model) == 64


def test_snapshot_restore_roundtrip():
    model = tiny_model("opt")
    snap = models.fp_snapshot(model)
    with torch.no_grad():
        for m in models.stack_linears(model).values():
            m.weight.zero_()
    models.restore(model, snap)
    for name, m in models.stack_linears(model).items():
        assert torch.equal(m.weight, snap[name])


def test_a_model_that_is_not_a_causal_lm_is_named():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="BertForMaskedLM is not a causal LM.*AutoModelForCausalLM"):
        models.blocks(model)
    import types

    from repro.methods.gptq import gptq
    from repro.config import RunConfig

    calibration = torch.randint(0, 32, (2, 8))
    with pytest.raises(ValueError, match="not a causal LM"):  # a method says so too, not KeyError
        gptq(model, types.SimpleNamespace(calibration=calibration), RunConfig(method="gptq", bits=4, observer="minmax"))


def test_a_causal_lm_without_a_block_list_is_named():
    model = tiny_model("llama")
    model.config.num_hidden_layers = 5  # no ModuleList of 5 blocks
    with pytest.raises(ValueError, match=r"no decoder block list in LlamaForCausalLM.*num_hidden_layers \(= 5\)"):
        models.blocks(model)


def test_block_paths_of_known_families():
    paths = {family: models.block_path(tiny_model(family)) for family in ("gpt2", "opt", "llama", "phi3")}
    assert paths == {"gpt2": "transformer.h", "opt": "model.decoder.layers", "llama": "model.layers",
                     "phi3": "model.layers"}


def test_unknown_model_offline_names_the_embedded_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFoundError, match="smollm2-135m"):
        models.load_model("no-such-org/no-such-model")


def test_unreachable_hub_is_detected_by_one_short_probe(monkeypatch):
    """Without HF_HUB_OFFLINE, an unreachable endpoint is found by one connection attempt, and the
    error says so and names the embedded default (instead of ~40 s of the libraries' retries)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert models.hub_unreachable().startswith("no connection to 127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_unreachable() == "HF_HUB_OFFLINE is set"
    with pytest.raises(models.ModelNotFoundError, match="hub is unreachable .*HF_HOME.*smollm2-135m"):
        models.load_model("no-such-org/no-such-model")
