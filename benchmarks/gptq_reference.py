"""The reference GPTQ layer solve that ``benchmarks/gptq_bench.py`` times ``repro`` against.

A port of ``GPTQ.fasterquant`` from IST-DASLab's reference implementation (Frantar et al.,
2023; github.com/IST-DASLab/gptq, ``gptq.py``), written from the published algorithm for one
weight matrix with a fixed per-tensor symmetric grid (no groups, no act-order): damp the
Hessian by ``percdamp * mean(diag H)``, factor its inverse as ``cholesky -> cholesky_inverse ->
cholesky(upper)``, then sweep the columns in blocks of 128 with an immediate rank-1 update
inside the block (a ``[out, 1] @ [1, count]`` matmul, as the original) and one lazy matmul for
the columns after it. The only change is the grid: ``repro.quant.quantize`` (codes ``-q..q``)
instead of the original's ``2**bits`` levels, so both solves target the same grid and their
results can be compared entry by entry.
"""
from __future__ import annotations

import torch

from repro.quant import quantize


def fasterquant(W: torch.Tensor, H: torch.Tensor, scale, bits: int, percdamp: float = 0.01,
                blocksize: int = 128) -> torch.Tensor:
    """GPTQ of ``W`` [out, in] with Hessian ``H`` [in, in] onto ``scale * {-q..q}``; returns ``Q``."""
    W, H = W.float().clone(), H.float().clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize(w.unsqueeze(1), scale, bits).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q
