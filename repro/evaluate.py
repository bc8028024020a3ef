"""Metrics: global NLL / perplexity, layer-wise output MSE, weight distance to FP."""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from repro.data import check_seq_len
from repro.models import blocks, max_length, stack_linears, stack_param_count, weight_matrix, weight_size_gb
from repro.quant import Grid, is_int, is_prepared
from repro.progress import progress


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_sequences(model, sequences, what: str = "sequences", allow_empty: bool = False) -> None:
    """Raise a ValueError naming the problem, before any work, when ``sequences`` cannot be fed
    to ``model``: not token ids ``[n, seq_len]`` (an integer tensor), no sequence at all (unless
    ``allow_empty``), or longer than the model's positions allow (``repro.models.max_length``)."""
    if not torch.is_tensor(sequences) or sequences.dim() != 2 or sequences.is_floating_point() or \
            sequences.dtype == torch.bool:
        got = f"a {sequences.dtype} tensor of shape {list(sequences.shape)}" if torch.is_tensor(sequences) \
            else type(sequences).__name__
        raise ValueError(f"{what}: expected token ids [n, seq_len] as an integer tensor, got {got} "
                         f"(repro.data.make_data builds them)")
    if sequences.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{what}: no sequences (shape {list(sequences.shape)}); "
                         f"make_data's n_eval / n_calibration must be >= 1")
    try:
        limit = max_length(model)
    except ValueError:  # a model that does not say: let it decide
        return
    try:
        check_seq_len(sequences.shape[1], limit)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def batches(sequences: torch.Tensor, batch_size: int, desc: str | None = None):
    """Yield ``[b, seq_len]`` slices of ``sequences`` with a progress bar when ``desc`` is set."""
    if not is_int(batch_size, 1):
        raise ValueError(f"batch_size={batch_size!r}: an integer >= 1 (sequences per forward pass)")
    starts = range(0, len(sequences), batch_size)
    for s in progress(starts, enabled=desc is not None, desc=desc, leave=False):
        yield sequences[s: s + batch_size]


@contextmanager
def forward_hooks(hooks):
    """Forward hooks ``(module, fn)`` registered for the block, removed after it."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decoder_pass(model, sequences: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> None:
    """Run the decoder (``model.base_model``: the stack, never the LM head) over ``sequences``
    in mini-batches, for what hooks record; the outputs are dropped."""
    check_sequences(model, sequences)
    for batch in batches(sequences, batch_size, desc):
        model.base_model(input_ids=batch.to(model_device(model)), use_cache=False)


def block_hidden(output) -> torch.Tensor:
    """A decoder block's output hidden states (blocks return a tensor or a tuple led by it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def sequence_nll(model, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats, differentiable) and the number of predicted tokens.

    The training loss: one ordinary forward (through whatever wrapper accelerate put around the
    model), so it materialises ``[b, seq_len, vocab]`` logits. Evaluation uses ``nll``, which
    never does."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch).logits[:, :-1].float()
    target = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
    return loss, target.numel()


LOGIT_CHUNK_BYTES = 1 << 28  # fp32 logits held at once by ``nll``: 256 MiB (256 tokens of Gemma 3's 262k vocab)


def chunked_nll_sum(model, batch: torch.Tensor, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats) of each window of ``batch`` ``[b, seq_len]`` (float64 ``[b]``)
    and the number of tokens predicted per window (``seq_len - 1``), computing the LM head on at
    most ``chunk_bytes`` of fp32 logits at a time.

    The decoder runs once (``model.base_model``, hidden states ``[b, seq_len, d]``); the head
    (``get_output_embeddings``, plus Gemma's final logit soft-capping where the config sets it)
    then runs on slices of ``chunk_bytes / (4 vocab)`` tokens, so peak memory no longer grows with
    ``batch x seq_len x vocab`` (4.3 GB for 4 x 1024 tokens of a 262k vocabulary). Equal to the
    unchunked cross-entropy up to float summation order."""
    batch = batch.to(model_device(model))
    hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = batch[:, 1:].reshape(-1)
    per_window = batch.shape[1] - 1
    window = torch.arange(target.numel(), device=target.device) // per_window  # the window of each position
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    chunk = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    sums = torch.zeros(len(batch), dtype=torch.float64, device=target.device)
    for s in range(0, target.numel(), chunk):
        logits = head(hidden[s: s + chunk]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        losses = F.cross_entropy(logits, target[s: s + chunk], reduction="none")
        sums.index_add_(0, window[s: s + chunk], losses.double())
    return sums.cpu(), per_window


@torch.no_grad()
def nll(model, sequences: torch.Tensor, batch_size: int = 4, desc: str | None = "NLL",
        per_window: bool = False) -> float | tuple[float, list[float]]:
    """Token-weighted mean next-token NLL (nats/token) over ``sequences`` ``[n, seq_len]``; with
    ``per_window``, also each window's own mean (a list of ``n``: what paired comparisons between
    two models on the same windows resample, ``repro.uncertainty``).

    Every token after the first of each sequence is predicted from the tokens before it in
    the same sequence; perplexity = exp(nll). The logits are computed in chunks
    (``chunked_nll_sum``).
    """
    check_sequences(model, sequences)
    sums = []
    for batch in batches(sequences, batch_size, desc):
        window_sums, tokens = chunked_nll_sum(model, batch)
        sums.append(window_sums)
    sums = torch.cat(sums)
    mean = float(sums.sum()) / (sums.numel() * tokens)
    return (mean, (sums / tokens).tolist()) if per_window else mean


def gradient_norm(model, sequences: torch.Tensor, batch_size: int = 4, desc: str | None = "gradient") -> dict:
    """The gradient of the token-mean NLL over ``sequences`` with respect to the stack's linear weights
    at the model's current weights: ``{"norm": ||g|| (nats/token per unit weight), "weight_norm": ||w||,
    "relative": ||g|| ||w|| (the first-order change of the loss along a step of size ||w|| in the
    gradient's direction, nats/token)}``. At a minimum of that loss it is 0. The model is left as it
    was (no gradient kept, requires_grad flags restored)."""
    check_sequences(model, sequences)
    linears = stack_linears(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in linears.values()]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    try:
        tokens = sequences.shape[0] * (sequences.shape[1] - 1)
        for batch in batches(sequences, batch_size, desc):
            loss, _ = sequence_nll(model, batch)
            (loss / tokens).backward()
        norm = math.sqrt(sum(float(w.grad.double().pow(2).sum()) for w in weights))
        weight_norm = math.sqrt(sum(float(w.detach().double().pow(2).sum()) for w in weights))
    finally:
        for w in weights:
            w.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return {"norm": norm, "weight_norm": weight_norm, "relative": norm * weight_norm}


def perplexity(nll_value: float) -> float:
    return math.exp(min(nll_value, 700.0))


LAYER_INPUTS = ("own", "fp")


def check_snapshot(linears: dict, snapshot: dict) -> None:
    """Raise a ValueError unless ``snapshot`` holds a weight of the right shape for every linear."""
    missing = [name for name in linears if name not in snapshot]
    wrong = [name for name, m in linears.items() if name in snapshot and snapshot[name].shape != m.weight.shape]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise ValueError(f"the FP weights do not match this model's stack ({len(missing)} linear(s) missing, "
                         f"{len(wrong)} of another shape, e.g. {example}): pass repro.models.fp_snapshot(model) "
                         f"taken from this model before quantizing it")


@contextmanager
def exchanged_weights(model, snapshot: dict[str, torch.Tensor]):
    """Swap the stack's weights with ``snapshot``'s, layer by layer, in place; swap back on exit.

    Inside the block the model runs with the snapshot's weights and ``snapshot`` holds the
    model's (same dict object). One layer's temporary at a time, no second copy of the stack.
    """
    linears = stack_linears(model)
    check_snapshot(linears, snapshot)
    if any(is_prepared(m) for m in linears.values()):
        raise ValueError("the model is in fake-quant mode; call repro.quant.bake(repro.models.stack_linears(model)) first")

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


class SharedInputs:
    """Which linear first read the tensor a linear reads now, called from forward hooks in
    execution order: linears fed the very same tensor (q/k/v, gate/up) share it, unless it was
    changed in place in between. Holds the last input until the next call or ``reset``."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.last = (None, None, None)  # (input, its version counter, its first reader)

    def first_reader(self, name: str, x: torch.Tensor) -> str:
        last, version, first = self.last
        if not (x is last and x._version == version):
            first = name
        self.last = (x, x._version, first)
        return first


def gram_is_cheaper(in_features: int, out_features: list[int]) -> bool:
    """Whether the linears of ``out_features`` that read one ``in_features``-wide input measure
    their output error for fewer multiply-adds per token through the input's Gram matrix
    (``in^2``) than directly (``sum(out) x in``): q/k/v and gate/up yes, o/down_proj no."""
    return in_features < sum(out_features)


@torch.no_grad()
def shared_inputs(model) -> dict[str, list[str]]:
    """``first reader -> the stack linears that read its input`` (q/k/v, gate/up share one; every
    other linear reads its own), in call order, from one forward pass of two tokens."""
    readers, sharing = {}, SharedInputs()

    def hook(name):
        def record(module, args, output):
            readers.setdefault(sharing.first_reader(name, args[0]), []).append(name)
        return record

    with forward_hooks((m, hook(name)) for name, m in stack_linears(model).items()):
        model.base_model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model_device(model)), use_cache=False)
    return readers


@contextmanager
def recording_layer_mse(model, fp_weights: dict[str, torch.Tensor]):
    """Hooks on every stack linear that accumulate ``((Q(W) - W) x)^2`` for the inputs ``x``
    of whatever forward passes run inside the block; yields a dict that holds, after the
    block, name -> mean over tokens and output features (see ``layer_mse``).

    Measured directly, the error costs ``in x out`` multiply-adds per token and layer: +79% of
    SmolLM2's linear flops. The linears that read one input (``shared_inputs``: q/k/v, gate/up)
    need only its Gram matrix when that is cheaper (``gram_is_cheaper``): ``G = sum_t x_t x_t^T``
    is accumulated once for them, and each adds ``tr(dW G dW^T)`` when the block exits (equal up
    to float summation order; +42% of the linear flops in all). Entering the block runs one
    two-token forward (``shared_inputs``): enter it before any other hooks' context. ``Q(W) - W``
    is formed one layer at a time, never for the whole stack at once."""
    linears = stack_linears(model)
    check_snapshot(linears, fp_weights)
    width = {name: weight_matrix(m).shape for name, m in linears.items()}  # [out, in]
    groups = {first: names for first, names in shared_inputs(model).items()
              if gram_is_cheaper(width[first][1], [width[n][0] for n in names])}
    grams = dict.fromkeys(groups)  # first reader -> [G, rows]
    members = {name: first for first, names in groups.items() for name in names}
    sums, counts, gram_rows = dict.fromkeys(linears, 0.0), dict.fromkeys(linears, 0), dict.fromkeys(members, 0)
    sharing, result = SharedInputs(), {}

    def delta(name):
        module = linears[name]
        # detached: the block may close outside no_grad around weights that train (block-wise PTQ)
        fp = fp_weights[name].to(module.weight.device)
        return (weight_matrix(module).detach() - weight_matrix(module, fp)).float()

    def hook(name):
        def record(module, args, output):
            x = args[0]
            first = sharing.first_reader(name, x)
            rows = x.reshape(-1, x.shape[-1])
            if name in members:
                if first != members[name]:
                    raise RuntimeError(f"layer MSE: {name} no longer reads {members[name]}'s input")
                if first == name:
                    rows = rows.float()
                    if grams[name] is None:
                        grams[name] = [rows.t() @ rows, rows.shape[0]]
                    else:
                        grams[name][0].addmm_(rows.t(), rows)
                        grams[name][1] += rows.shape[0]
                gram_rows[name] += rows.shape[0]
                return
            err = rows.float() @ delta(name).t()
            sums[name] += float(err.pow(2).sum())
            counts[name] += err.numel()
        return record

    with forward_hooks((m, hook(name)) for name, m in linears.items()):
        yield result
    sharing.reset()
    for name, first in members.items():
        G, n = grams[first] or (None, 0)
        if gram_rows[name] != n:
            raise RuntimeError(f"layer MSE: {name} did not read {first}'s input on every call")
        if G is not None:
            d = delta(name)
            sums[name] += float(((d @ G) * d).sum())
            counts[name] += n * width[name][0]
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
        decoder_pass(model, sequences, batch_size, desc)
    return mse


GRAM_LIMIT_BYTES = 2 << 30  # input Gram matrices kept for the FP-input layer MSE (upper bound, fp32)


def gram_bytes(model) -> int:
    """Upper bound of the memory ``input_grams`` needs: one fp32 ``[in, in]`` per stack linear."""
    return sum(4 * weight_matrix(m).shape[1] ** 2 for m in stack_linears(model).values())


@torch.no_grad()
def input_grams(model, sequences: torch.Tensor, batch_size: int = 4, desc: str | None = "input Gram matrices"):
    """``name -> (G, n)`` for every stack linear: ``G = sum_t x_t x_t^T`` (fp32 ``[in, in]``) over
    the ``n`` input rows the layer receives when ``sequences`` flow through ``model`` as it is.

    Linears fed the same tensor (q/k/v, gate/up) share one ``G`` object. With the FP model's
    Gram matrices on the test split, every quantized model's FP-input layer MSE is
    ``tr(dW G dW^T) / (n out)`` (``layer_mse_from_grams``): no forward pass per record.
    """
    linears = stack_linears(model)
    grams, sharing = {}, SharedInputs()

    def hook(name):
        def record(module, args, output):
            x = args[0]
            first = sharing.first_reader(name, x)
            if first != name:  # same input as an earlier linear: share its Gram matrix
                grams[name] = grams[first]
                return
            rows = x.reshape(-1, x.shape[-1]).float()
            G, n = grams.get(name, (None, 0))
            G = rows.t() @ rows if G is None else G.addmm_(rows.t(), rows)
            grams[name] = (G, n + rows.shape[0])
        return record

    with forward_hooks((m, hook(name)) for name, m in linears.items()):
        decoder_pass(model, sequences, batch_size, desc)
    sharing.reset()
    return grams


@torch.no_grad()
def layer_mse_from_grams(model, fp_weights: dict[str, torch.Tensor], grams: dict) -> dict[str, float]:
    """``layer_mse(..., inputs="fp")`` from the FP model's ``input_grams`` of the same sequences:
    ``mean_{t, o} ((dW x_t)_o^2) = tr(dW G dW^T) / (n out)`` per layer, ``dW = Q(W) - W``.
    Exact up to float summation order; costs one ``[out, in] x [in, in]`` product per layer."""
    result = {}
    for name, m in stack_linears(model).items():
        G, n = grams[name]
        delta = (weight_matrix(m) - weight_matrix(m, fp_weights[name].to(m.weight.device))).float()
        result[name] = float(((delta @ G) * delta).sum()) / (n * delta.shape[0])
    return result


HIDDEN_LIMIT_BYTES = 2 << 30  # FP hidden states kept for the block-output MSE (fp32)


def hidden_bytes(model, sequences: torch.Tensor) -> int:
    """Memory ``block_outputs`` needs for ``sequences``: every block's fp32 output."""
    return 4 * len(blocks(model)) * sequences.numel() * model.config.hidden_size


@torch.no_grad()
def block_outputs(model, sequences: torch.Tensor, batch_size: int = 4, desc: str | None = "block outputs"):
    """Per mini-batch, per block: the block's output hidden states (fp32, CPU), the residual
    stream ``[b, seq_len, hidden]`` at every depth when ``sequences`` flow through ``model``."""
    result = []

    def record(i):
        def hook(module, args, output):
            if i == 0:
                result.append([])
            result[-1].append(block_hidden(output).detach().float().cpu())
        return hook

    with forward_hooks((block, record(i)) for i, block in enumerate(blocks(model))):
        decoder_pass(model, sequences, batch_size, desc)
    return result


@contextmanager
def recording_block_mse(model, reference: list):
    """Hooks on every block comparing the k-th call's output with ``reference[k][block]``
    (``block_outputs`` of the FP model on the same mini-batches); yields a list that holds,
    after the block, per block ``mean((h_q - h_FP)^2)`` over tokens and hidden features: the
    block-output MSE on the residual stream, each model propagating its own activations."""
    stack = blocks(model)
    sums, counts, calls, result = [0.0] * len(stack), [0] * len(stack), [0] * len(stack), []

    def record(i):
        def hook(module, args, output):
            hidden = block_hidden(output).float()
            ref = reference[calls[i]][i]
            calls[i] += 1
            sums[i] += float((hidden - ref.to(hidden.device)).pow(2).sum())
            counts[i] += ref.numel()
        return hook

    with forward_hooks((block, record(i)) for i, block in enumerate(stack)):
        yield result
    result.extend(total / max(n, 1) for total, n in zip(sums, counts))


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


# ----------------------------------------------------------------------------- a record's metrics
def windows_id(sequences: torch.Tensor) -> str:
    """sha256 (12 hex) of the token windows ``[n, seq_len]``: two records whose per-window NLLs were
    measured on the same windows, in the same order, carry the same id (``repro.uncertainty``)."""
    return hashlib.sha256(sequences.cpu().numpy().tobytes()).hexdigest()[:12]


def record_metrics(model, data, fp_weights: dict, batch_size: int, grid: Grid | None,
                   fp_grams: dict | None = None, fp_hidden: list | None = None,
                   nll_validation: float | None = None, changed: bool = True) -> dict:
    """The metrics every record carries (definitions above).

    Validation NLL is for selection (QAFT's lr0 and epoch); every comparison across methods
    uses the test split, so the layer-wise MSEs, both readings, are measured on test. With
    ``fp_grams`` (``input_grams`` of the FP model on test) the FP-input reading costs
    no forward pass; without, one pass with the FP weights exchanged in. With ``fp_hidden``
    (``block_outputs`` of the FP model on test) the same test pass also measures every
    block's output MSE against the FP residual stream (``block_output_mse``; else ``None``).
    ``nll_validation``, when the method already measured it on these weights, is not measured again.
    ``data``: a ``repro.data.Data``; ``grid``: the quantized model's (None: unquantized, 16 bits per
    weight), for the weight size (its scales count). ``changed=False``: the model holds exactly
    ``fp_weights`` (the FP reference), so every layer and block MSE is 0 without a pass.
    """
    # per-window NLL of validation (where measured here) and test: what paired comparisons resample
    nll_val, val_windows = (nll_validation, None) if nll_validation is not None else \
        nll(model, data.validation, batch_size, desc="NLL validation", per_window=True)
    if not changed:
        nll_test, test_windows = nll(model, data.test, batch_size, desc="NLL test", per_window=True)
        zeros = dict.fromkeys(stack_linears(model), 0.0)
        mse = {"layer_mse": zeros, "layer_mse_fp_inputs": zeros}
        block_mse = [0.0] * len(blocks(model))
    else:  # the test NLL pass also records the own-input layer MSE and the block outputs (one forward)
        blocks_ctx = recording_block_mse(model, fp_hidden) if fp_hidden is not None else nullcontext()
        with recording_layer_mse(model, fp_weights) as own, blocks_ctx as block_mse:
            nll_test, test_windows = nll(model, data.test, batch_size, desc="NLL test + layer MSE", per_window=True)
        fp_inputs = (layer_mse_from_grams(model, fp_weights, fp_grams) if fp_grams is not None else
                     layer_mse(model, fp_weights, data.test, batch_size, inputs="fp", desc="layer MSE (FP inputs)"))
        mse = {"layer_mse": own, "layer_mse_fp_inputs": fp_inputs}
    n_layers = len(mse["layer_mse"])
    # the common GPTQ protocol (``repro.data.gptq_protocol_windows``): without a BOS those are the test
    # windows themselves when the tier evaluates the whole split consecutively
    gptq_ppl = None if data.test_gptq is None else perplexity(
        nll_test if torch.equal(data.test_gptq, data.test)
        else nll(model, data.test_gptq, batch_size, desc="NLL test (GPTQ protocol)"))
    return {
        **({} if gptq_ppl is None else {"ppl_test_gptq_protocol": gptq_ppl}),
        "nll_validation": nll_val, "nll_test": nll_test,
        "nll_validation_windows": val_windows, "nll_test_windows": test_windows,
        "windows": {"validation": windows_id(data.validation), "test": windows_id(data.test)},
        "ppl_validation": perplexity(nll_val), "ppl_test": perplexity(nll_test),
        **mse, **{f"mean_{key}": sum(values.values()) / n_layers for key, values in mse.items()},
        "block_output_mse": block_mse, "mean_block_output_mse": sum(block_mse) / len(block_mse) if block_mse else None,
        "weight_mse": sum(weight_mse(model, fp_weights).values()) / n_layers,
        "weight_distance": weight_distance(model, fp_weights),
        # FP: float16, as the paper
        "weight_size_gb": weight_size_gb(model, 16 if grid is None else grid),
        "stack_params": stack_param_count(model),
    }
