"""repro.export: a stack baked onto a grid, written as "hf" and "compressed-tensors" and loaded back
with ``AutoModelForCausalLM.from_pretrained`` (offline, CPU), gives the same weights and logits.

Exact equality throughout: the codes are integers stored as they are and the scales keep the
weight's dtype, and the loader computes ``code * scale`` in that dtype as ``repro.quant.bake`` did,
so the weights come back bit for bit; the same weights through the same modules give the same logits.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from repro import models
from repro.export import export
from repro.quant import Grid, bake, compute_scale, prepare

from tiny_models import VOCAB, tiny_model

# tiny models' layers have 32 or 64 input columns: groups of 16 divide them all
GRIDS = [Grid(4), Grid(4, "channel"), Grid(4, "group", 16), Grid(8), Grid(8, "channel"), Grid(8, "group", 16),
         Grid(2, "channel"), Grid(3, "group", 16), Grid(6)]


def grid_id(grid: Grid) -> str:
    """A test id: int4-per-tensor, int8-per-channel, int3-g16."""
    return f"int{grid.bits}-{grid.name.replace(' ', '-')}"


def baked(family: str, grid: Grid, dtype: torch.dtype = torch.float32):
    """A tiny ``family`` model in ``dtype`` with its stack rounded to nearest on ``grid`` (minmax
    scales), and those scales (name -> tensor)."""
    model = tiny_model(family).to(dtype)
    linears = models.stack_linears(model)
    prepare(linears, grid, "minmax")
    return model, bake(linears)


def token_batch() -> torch.Tensor:
    """Three random sequences of 16 token ids: [3, 16]."""
    return torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))


def assert_same(model, loaded) -> None:
    """Same logits on ``token_batch`` and the same stack weights, exactly. The logits come first: a
    compressed-tensors model holds packed weights until its first forward pass decompresses them."""
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    ours, theirs = models.stack_linears(model), models.stack_linears(loaded)
    assert theirs.keys() == ours.keys()
    for name, module in ours.items():
        assert theirs[name].weight.dtype == module.weight.dtype
        assert torch.equal(theirs[name].weight, module.weight), name


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_compressed_tensors_round_trip(tmp_path, grid):
    model, scales = baked("llama", grid)
    directory = export(model, tmp_path / "ct", "compressed-tensors", grid=grid, scales=scales)
    written = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert (written["quant_method"], written["format"], written["quantization_status"]) == \
        ("compressed-tensors", "pack-quantized", "compressed")
    assert written["ignore"] == ["lm_head"]  # the stack only
    weights = written["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (grid.bits, grid.granularity, True)
    loaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    q_proj = models.stack_linears(loaded)["model.layers.0.self_attn.q_proj"]
    assert q_proj.weight_packed.dtype == torch.int32 and q_proj.weight_scale.dtype == torch.float32
    assert not hasattr(models.stack_linears(model)["model.layers.0.self_attn.q_proj"], "weight_scale")  # a copy packed
    assert_same(model, loaded)


@pytest.mark.parametrize("family", ["opt", "mistral", "gemma3", "qwen2", "phi3"])
def test_compressed_tensors_other_families(tmp_path, family):
    grid = Grid(4, "group", 16)
    model, scales = baked(family, grid)
    export(model, tmp_path, "compressed-tensors", grid=grid, scales=scales)
    assert_same(model, AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True))


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # dequantize is a loading attribute: taken
def test_compressed_tensors_dequantized_at_load(tmp_path):
    """``dequantize=True``: dense nn.Linear weights straight from loading, no packed tensors."""
    grid = Grid(4, "channel")
    model, scales = baked("llama", grid)
    export(model, tmp_path, "compressed-tensors", grid=grid, scales=scales)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    assert all(not hasattr(m, "weight_packed") for m in models.stack_linears(loaded).values())
    assert_same(model, loaded)


@pytest.mark.parametrize("grid", [Grid(8, "channel"), Grid(4, "group", 16)], ids=grid_id)
def test_compressed_tensors_bfloat16(tmp_path, grid):
    """A bfloat16 model: bake rounds onto the scale cast to bfloat16, the export stores that scale (and
    derives int8 codes in float32, where bfloat16's w / scale could miss one), and the weights come
    back exactly. Logits are compared with the "hf" export loaded back, not with ``model``:
    ``model.to(bfloat16)`` also casts the rotary inverse frequencies, which loading keeps in float32."""
    model, scales = baked("llama", grid, torch.bfloat16)
    export(model, tmp_path / "ct", "compressed-tensors", grid=grid, scales=scales)
    export(model, tmp_path / "hf", "hf")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", local_files_only=True)
    assert_same(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True), packed)
    assert all(torch.equal(models.stack_linears(packed)[name].weight, m.weight)
               for name, m in models.stack_linears(model).items())
    assert models.stack_linears(packed)["model.layers.0.mlp.down_proj"].weight_scale.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_round_trip_with_tokenizer(tmp_path, family):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    model, _ = baked(family, Grid(3, "channel"))
    directory = export(model, tmp_path, "hf", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(directory, local_files_only=True).convert_tokens_to_ids("a") == 1
    assert_same(model, AutoModelForCausalLM.from_pretrained(directory, local_files_only=True))


def refuses(tmp_path, match: str, model, format="compressed-tensors", **kwargs) -> None:
    """``export`` raises a ValueError matching ``match`` and writes nothing."""
    with pytest.raises(ValueError, match=match):
        export(model, tmp_path / "out", format, **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_gpt2_conv1d(tmp_path):
    grid = Grid(4, "channel")
    model, scales = baked("gpt2", grid)
    refuses(tmp_path, r"Conv1D.*format='hf'", model, grid=grid, scales=scales)


def test_refuses_ragged_groups(tmp_path):
    grid = Grid(4, "group", 24)  # 32 input columns: a last group of 8
    model, scales = baked("llama", grid)
    refuses(tmp_path, r"not a multiple of the group size 24.*format='hf'", model, grid=grid, scales=scales)


def test_refuses_weights_off_the_grid(tmp_path):
    grid = Grid(4, "channel")
    model = tiny_model("llama")  # FP weights, scales as the observer would give them
    scales = {name: compute_scale(m.weight, grid, "minmax") for name, m in models.stack_linears(model).items()}
    refuses(tmp_path, "is not scale \\* code", model, grid=grid, scales=scales)


def test_refuses_misuse(tmp_path):
    grid = Grid(4, "channel")
    model, scales = baked("llama", grid)
    refuses(tmp_path, "unknown export format", model, "gguf")
    refuses(tmp_path, "pass grid= .* and scales=", model, grid=grid)
    refuses(tmp_path, "scales has no entry", model, grid=grid, scales={})
    refuses(tmp_path, r"a scale of shape \[\] on a per channel grid", model, grid=grid,
            scales={name: s.mean() for name, s in scales.items()})
    fake_quant = tiny_model("llama")
    prepare(models.stack_linears(fake_quant), grid, "minmax")
    refuses(tmp_path, "still in fake-quant mode", fake_quant, "hf")


@pytest.mark.embedded
def test_cli_exports_an_embedded_run_that_loads_back_with_its_test_nll(tmp_path, ci_outputs):
    """`repro export` of GPTQ int4 on SmolLM2 (ci tier; the landscape's run, its weights kept by the ci
    records) in both formats: each checkpoint loads
    with from_pretrained offline and measures the record's test NLL on the record's windows. Equal to
    1e-6 nats: the same weights bit for bit through the same modules; only the batch grouping of the
    fp32 sums could differ, and it does not (same batch size)."""
    from repro import runs, store
    from repro.cli import main
    from repro.config import make_config
    from repro.evaluate import nll, windows_id

    config = make_config("gptq", 4, "ci", save_weights=True)
    for fmt in ("hf", "compressed-tensors"):
        assert main(["export", "--tier", "ci", "--method", "gptq", "--bits", "4", "--format", fmt,
                     "--outputs", str(ci_outputs), str(tmp_path / fmt)]) == 0
    record = store.read_record(config, ci_outputs)
    assert record is not None and store.weights_path(config, ci_outputs).exists()
    test_windows = runs.workbench(config).data.test  # the ci tier's tokenised windows
    assert record["windows"]["test"] == windows_id(test_windows)  # the ones the record measured
    for fmt, options in (("hf", {}), ("compressed-tensors", {"quantization_config": CompressedTensorsConfig(dequantize=True)})):
        # packed linears unpack to dense nn.Linear weights at load: repro.evaluate reads module.weight
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / fmt, local_files_only=True, **options)
        assert nll(loaded, test_windows, config.batch_size) == pytest.approx(record["nll_test"], abs=1e-6)
