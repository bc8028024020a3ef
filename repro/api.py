"""One call from a model and some text to a quantized model: ``repro.quantize``.

Everything here is the library's own machinery (``repro.config.RunConfig`` checks the choice, a
method of ``repro.methods`` quantizes, ``repro.data`` cuts the windows) without a tier: the defaults
are stated in ``quantize``'s docstring, and nothing is cached or recorded.
"""
from __future__ import annotations

import tempfile
from contextlib import nullcontext

import torch

from repro import data as data_mod
from repro import models
from repro.config import RunConfig
from repro.methods import METHODS


def calibration_data(tokenizer, texts, seq_len: int = 512, n_calibration: int = 128, holdout: float = 0.125,
                     seed: int = 0) -> data_mod.Data:
    """A ``repro.data.Data`` from your own text: ``texts`` (a string or a list of documents) joined and
    tokenised, ``n_calibration`` random windows of ``seq_len`` tokens (BOS first where the tokenizer
    adds one) drawn by ``seed``; a ``holdout`` fraction of them (at least one) is the validation split
    a fine-tuning method selects on, and doubles as "test" (``quantize`` measures nothing on it)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("calibration: a string, a list of strings (documents) or a repro.data.Data")
    bos = data_mod.bos_token_id(tokenizer)
    ids = data_mod.tokenize(tokenizer, "\n\n".join(texts))
    span = seq_len - (bos is not None)
    if ids.numel() < span + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}: "
                         f"give more text or a shorter seq_len")
    windows = data_mod.with_bos(data_mod.random_windows(ids, span, n_calibration, seed), bos)
    n_held = max(1, round(holdout * len(windows)))
    if n_held >= len(windows):
        raise ValueError(f"n_calibration={n_calibration}: at least 2 windows, one to fit and one held out")
    held = windows[:n_held]
    return data_mod.Data(calibration=windows[n_held:], validation=held, test=held, corpus="user", seq_len=seq_len)


def quantize(model, tokenizer=None, method: str = "gptq", bits: int = 4, granularity: str = "tensor",
             group_size: int = 128, calibration=None, observer: str = "mse", seq_len: int = 512,
             n_calibration: int = 128, batch_size: int = 4, seed: int = 0, **options) -> dict:
    """Quantize ``model``'s transformer stack in place with ``method`` and return the method's info.

    ``model``: a transformers causal LM (its decoder blocks' linears are quantized; embeddings, norms and
    the LM head stay as they are). ``method``: "rtn", "gptq", "qaft", "fpft" or "blockwise"
    (``repro.methods.METHODS``); ``bits`` 2..8 on a symmetric integer grid with one scale per tensor,
    output channel or group of ``group_size`` input columns (``granularity``); ``observer``: how
    scales are set from the FP weights ("mse": the per-width optimum of the weight error, the default;
    "minmax"; "histogram", per tensor only). ``calibration``: a ``repro.data.Data``, or text (a string
    or a list of documents) cut by ``calibration_data`` into ``n_calibration`` windows of ``seq_len``
    tokens (needs ``tokenizer``); methods that need no data (RTN) take None. ``options``: the method's
    own (defaults: its module's ``DEFAULTS``, e.g. GPTQ's damping grid, QAFT's epochs and lr grid;
    a QAFT/FPFT resume state goes to a fresh temporary directory unless ``checkpoint_dir`` is given).

    The choice is checked as the CLI checks it, before any work (a ValueError names the problem).
    Returns what the method records (per-layer dampings, training history ...). Evaluate with
    ``repro.evaluate.nll(model, windows)``; keep with ``repro.export.export``.
    """
    own_dir = method in ("qaft", "fpft") and "checkpoint_dir" not in options
    # the default resume directory is keyed by the config, which does not know your model: a fresh one,
    # removed when the call returns (its state can only resume this call)
    with (tempfile.TemporaryDirectory(prefix=f"repro-{method}-", ignore_cleanup_errors=True) if own_dir
          else nullcontext()) as scratch:
        if own_dir:
            options["checkpoint_dir"] = scratch
        config = RunConfig(method=method, bits=bits if METHODS.get(method) is None or METHODS[method].quantizes else None,
                           model=getattr(getattr(model, "config", None), "_name_or_path", "") or "user",
                           observer=observer, granularity=granularity, group_size=group_size, seq_len=seq_len,
                           n_calibration=n_calibration, batch_size=batch_size, seed=seed, options=options)
        if calibration is None:
            if method not in ("rtn", "fp"):
                raise ValueError(f"method {method!r} calibrates on data: pass calibration= (text or a repro.data.Data)")
            windows = torch.zeros(1, 2, dtype=torch.long)  # RTN reads no data
            calibration = data_mod.Data(windows, windows, windows, "user", 2)
        elif not isinstance(calibration, data_mod.Data):
            if tokenizer is None:
                raise ValueError("calibration text needs the model's tokenizer: quantize(model, tokenizer, ...)")
            calibration = calibration_data(tokenizer, calibration, seq_len, n_calibration, seed=seed)
        models.stack_linears(model)  # a model without a known block list fails here, with the names looked for
        torch.manual_seed(seed)
        return METHODS[method].run(model, calibration, config)
