"""Metrics: global NLL / perplexity, layer-wise output MSE, weight distance to FP."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from repro.models import stack_linears, weight_matrix
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


@torch.no_grad()
def layer_mse(model, fp_weights: dict[str, torch.Tensor], sequences: torch.Tensor,
              batch_size: int = 4, desc: str | None = "layer MSE") -> dict[str, float]:
    """Layer-wise output MSE of every quantized stack linear, name -> float.

    For layer l with FP weight ``W`` (from ``fp_weights``, as stored by
    ``repro.models.fp_snapshot``) and current weight ``Q(W)`` (the quantized model being
    measured): ``mean((Q(W) x - W x)^2)`` over all tokens and output features, where ``x`` is
    the input the layer receives when ``sequences`` flow through the *quantized* model (the
    GPTQ objective, paper eq. 2). Bias cancels. Units: squared activation units.
    """
    linears = stack_linears(model)
    sums = dict.fromkeys(linears, 0.0)
    counts = dict.fromkeys(linears, 0)
    deltas = {}
    for name, m in linears.items():
        w_fp = weight_matrix(m, fp_weights[name].to(m.weight.device))
        deltas[name] = (weight_matrix(m) - w_fp).float()

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            err = x @ deltas[name].t()
            sums[name] += float(err.pow(2).sum())
            counts[name] += err.numel()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        for batch in batches(sequences, batch_size, desc):
            model(input_ids=batch.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / max(counts[name], 1) for name in linears}


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
