"""Real behaviour on the embedded SmolLM2-135M and the wiki corpus."""
import pytest

from repro import models, runs
from repro.config import make_config

pytestmark = pytest.mark.embedded


def test_embedded_model_structure(embedded):
    model, tokenizer = embedded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(models.blocks(model)) == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(models.stack_linears(model)) == 210
    assert tokenizer.decode(tokenizer("Quantization of weights")["input_ids"]) == "Quantization of weights"


def test_rtn_int8_near_fp_and_int2_far_worse(ci_outputs):
    # the paper's premise that int8 is nearly lossless, under the embedded tiers' observers (chosen per
    # bit-width); ci-tier runs in the session's results (its FP record is the notebooks')
    fp, int8, int2 = (runs.run(make_config(method, bits, tier="ci"), ci_outputs)
                      for method, bits in (("fp", None), ("rtn", 8), ("rtn", 2)))
    assert (int8["config"]["observer"], int2["config"]["observer"]) == ("minmax", "mse")
    assert int8["nll_validation"] <= 1.03 * fp["nll_validation"]
    assert int2["nll_validation"] > fp["nll_validation"] + 3
    for key in ("mean_layer_mse", "mean_layer_mse_fp_inputs"):
        assert int2[key] > 10 * int8[key], key


def test_sequence_longer_than_model_allows_is_rejected_before_work(tmp_path):
    with pytest.raises(ValueError, match="seq_len=9000.*8192"):
        runs.run(make_config("rtn", 4, tier="ci", seq_len=9000), tmp_path)
