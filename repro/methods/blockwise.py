"""Block-wise PTQ, MB-PTQ and LA-PTQ (Shabanovi et al., 2024): one algorithm, two knobs.

The stack is cut into *windows* of ``window`` = m consecutive blocks, visited in order with
stride ``stride`` (default m: non-overlapping, as AutoRound's ``nblocks``). For each window the
linears of its blocks go into fake-quant mode (``repro.quant.prepare``: fixed scales per
tensor, channel or group from the tier's observer on the FP weights) and their latent weights
are trained with Adam through the straight-through estimator to minimise

    MSE( f_{i+m+l-1} o ... o f_i^Q (x_i^Q) ,  h_{i+m+l}^FP )

on the residual stream: ``x_i^Q`` is the input of the window's first block ``i`` computed by the
already quantized prefix; the window's blocks run quantized; then ``lookahead`` = l further
blocks run in *full precision and frozen* (their gradients flow to the window only); the
target ``h^FP`` is the full-precision model's hidden state at the same depth (l truncated at
the end of the stack). (m=1, l=0) is block PTQ, m>1 is MB-PTQ, l>0 is LA-PTQ.

Data: the calibration sequences, minus ``holdout`` of them held out; after every
``eval_every`` steps the held-out loss is measured and the window is restored to its best
held-out state before it is baked onto the grid (as AutoRound, EfficientQAT and llm-compressor
do). Three activation sets live on CPU, in the model's dtype, and move to the device one
mini-batch at a time: the quantized-prefix inputs ``x^Q``, the FP chain ``h^FP`` (computed once
per depth by blocks that are still full precision, ahead of every trained block) and, from
it, the targets. With overlapping windows (stride < m) the blocks a later window covers again
stay latent and are trained further there; ``finalised_by`` records the window that baked each.

Options (``config.options``, defaults in ``DEFAULTS``; the paper's hyper-parameters are not
public: ``DEFAULTS`` are generic starting values; the cpu tier's, from the sweep in the README, are in its YAML):

* ``window`` (m), ``lookahead`` (l), ``stride`` (None: m)
* ``steps`` - Adam steps per window (one calibration mini-batch of ``config.batch_size``
  sequences each); ``steps_per``: ``"window"`` (default) or ``"block"`` (steps x blocks in the
  window: the *equal optimizer steps per block* control for MB-PTQ)
* ``lr`` - Adam learning rate on the latent weights (constant)
* ``holdout`` - fraction of calibration sequences held out (at least one); ``eval_every``
* ``mixed_precision`` - ``"no"`` or ``"bf16"``: autocast around the training forward only (the
  held-out loss that picks each window's best state, the targets and the chain stay fp32)

Memory (per window, on top of the loaded model, whose weights are the latent ones): the window's
gradients and the copy of its best state (2 x 4 bytes x window params), Adam's two moments (2 x),
and what autograd saves for one mini-batch through the m + l blocks (activations and the
fake-quantized weight copies); the three activation sets stay on CPU. Each window records these measured components
(``memory_bytes``; the CUDA peak on a GPU), and ``repro.studies.cross_block.memory_table`` compares them.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext

import torch
from torch.nn.utils import parametrize

from repro.evaluate import check_sequences, model_device
from repro.methods.gptq import split_calibration
from repro.methods.qaft import keep_freed_memory
from repro.models import block_linears, block_path, blocks
from repro.progress import progress
from repro.quant import bake, fp_weight, is_int, is_real, prepare
from repro.stack import capture, run_block, run_blocks

logger = logging.getLogger(__name__)

DEFAULTS = {"window": 1, "lookahead": 0, "stride": None, "steps": 64, "steps_per": "window", "lr": 1e-4,
            "holdout": 0.125, "eval_every": 8, "mixed_precision": "no"}


def blockwise_options(config) -> dict:
    """``DEFAULTS`` updated with ``config.options``, checked."""
    opts = {**DEFAULTS, **(config.options or {})}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown block-wise option(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    for key, low in (("window", 1), ("lookahead", 0), ("steps", 0), ("eval_every", 1)):
        if not is_int(opts[key], low):
            raise ValueError(f"block-wise option {key}={opts[key]!r}: must be an integer >= {low}")
    if opts["stride"] is not None and not is_int(opts["stride"], 1, opts["window"]):
        raise ValueError(f"block-wise option stride={opts['stride']!r}: an integer in 1..window ({opts['window']}), "
                         f"or None for non-overlapping windows")
    if opts["steps_per"] not in ("window", "block"):
        raise ValueError(f"block-wise option steps_per={opts['steps_per']!r}: 'window' or 'block'")
    if not (is_real(opts["lr"]) and opts["lr"] > 0):
        raise ValueError(f"block-wise option lr={opts['lr']!r}: a finite learning rate > 0")
    if opts["mixed_precision"] not in ("no", "bf16"):
        raise ValueError(f"block-wise option mixed_precision={opts['mixed_precision']!r}: 'no' or 'bf16'")
    if not (is_real(opts["holdout"]) and 0 < opts["holdout"] < 1):
        raise ValueError(f"block-wise option holdout={opts['holdout']!r}: a fraction in (0, 1)")
    return opts


def variant(options: dict) -> str:
    """Which method of the cross-block paper these options make: block PTQ, MB-PTQ or LA-PTQ."""
    opts = {**DEFAULTS, **options}
    m, l = opts["window"], opts["lookahead"]
    name = "block PTQ" if m == 1 and l == 0 else (f"LA-PTQ l={l}" if m == 1 else f"MB-PTQ m={m}" + (f" l={l}" if l else ""))
    if opts["stride"] not in (None, m):
        name += f" stride {opts['stride']}"
    if opts["steps_per"] == "block" and m > 1:
        name += " (equal steps/block)"
    return name


def describe(options: dict) -> tuple[str, str, tuple]:
    """For tables and figures: the variant's name, what its objective sees, and its key along the
    locality spectrum (block PTQ, then MB-PTQ by m, then LA-PTQ by l; the equal-steps control after
    its MB-PTQ), between GPTQ (one linear) and QAFT (the whole network)."""
    o = {**DEFAULTS, **options}
    sees = f"{o['window']} block{'s' if o['window'] > 1 else ''}" + (
        f" + {o['lookahead']} FP downstream" if o["lookahead"] else "")
    key = (2 if o["lookahead"] == 0 else 3, o["window"], o["lookahead"], o["steps_per"] == "block",
           -(o["stride"] or o["window"]))
    return variant(o), sees, key


def windows(n_blocks: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every window over ``n_blocks`` blocks, in order: stride ``stride``,
    the last one clipped to the stack, ending with the first window that reaches the end."""
    spans, start = [], 0
    while True:
        stop = min(start + window, n_blocks)
        spans.append((start, stop))
        if stop == n_blocks:
            return spans
        start += stride


@contextmanager
def _counting_saved_bytes():
    """Yields ``[bytes]``: the size of every tensor autograd saves for backward inside the block."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).pow(2).mean()


def blockwise(model, data, config) -> dict:
    """Quantize the stack window by window (see the module docstring), in place.

    Returns the options, per window its blocks, look-ahead end, losses (held-out before
    training, at the best step and at the last check; training loss of the first and last step),
    best step, steps, trainable parameters, the training loop's and the window's wall time and
    memory components; per block the MSE of
    its output against the FP hidden state once finalised (``calibration_block_output_mse``, mean over
    calibration tokens and features, squared activation units) and the window that finalised it.
    """
    opts = blockwise_options(config)
    check_sequences(model, data.calibration, "calibration")
    m, l = opts["window"], opts["lookahead"]
    stride = opts["stride"] or m
    stack = blocks(model)
    n = len(stack)
    prefix = block_path(model)
    device = model_device(model)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        keep_freed_memory()  # each Adam step frees and reallocates the window's weights and gradients
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}  # by object: prepare renames weights
    was_training = model.training  # eval mode throughout: no dropout in the reconstruction or its targets
    fit_seqs, held_seqs = split_calibration(data.calibration, opts["holdout"])
    spans = windows(n, m, stride)
    records, block_mse, finalised_by = [], {}, {}
    start_time = time.perf_counter()
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            # the chain lives on CPU; one mini-batch at a time on the device
            parts = {"fit": capture(model, fit_seqs, config.batch_size, store="cpu"),
                     "held": capture(model, held_seqs, config.batch_size, store="cpu")}
        # the FP residual stream per depth: fp[d][part][k] enters block d
        fp = {0: {part: [b.hidden for b in batches] for part, batches in parts.items()}}
        frontier = 0

        def fp_to(depth):  # extend the FP chain with blocks that are still full precision
            nonlocal frontier
            with torch.no_grad():
                for d in range(frontier, depth):
                    fp[d + 1] = {part: [run_block(stack[d], d, b, h).to("cpu")
                                        for b, h in zip(parts[part], fp[d][part])] for part in parts}
            frontier = max(frontier, depth)

        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts["mixed_precision"] == "bf16")

        def loss_on(part, k, start, stop, train=False):
            b = parts[part][k]
            with autocast if train else nullcontext():
                out = run_blocks(stack, start, stop, b)
            return _mse(out, targets[part][k].to(out.device))

        def held_loss(start, stop) -> float:
            with torch.no_grad(), parametrize.cached():
                total = sum(float(loss_on("held", k, start, stop)) * parts["held"][k].hidden.numel()
                            for k in range(len(parts["held"])))
            return total / sum(b.hidden.numel() for b in parts["held"])

        bar = progress(spans, desc=f"block-wise {variant(opts)} int{config.bits}")
        for w, (start, stop) in enumerate(bar):
            t0 = time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            la_stop = min(stop + l, n)
            fp_to(la_stop)
            targets = fp[la_stop]
            by_block = {i: {f"{prefix}.{i}.{name}": mod for name, mod in block_linears(stack[i]).items()}
                        for i in range(start, stop)}
            linears = {name: mod for layer in by_block.values() for name, mod in layer.items()}
            # blocks kept latent by an overlap keep their scales
            prepare(linears, config.grid, config.observer)
            latent = [fp_weight(mod) for mod in linears.values()]
            for p in latent:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(latent, lr=opts["lr"])
            steps = opts["steps"] * ((stop - start) if opts["steps_per"] == "block" else 1)
            generator = torch.Generator().manual_seed(config.seed * 100_003 + w)
            order = []
            initial = best = final_held = held_loss(start, la_stop)
            best_step, best_state = 0, [p.detach().clone() for p in latent]
            first = last = None
            stop_reason, saved_bytes, updates, train_s = None, 0, 0, 0.0
            if not math.isfinite(initial):
                stop_reason, steps = f"non-finite held-out loss ({initial}) before training", 0
            t_train = time.perf_counter()
            for step in range(1, steps + 1):
                if not order:
                    order = torch.randperm(len(parts["fit"]), generator=generator).tolist()
                if step == 1:  # measure what autograd keeps for one mini-batch
                    with _counting_saved_bytes() as saved:
                        loss = loss_on("fit", order.pop(), start, la_stop, train=True)
                    saved_bytes = saved[0]
                else:
                    loss = loss_on("fit", order.pop(), start, la_stop, train=True)
                value = float(loss.detach())
                if not math.isfinite(value):
                    stop_reason = f"non-finite training loss ({value}) at step {step}"
                    break
                first = value if first is None else first
                last = value
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                updates += 1
                if step % opts["eval_every"] == 0 or step == steps:
                    t_held = time.perf_counter()
                    current = final_held = held_loss(start, la_stop)
                    t_train += time.perf_counter() - t_held  # the training loop's time leaves it out
                    if current < best:
                        best, best_step = current, step
                        best_state = [p.detach().clone() for p in latent]
                    bar.set_postfix(block=f"{start}-{stop - 1}", held=f"{current:.3g}")
            train_s = time.perf_counter() - t_train
            optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                  for t in s.values() if torch.is_tensor(t) and t.dim())
            with torch.no_grad():
                for p, saved in zip(latent, best_state):
                    p.copy_(saved)
                    p.requires_grad_(False)
            del optimizer, best_state
            # bake what no later window covers; propagate the quantized chain to the next start
            final = spans[w + 1][0] if w + 1 < len(spans) else n
            bake({name: mod for i in range(start, final) for name, mod in by_block[i].items()})
            with torch.no_grad():
                for i in range(start, final):
                    errors, count = 0.0, 0
                    for part, batches in parts.items():
                        for b, ref in zip(batches, fp[i + 1][part]):
                            b.hidden = run_block(stack[i], i, b).to("cpu")
                            errors += float((b.hidden.float() - ref.float()).pow(2).sum())
                            count += b.hidden.numel()
                    block_mse[i], finalised_by[i] = errors / count, w
            for d in [d for d in fp if d < final and d != frontier]:  # depths no window reads again
                del fp[d]
            window_params = sum(p.numel() for p in latent)
            records.append({
                "blocks": list(range(start, stop)), "lookahead_stop": la_stop, "window": stop - start,
                "lookahead": la_stop - stop, "stride": stride, "steps": updates,
                "held_loss_initial": initial, "held_loss_best": best, "held_loss_final": final_held,
                "best_step": best_step,
                "train_loss_first": first, "train_loss_last": last, "stop_reason": stop_reason,
                "trainable_params": window_params,
                "memory_bytes": {
                    "window_weights": 4 * window_params,
                    "lookahead_weights": sum(p.numel() * p.element_size() for i in range(stop, la_stop)
                                             for p in stack[i].parameters()),
                    "optimizer_state": optimizer_bytes,
                    "saved_activations": saved_bytes,
                    "cuda_peak": torch.cuda.max_memory_allocated(device) if cuda else None},
                "train_s": train_s, "wall_s": time.perf_counter() - t0})
            if stop_reason:
                logger.warning("block-wise window %d-%d stopped: %s; kept its best state", start, stop - 1, stop_reason)
    finally:
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), False))
        model.train(was_training)
    return {"options": {**opts, "stride": stride}, "variant": variant(opts), "windows": records,
            "calibration_block_output_mse": {str(i): v for i, v in sorted(block_mse.items())},
            "finalised_by": {str(i): w for i, w in sorted(finalised_by.items())},
            "optimizer_steps": sum(r["steps"] for r in records),
            "fit_sequences": len(fit_seqs), "held_out_sequences": len(held_seqs),
            "wall_s": time.perf_counter() - start_time}
