"""Metrics: global NLL / perplexity, layer-wise output MSE, weight distance to FP."""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from repro.models import stack_linears, weight_matrix
from repro.quant import is_prepared
from repro.progress import progress


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def batches(sequences: torch.Tensor, batch_size: int, desc: str | None = None):
    """Yield ``[b, seq_len]`` slices of ``sequences`` with a progress bar when ``desc`` is set."""
    starts = range(0, len(sequences), batch_size)
    for s in progress(starts, enabled=desc is not None, desc=desc, leave=False):
        yield sequences[s: s + batch_size]


def sequence_nll(model, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats, differentiable) and the number of predicted tokens."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch).logits[:, :-1].float()
    target = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
    return loss, target.numel()


@torch.no_grad()
def nll(model, sequences: torch.Tensor, batch_size: int = 4, desc: str | None = "NLL") -> float:
    """Token-weighted mean next-token NLL (nats/token) over ``sequences`` ``[n, seq_len]``.

    Every token after the first of each sequence is predicted from the tokens before it in
    the same sequence; perplexity = exp(nll).
    """
    total, count = 0.0, 0
    for batch in batches(sequences, batch_size, desc):
        loss, n = sequence_nll(model, batch)
        total += float(loss)
        count += n
    return total / count


def perplexity(nll_value: float) -> float:
    return math.exp(min(nll_value, 700.0))


LAYER_INPUTS = ("own", "fp")


@contextmanager
def exchanged_weights(model, snapshot: dict[str, torch.Tensor]):
    """Swap the stack's weights with ``snapshot``'s, layer by layer, in place; swap back on exit.

    Inside the block the model runs with the snapshot's weights and ``snapshot`` holds the
    model's (same dict object). One layer's temporary at a time, no second copy of the stack.
    """
    linears = stack_linears(model)
    if any(is_prepared(m) for m in linears.values()):
        raise ValueError("the model is in fake-quant mode; call repro.quant.bake(model) first")

    def exchange():
        for name, m in linears.items():
            current = m.weight.detach().to(snapshot[name].device, copy=True)
            m.weight.copy_(snapshot[name])
            snapshot[name] = current

    with torch.no_grad():
        exchange()
    try:
        yield
    finally:
        with torch.no_grad():
            exchange()


@contextmanager
def recording_layer_mse(model, fp_weights: dict[str, torch.Tensor]):
    """Hooks on every stack linear that accumulate ``((Q(W) - W) x)^2`` for the inputs ``x``
    of whatever forward passes run inside the block; yields a dict that holds, after the
    block, name -> mean over tokens and output features (see ``layer_mse``). ``Q(W) - W`` is
    formed one layer at a time in the hook, never for the whole stack at once."""
    linears = stack_linears(model)
    sums = dict.fromkeys(linears, 0.0)
    counts = dict.fromkeys(linears, 0)
    result = {}

    def hook(name):
        def record(module, args, output):
            other = fp_weights[name].to(module.weight.device)
            delta = (weight_matrix(module) - weight_matrix(module, other)).float()  # sign: irrelevant
            err = args[0].reshape(-1, args[0].shape[-1]).float() @ delta.t()
            sums[name] += float(err.pow(2).sum())
            counts[name] += err.numel()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    result.update({name: sums[name] / max(counts[name], 1) for name in linears})


@torch.no_grad()
def layer_mse(model, fp_weights: dict[str, torch.Tensor], sequences: torch.Tensor, batch_size: int = 4,
              inputs: str = "own", desc: str | None = "layer MSE") -> dict[str, float]:
    """Layer-wise output MSE of every quantized stack linear, name -> float.

    For layer l with FP weight ``W`` (from ``fp_weights``, as stored by
    ``repro.models.fp_snapshot``) and current weight ``Q(W)`` (the quantized model being
    measured): ``mean(((Q(W) - W) x)^2)`` over all tokens of ``sequences`` ``[n, seq_len]`` and
    all output features. Bias cancels. Units: squared activation units. ``x`` is the input the
    layer receives when ``sequences`` flow through

    * ``inputs="fp"``: the full-precision network (the paper's eq. 2: x_l is defined by f), or
    * ``inputs="own"``: the quantized model itself (what a sequential method such as GPTQ
      calibrates on: block i sees the outputs of the already-quantized blocks 0..i-1).

    The two agree for the first layer of block 0 and drift apart with depth as the quantized
    activations move away from the FP ones. For ``"fp"`` the weights are exchanged in place with
    ``fp_weights`` during the pass (``exchanged_weights``) and restored after it. The pass stops
    before the LM head (``model.base_model``), which no stack linear needs.
    """
    if inputs not in LAYER_INPUTS:
        raise ValueError(f"inputs={inputs!r}: use 'own' (the quantized model's inputs) or 'fp' (the FP model's)")
    context = exchanged_weights(model, fp_weights) if inputs == "fp" else nullcontext()
    with context, recording_layer_mse(model, fp_weights) as mse:
        for batch in batches(sequences, batch_size, desc):
            model.base_model(input_ids=batch.to(model_device(model)), use_cache=False)
    return mse


@torch.no_grad()
def weight_mse(model, fp_weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer ``mean((Q(W) - W)^2)``: the weight-space error an observer's scale minimises."""
    return {name: float((m.weight.detach().float().cpu() - fp_weights[name].float()).pow(2).mean())
            for name, m in stack_linears(model).items()}


@torch.no_grad()
def weight_distance(model, fp_weights: dict[str, torch.Tensor]) -> float:
    """L2 norm ``||w_q - w||`` over the concatenated stack weights (landscape x-axis)."""
    sq = 0.0
    for name, m in stack_linears(model).items():
        sq += float((m.weight.detach().float().cpu() - fp_weights[name].float()).pow(2).sum())
    return math.sqrt(sq)
