"""Exporting a quantized model into a directory other tools load with ``from_pretrained``.

The model is a transformers causal LM whose stack linears (``repro.models.stack_linears``) hold
weights on a symmetric integer grid, ``w = scale * code`` with code in -q..q (``repro.quant``:
``prepare`` then ``bake``, or a method's run). Two formats:

* ``"hf"`` - the dense (fake-quantized) weights in the model's own dtype, ``model.save_pretrained``:
  loads anywhere, takes as much disk as the FP model.
* ``"compressed-tensors"`` - the integer codes packed into int32 words ("pack-quantized", the
  format llm-compressor writes for integer weight-only schemes), one scale per tensor, output channel
  or group (its "tensor" / "channel" / "group" strategies, symmetric, no zero point) and a
  ``quantization_config`` in config.json. With the ``compressed-tensors`` package installed
  (``pip install 'repro-lowbit-quant[export]'``), ``AutoModelForCausalLM.from_pretrained(directory)`` loads it: the
  linears are created packed and decompressed to dense weights (``code * scale`` in the scale's
  dtype) on the first forward pass, or at load time with
  ``quantization_config=CompressedTensorsConfig(dequantize=True)``; both run on CPU.

What compressed-tensors 0.20 can hold, from its source (and ``tests/test_export.py``):

* bits: pack-quantized packs 1..8 bits densely (32 codes into ``bits`` int32 words), so every grid
  here (2..8 bits) fits. Its symmetric integer range is -2**(bits-1)..2**(bits-1)-1 (-8..7 at 4
  bits); ours, -q..q, is a subset, so every code is stored as it is.
* scales: stored in the weight's dtype (float32 for a float32 model), shaped (1,) per tensor,
  [out, 1] per channel, [out, in / group_size] per group - the layout ``repro.quant.Grid`` uses.
* not held: GPT-2's ``Conv1D`` layers (it quantizes ``nn.Linear`` and ``nn.Embedding`` modules only),
  and groups that do not divide a layer's input columns (its group kernel rejects a shorter last
  group, which ``Grid`` allows). ``export`` raises a ValueError for these, before writing anything;
  format "hf" takes them.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from repro import models
from repro.quant import Grid, as_grid, is_prepared

FORMATS = ("hf", "compressed-tensors")


def export(model, directory, format: str = "hf", *, grid: Grid | int | None = None,
           scales: dict[str, torch.Tensor | float] | None = None, tokenizer=None) -> Path:
    """Write ``model`` (its stack baked onto ``grid``) to ``directory`` in ``format``; returns the
    directory. ``AutoModelForCausalLM.from_pretrained(directory)`` gives back the same weights, bit for
    bit (``tests/test_export.py``).

    ``grid`` (a ``Grid``, or bits per tensor) and ``scales`` (stack linear name -> the scale its
    weight was quantized with: 0-d per tensor, [out, 1] per channel, [out, ceil(in / group_size)] per
    group of the [out, in] matrix, as ``repro.quant.bake`` returns them) are what "compressed-tensors"
    stores the integer codes against; "hf" writes the dense weights and needs neither. ``tokenizer``
    (optional) is saved alongside. The model itself is left as it is ("compressed-tensors" packs a
    copy: memory for a second model while it runs).

    Raises a ValueError, before anything is written, for an unknown format, a stack still in
    fake-quant mode, or (compressed-tensors) a grid or layer that format cannot hold, a missing or
    misshapen scale, or a weight that is not ``scale * code`` on the grid.
    """
    _check_format(format)
    linears = models.stack_linears(model)
    prepared = [name for name, module in linears.items() if is_prepared(module)]
    if prepared:  # save_pretrained would write the latent FP weights under parametrization names
        raise ValueError(f"{prepared[0]} (and {len(prepared) - 1} more) is still in fake-quant mode: "
                         f"call repro.quant.bake(repro.models.stack_linears(model)) before exporting")
    compressor = None
    if format == "compressed-tensors":
        model, compressor = _packed_copy(model, grid, scales)
    directory = Path(directory)
    model.save_pretrained(directory)
    if compressor is not None:
        compressor.update_config(directory)  # the quantization_config entry of config.json
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def export_run(config, directory, format: str = "hf", outputs=None) -> Path:
    """Export the quantized model of a run (a ``repro.config.RunConfig`` of a quantizing method) to
    ``directory`` in ``format``, with its tokenizer; returns the directory.

    The run's kept weights (integer codes and scales, ``repro.store.save_weights``) are computed
    first when missing (``repro.runs.load_weights``: the record itself is reused, or computed like any
    run), then written into a freshly loaded copy of the model, so ``export`` stores the codes and
    scales the run produced."""
    from repro import runs

    _check_format(format)  # before any computation
    if config.grid is None:
        raise ValueError(f"method {config.method!r} quantizes nothing: export the model itself with "
                         f"save_pretrained, or choose a quantizing method")
    model, tokenizer, scales = runs.quantized_model(config, outputs)
    return export(model, directory, format, grid=config.grid, scales=scales, tokenizer=tokenizer)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")


def check_compressed_tensors(model, grid: Grid | int) -> None:
    """Raise a ValueError naming the first stack layer of ``model`` that compressed-tensors cannot
    hold on ``grid`` (a GPT-2 Conv1D layer; a group size that does not divide its input columns)."""
    grid = as_grid(grid)
    for name, module in models.stack_linears(model).items():
        if models.is_conv1d(module):
            raise ValueError(f"{name} is a GPT-2 Conv1D layer: compressed-tensors quantizes nn.Linear (and "
                             f"nn.Embedding) modules only, so a loader would not unpack it; export with "
                             f"format='hf' (dense weights)")
        columns = models.weight_matrix(module).shape[-1]
        if grid.groups and columns % grid.groups:
            raise ValueError(f"{name} has {columns} input columns, not a multiple of the group size "
                             f"{grid.groups}: compressed-tensors' group strategy needs whole groups; quantize "
                             f"with a group size that divides every layer's input columns, or export with "
                             f"format='hf' (dense weights)")


def _packed_copy(model, grid: Grid | int | None, scales: dict | None):
    """A copy of ``model`` whose stack linears hold packed int32 codes and scales (compressed-tensors'
    pack-quantized layout), and the ``ModelCompressor`` that writes its config; checked to unpack to
    the model's weights exactly."""
    if grid is None or scales is None:
        raise ValueError("format 'compressed-tensors' stores integer codes against their scales: pass grid= "
                         "(the Grid the stack was quantized on) and scales= (name -> scale, as "
                         "repro.quant.bake returns them)")
    grid = as_grid(grid)
    check_compressed_tensors(model, grid)
    linears = models.stack_linears(model)
    checked = {}
    for name, module in linears.items():
        if name not in scales:
            raise ValueError(f"scales has no entry for {name}: give one per stack linear")
        scale, expected = torch.as_tensor(scales[name]), grid.scale_shape(*models.weight_matrix(module).shape)
        if tuple(scale.shape) != expected and not (grid.per_tensor and scale.numel() == 1):
            raise ValueError(f"{name}: a scale of shape {list(scale.shape)} on a {grid.name} grid; expected "
                             f"{list(expected)} (per tensor 0-d, per channel [out, 1], per group "
                             f"[out, in / group_size])")
        checked[name] = scale
    try:
        from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     apply_quantization_config)
        from compressed_tensors.utils import get_direct_state_dict
    except ImportError as err:
        raise ImportError("format 'compressed-tensors' needs the compressed-tensors package: "
                          "pip install 'repro-lowbit-quant[export]'") from err

    weights = QuantizationArgs(num_bits=grid.bits, type="int", symmetric=True, strategy=grid.granularity,
                               group_size=grid.groups)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)})
    packed = copy.deepcopy(model)
    packed_linears = models.stack_linears(packed)
    # only the stack: the LM head and any other linear outside it go to the config's ignore list
    apply_quantization_config(packed, config, allowed_modules=list(packed_linears.values()), show_progress=False)
    with torch.no_grad():
        for name, module in packed_linears.items():
            # the scale in the weight's dtype (as apply_quantization_config made it): what FakeQuant rounded onto
            module.weight_scale.copy_(checked[name].reshape(module.weight_scale.shape))
            # compression re-derives the codes as round(w / scale) in the weight's dtype. A bfloat16 weight
            # is code * scale rounded (up to 127 * 2**-9 off the code at 8 bits); a bfloat16 quotient adds as
            # much again and can round to the next code, a float32 one adds next to nothing
            module.weight.data = module.weight.data.float()
    compressor = ModelCompressor.from_pretrained_model(packed, CompressionFormat.pack_quantized.value)
    compressor.compress_model(packed)
    for name, module in packed_linears.items():
        # unpack as a loader does: a weight off its grid (or a scale the weight's dtype rounds) comes back changed
        unpacked = PackedQuantizationCompressor.decompress(get_direct_state_dict(module),
                                                           module.quantization_scheme)["weight"]
        weight = linears[name].weight.detach()
        if not torch.equal(unpacked, weight):  # both in the weight's dtype (the scale's)
            error = float((unpacked - weight).abs().max())
            raise ValueError(f"{name} is not scale * code on its int{grid.bits} {grid.name} grid with the given "
                             f"scale (unpacked weights differ by up to {error:.3g}): export the baked model with "
                             f"the scales it was baked with, or use format='hf'")
    return packed, compressor
