"""QAFT: quantization-aware fine-tuning of the whole stack on the global NLL (paper §III-D), and
FPFT, the same loop with the quantizer off (the fine-tuned FP control).

The stack's linears go into fake-quant mode (``repro.quant.prepare``: scales per tensor, channel
or group (``config.granularity``) from ``config.observer`` on the FP weights, then fixed) and their latent FP weights are trained through
the straight-through estimator on the calibration sequences; everything else is frozen. AdamW
(weight decay 0); the learning rate decays linearly from lr0 at the first step to lr0/10 at the
last (``lr_at``); ``epochs`` passes over the same sequences; validation and test NLL after every
epoch (epoch 0 = RTN, before training). Every lr0 of the grid starts again from the FP weights;
the result is the best-validation epoch of the best-validation lr0 (``select: epoch``), or the
paper's protocol, the last epoch of the lr0 whose last epoch has the lowest validation NLL
(``select: final``), baked onto the grid.

Options (``config.options``, defaults in ``DEFAULTS``):

* ``epochs`` - passes over the calibration sequences (paper: 8)
* ``lr_grid`` - initial learning rates tried (paper: 1e-6, 1e-5, 1e-4, 1e-3)
* ``batch_size`` - sequences per micro-batch (paper: 1); shuffled by ``config.seed`` + epoch
* ``grad_accum`` - micro-batches per optimizer step
* ``mixed_precision`` - ``"no"`` or ``"bf16"`` (autocast around the training forward only;
  evaluation stays fp32, so the best-epoch pick measures the model that is recorded)
* ``gradient_checkpointing`` - recompute each block's activations in backward instead of keeping
  them (transformers' ``activation_checkpointing_enable``, non-reentrant): training memory for
  activations drops from all blocks' to one block's, for ~one more forward pass per step; the
  result is the same up to float summation order (dropout masks are replayed)
* ``select`` - ``"epoch"``: the best-validation epoch of every lr0 competes (the package's default,
  and epoch 0 = RTN can win); ``"final"``: each lr0 is scored after its last epoch and its final
  weights are kept (the paper selects the learning rate, not an epoch; the paper tier's setting).
  A stopped (non-finite) lr0 cannot be chosen under ``"final"`` unless every lr0 stopped (then the one
  with the lowest validation NLL of its last finite epoch).
* ``sharding`` - ``"none"`` (every process holds all weights, gradients and AdamW state; DDP under
  several processes) or ``"fsdp"``: PyTorch FSDP2 (``fully_shard``) shards each stack linear's
  parameters, gradients and AdamW moments over the processes (``shard_linears``), for 7B models
  whose 16 B per trained weight do not fit one GPU (``training_memory``). Needs a launch of ≥ 2
  processes (``torchrun`` or ``accelerate launch``); the result equals the unsharded run on the same
  global batch up to float summation order, and the final model is unsharded (``unshard_linears``).
* ``checkpoint_dir`` - where the resume state lives (default ``checkpoint_dir(config)``)

FPFT (``fpft``) runs this loop on the FP weights themselves: same data, steps, lr0 grid, schedule and
selection, with no quantizer (epoch 0 = FP). QAFT's lead over GPTQ mixes two things, repairing the
quantization and adapting the model to the calibration corpus (the FP model is not a minimum of
that corpus's loss); FPFT measures the second alone, so QAFT − FPFT is the quantization damage
fine-tuning leaves. Its tier options are QAFT's (``repro.methods.METHODS``), so the budgets match.

The same code runs on CPU, on one GPU, or on several with ``accelerate launch script.py`` or
``torchrun``: accelerate places the model, wraps it for DDP (or, with ``sharding: fsdp``, the stack
linears are sharded with FSDP2) and shards the batches over the processes (every process evaluates
the full splits; only the main process writes checkpoints, which hold full, unsharded tensors).

Resume: after every epoch the state (latent weights, optimizer, scheduler, RNG, history, the
best weights so far as int8 codes) is written atomically to ``<checkpoint_dir>/state.pt``. A
rerun of the same config continues after the last finished epoch and, on CPU, reproduces the
uninterrupted result exactly (the batch order depends only on seed and epoch). The state file is
removed by ``discard_state`` once the run's record is written (``repro.runs.run``), never before:
a finished sweep whose record could not be written is recovered by a rerun without training.

A non-finite loss (or validation NLL) stops that lr0 with a recorded reason; the sweep goes on
and the stopped lr0 keeps its best epoch before the failure.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import torch
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from repro.evaluate import check_sequences, model_device, nll, sequence_nll
from repro.models import cache_dir, stack_linears
from repro.progress import progress
from repro.quant import bake, fp_weight, positive_list, prepare, quantizer
from repro.store import atomic_path

logger = logging.getLogger(__name__)
DEFAULTS = {"epochs": 8, "lr_grid": [1e-6, 1e-5, 1e-4, 1e-3], "batch_size": 1, "grad_accum": 1,
            "mixed_precision": "no", "gradient_checkpointing": False, "select": "epoch", "sharding": "none"}
END_FACTOR = 0.1  # the learning rate decays by one order of magnitude over the run
STATE_FILE = "state.pt"


def lr_at(step: int, total_steps: int, lr0: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear from ``lr0`` at the first step to ``lr0 * END_FACTOR`` (= lr0/10) at the last step,
    and ``lr0/10`` after it.
    """
    frac = min(step / max(total_steps - 1, 1), 1.0)
    return lr0 * (1.0 - (1.0 - END_FACTOR) * frac)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule ``lr_at`` as a torch scheduler (call ``.step()`` after each
    optimizer step); the optimizer's ``lr`` is lr0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total_steps, 1.0))


def checkpoint_dir(config) -> Path:
    """Resume directory of a run: ``options["checkpoint_dir"]`` or ``cache_dir()/qaft/<key>``."""
    if config.options.get("checkpoint_dir"):
        return Path(config.options["checkpoint_dir"])
    return cache_dir() / "qaft" / config.key()


def qaft_options(config) -> dict:
    """``DEFAULTS`` updated with ``config.options``, checked."""
    opts = {**DEFAULTS, **{k: v for k, v in config.options.items() if k != "checkpoint_dir"}}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown QAFT option(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(list(DEFAULTS) + ['checkpoint_dir'])}")
    for key in ("epochs", "batch_size", "grad_accum"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise ValueError(f"QAFT option {key}={opts[key]!r}: must be an integer >= 1")
    opts["lr_grid"] = positive_list(opts["lr_grid"], "QAFT option lr_grid", DEFAULTS["lr_grid"])
    if opts["mixed_precision"] not in ("no", "bf16"):
        raise ValueError(f"QAFT option mixed_precision={opts['mixed_precision']!r}: use 'no' or 'bf16'")
    if opts["select"] not in ("epoch", "final"):
        raise ValueError(f"QAFT option select={opts['select']!r}: 'epoch' (best validation epoch) or 'final' "
                         "(the last epoch, the paper's protocol)")
    if opts["sharding"] not in ("none", "fsdp"):
        raise ValueError(f"QAFT option sharding={opts['sharding']!r}: 'none' or 'fsdp' (FSDP2 over the launched processes)")
    if not isinstance(opts["gradient_checkpointing"], bool):
        raise ValueError(f"QAFT option gradient_checkpointing={opts['gradient_checkpointing']!r}: true or false")
    return opts


def training_memory(stack_weights: int, other_weights: int, processes: int = 1, sharded: bool = False,
                    other_bytes: int = 2, activations: int = 0) -> dict:
    """QAFT's memory per process in bytes (the same for FPFT): the latent float32 stack weights (4 B),
    their gradients (4 B) and AdamW's two moments (8 B) - 16 B per trained weight - plus the frozen
    rest (embeddings, norms, head: ``other_weights`` at ``other_bytes`` each) and ``activations``
    (with gradient checkpointing, about one block's). DDP (accelerate) replicates all of it on every
    process; ``sharded`` (``sharding: fsdp``) divides the stack's weights, gradients and moments over
    ``processes`` and keeps the frozen rest whole on each (``shard_linears``; the one linear gathered
    for its forward is left out). Returns the terms and ``total``; e.g. Llama-2-7B (6.48e9 stack
    weights) needs 104 GB on one GPU and 13.5 GB per GPU sharded over 8."""
    share = processes if sharded else 1
    terms = {"latent": 4 * stack_weights / share, "gradients": 4 * stack_weights / share,
             "adam": 8 * stack_weights / share, "frozen": other_bytes * other_weights,
             "activations": activations}
    return {**terms, "total": sum(terms.values())}


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a CPU training step frees, for the next step.

    Each step allocates fresh fake-quantized weights and gradients (0.4 GB each on SmolLM2) and
    frees them; by default glibc hands such blocks back to the OS and the next step page-faults
    them in again, which made a QAFT step 1.25x a plain fine-tuning step instead of 1.05x
    (``benchmarks/qaft_bench.py``). This keeps blocks under 32 MiB in the heap, grows the heap
    512 MiB at a time and never trims it. Process-wide and lasting (the resident set stays at its peak);
    no effect on results. Set ``REPRO_KEEP_FREED_MEMORY=0`` to leave malloc alone. Returns
    whether glibc accepted it (``False`` on other C libraries; with jemalloc or tcmalloc
    preloaded it returns ``True`` but changes nothing: those keep freed memory anyway).
    """
    if os.environ.get("REPRO_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    return all(mallopt(option, value) == 1 for option, value in
               ((m_mmap_threshold, 32 << 20), (m_trim_threshold, -1), (m_top_pad, 512 << 20)))


def make_accelerator(cpu: bool, seed: int):
    """An ``Accelerator`` whose data loaders shuffle by ``seed + epoch`` (resumable order)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, PartialState

    # accelerate's state is a process-wide singleton that refuses to switch between CPU and GPU;
    # in a single-process session (notebook, tests) it is safe to start it again.
    if PartialState._shared_state and PartialState().num_processes == 1 \
            and (PartialState().device.type == "cpu") != cpu:
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=cpu, mixed_precision="no",
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
    if accelerator.gradient_accumulation_steps != 1:  # e.g. set by an `accelerate config` file
        raise ValueError("QAFT does its own gradient accumulation: set the QAFT option grad_accum instead of "
                         "accelerate's gradient_accumulation_steps")
    return accelerator


def shard_linears(linears: dict[str, torch.nn.Module], device: torch.device) -> None:
    """FSDP2 over the launched processes, one unit per stack linear: its parameters (the latent weight
    and bias) become DTensors sharded on dim 0, gathered for its forward and backward; its gradients
    are reduce-scattered (averaged, as DDP's all-reduce) and AdamW keeps only the local shard's moments.
    The rest of the model (embeddings, norms, head: frozen) stays replicated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in linears.values():
        fully_shard(module.to(device), mesh=mesh)


def full_tensor(w: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter (a collective: every process calls it), or ``w``."""
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole ``value`` cut as ``param`` is: this process's shard when ``param`` is sharded (DTensor),
    else ``value`` itself, on ``param``'s device either way."""
    value = value.to(param.device)
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements)


def assign(w: torch.Tensor, value: torch.Tensor) -> None:
    """``w.copy_(value)`` for a whole ``value``, also when ``w`` is sharded (each process keeps its shard)."""
    with torch.no_grad():
        w.copy_(shard_like(value.to(w.dtype), w))


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with each sharded moment gathered whole on the CPU (a collective under
    FSDP), so a resume state does not depend on how many processes wrote it."""
    saved = optimizer.state_dict()
    return {**saved, "state": {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                               for i, s in saved["state"].items()}}


def optimizer_shards(optimizer: torch.optim.Optimizer, whole: dict) -> dict:
    """A ``whole_optimizer_state`` to load into ``optimizer``: each moment of a sharded parameter
    cut to this process's shard (as the parameter is); the rest as it is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def like(value, param):  # the moments, shaped as their parameter (not AdamW's scalar step)
        sharded_moment = torch.is_tensor(value) and hasattr(param, "device_mesh") and value.shape == param.shape
        return shard_like(value, param) if sharded_moment else value

    return {**whole, "state": {i: {k: like(v, params[int(i)]) for k, v in s.items()} for i, s in whole["state"].items()}}


def unshard_linears(model: torch.nn.Module, linears: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Replace each sharded stack linear in ``model`` by a plain, unsharded one of its base class with
    ``weights[name]`` (stored orientation, on its device and dtype) and its gathered bias, all frozen: the model that leaves
    ``fine_tune`` is an ordinary model on every process (FSDP2 has no way back to unsharded modules)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in linears.items():
        bias = module.bias
        bias = None if bias is None else full_tensor(bias.detach())
        if isinstance(module, torch.nn.Linear):
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        else:
            plain = Conv1D(module.nf, module.nx)
        plain.weight = torch.nn.Parameter(weights[name], requires_grad=False)
        plain.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)


def save_state(path: Path, state: dict) -> None:
    """``torch.save``, atomically (``repro.store.atomic_path``): ``path`` is always a complete state."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def qaft(model, data, config, start_nll: dict | None = None) -> dict:
    """Quantization-aware fine-tuning of ``model``'s stack in place; see the module docstring.

    ``start_nll``: ``{"nll_validation", "nll_test"}`` of RTN on the same data and grid, when already
    measured (``repro.runs`` passes the RTN record's): epoch 0 is then not evaluated again. Both
    evaluate the same weights (the grid points of the FP weights), so the numbers are the same.

    Returns per lr0 the history (``[{epoch, nll_validation, nll_test, lr}]``, ``lr`` = the
    learning rate at the end of that epoch), the stop reason (None when it ran to the end),
    the best epoch and the seconds per optimizer step; plus the chosen lr0 and its best epoch.
    """
    return fine_tune(model, data, config, quantize=True, start_nll=start_nll)


def fpft(model, data, config, start_nll: dict | None = None) -> dict:
    """Fine-tuning of ``model``'s stack in place with QAFT's loop and the quantizer off (the FP
    fine-tuning control; module docstring). ``start_nll``: the FP record's NLLs (epoch 0), when
    measured. Returns what ``qaft`` returns, without scales; ``info["fp"]`` is epoch 0."""
    return fine_tune(model, data, config, quantize=False, start_nll=start_nll)


def fine_tune(model, data, config, quantize: bool, start_nll: dict | None = None) -> dict:
    """The loop of ``qaft`` (``quantize``: latent weights through the fake quantizer, the result
    baked onto the grid) and ``fpft`` (the weights themselves train, the best epoch is kept as is)."""
    opts = qaft_options(config)
    title = f"QAFT int{config.bits}" if quantize else "FPFT"
    for split in ("calibration", "validation", "test"):  # before any training, not at the first evaluation
        check_sequences(model, getattr(data, split), split)
    path = checkpoint_dir(config) / STATE_FILE
    accelerator = make_accelerator(cpu=model_device(model).type == "cpu", seed=config.seed)
    sharded = opts["sharding"] == "fsdp"
    if sharded and accelerator.num_processes < 2:
        raise ValueError("QAFT option sharding='fsdp' shards over processes and this is one: launch it with "
                         "`torchrun --nproc-per-node N` or `accelerate launch --num_processes N` (N >= 2), "
                         "or set sharding: none")
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16,
                              enabled=opts["mixed_precision"] == "bf16")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapped = model
    try:
        # QAFT: fake-quant mode with fixed scales; only the latent stack weights train (FPFT: the weights).
        linears = stack_linears(model)
        if quantize:
            prepare(linears, config.grid, config.observer)
        latent = {name: fp_weight(m) for name, m in linears.items()}
        grids = {name: quantizer(m) for name, m in linears.items()} if quantize else {}
        fp = {name: w.detach().to("cpu", copy=True) for name, w in latent.items()}  # every lr0 starts here
        for p in model.parameters():
            p.requires_grad_(False)
        for w in latent.values():
            w.requires_grad_(True)
        if sharded:  # the latent weights become sharded parameters (new objects)
            model.to(accelerator.device)  # what DDP's prepare would do; then each linear is split
            shard_linears(linears, accelerator.device)
            latent = {name: fp_weight(m) for name, m in linears.items()}
        if opts["gradient_checkpointing"]:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

        def rank(run: dict) -> tuple:  # lower is better; "final": an lr0 that stopped has no last epoch to offer
            return (opts["select"] == "final" and run["stop_reason"] is not None, run["best_nll_validation"])

        def kept(weights: dict) -> dict:  # what is kept of the best epoch (CPU): int8 codes on the grid, else the weights
            return {name: grids[name].codes(full_tensor(w.detach())).cpu() if quantize
                    else full_tensor(w.detach()).to("cpu", copy=True) for name, w in weights.items()}

        def evaluate() -> tuple[float, float]:
            model.eval()
            # quantize each weight once, not once per batch (sharded: per forward, the cache would hold
            # every layer's whole weight)
            with parametrize.cached() if not sharded else nullcontext():
                result = (nll(model, data.validation, config.batch_size, desc=f"{title} NLL validation"),
                          nll(model, data.test, config.batch_size, desc=f"{title} NLL test"))
            model.train()
            return result

        # accelerate places the model (DDP under `accelerate launch`) and shards the batches. The
        # optimizer stays a plain torch one: DDP all-reduces the gradients in backward (FSDP2
        # reduce-scatters them), and the loop below steps it once per accumulation group.
        loader = DataLoader(data.calibration, batch_size=opts["batch_size"], shuffle=True)
        if sharded:
            loader = accelerator.prepare(loader)
        else:
            wrapped, loader = accelerator.prepare(model, loader)
        accum = opts["grad_accum"]
        micro_per_epoch = len(loader)  # micro-batches per epoch on this process
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        total_steps = opts["epochs"] * steps_per_epoch

        state = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
        if state is not None and state["key"] != config.key():
            raise ValueError(f"{path} holds the QAFT state of another run (key {state['key']}, this run is "
                             f"{config.key()}); remove it or set a different options['checkpoint_dir'].")
        resumed_from = None
        if state is not None and "rtn" in state:  # written before FPFT shared the loop
            state["start"] = state.pop("rtn")
        if state is None:
            # epoch 0: RTN (QAFT) or FP (FPFT)
            nll_val, nll_test = (start_nll["nll_validation"], start_nll["nll_test"]) if start_nll else evaluate()
            state = {"key": config.key(), "start": {"nll_validation": nll_val, "nll_test": nll_test},
                     "runs": [], "best_codes": None, "current": None}  # best_codes: kept(...) of the best epoch
        else:
            resumed_from = {"lr_index": len(state["runs"]),
                            "epoch": state["current"]["run"]["history"][-1]["epoch"] if state["current"] else 0}

        for index, lr0 in enumerate(opts["lr_grid"]):
            if index < len(state["runs"]):
                continue  # finished before an interruption
            for name, w in latent.items():
                assign(w, fp[name])
            optimizer = torch.optim.AdamW(list(latent.values()), lr=lr0, weight_decay=0.0)
            optimizer.zero_grad(set_to_none=True)
            scheduler = make_scheduler(optimizer, total_steps)
            current, state["current"] = state["current"], None
            if current is not None:  # resume this lr0 after its last finished epoch
                for name, w in latent.items():
                    assign(w, current["latent"][name])
                optimizer.load_state_dict(optimizer_shards(optimizer, current["optimizer"]))
                scheduler.load_state_dict(current["scheduler"])
                _set_rng_state(current["rng"])
                run, best_codes = current["run"], current["best_codes"]
                run.setdefault("losses", [])  # a state saved before the losses were kept
            else:
                torch.manual_seed(config.seed)
                start = state["start"]
                run = {"lr": lr0, "history": [{"epoch": 0, **start, "lr": lr0}], "stop_reason": None,
                       "best_epoch": 0, "best_nll_validation": start["nll_validation"], "steps": 0, "train_s": 0.0,
                       "losses": []}
                best_codes = kept(fp)

            wrapped.train()
            bar = progress(total=total_steps, initial=run["steps"], desc=f"{title} lr0={lr0:g}",
                           enabled=accelerator.is_local_main_process)
            for epoch in range(run["history"][-1]["epoch"] + 1, opts["epochs"] + 1):
                loader.set_epoch(epoch)  # the batch order depends only on (seed, epoch)
                start = time.perf_counter()
                for micro, batch in enumerate(loader):
                    # gradient accumulation: DDP syncs and the optimizer steps on a group's last batch
                    group_start = micro // accum * accum
                    group_end = min(group_start + accum, micro_per_epoch)
                    last_in_group = micro + 1 == group_end
                    if sharded:
                        for m in linears.values():
                            m.set_requires_gradient_sync(last_in_group)
                    with nullcontext() if last_in_group or sharded else accelerator.no_sync(wrapped):
                        with autocast:
                            loss_sum, n_tokens = sequence_nll(wrapped, batch)
                        loss = loss_sum / n_tokens
                        if not torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all():
                            run["stop_reason"] = (f"non-finite training loss ({float(loss.detach())}) at "
                                                  f"epoch {epoch}, step {run['steps'] + 1}")
                            break
                        accelerator.backward(loss / (group_end - group_start))
                    if last_in_group:
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        run["steps"] += 1
                        run["losses"].append(float(loss.detach()))  # the step's last micro-batch's mean NLL
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{scheduler.get_last_lr()[0]:.2g}")
                run["train_s"] += time.perf_counter() - start
                if run["stop_reason"]:
                    break

                nll_val, nll_test = evaluate()
                run["history"].append({"epoch": epoch, "nll_validation": nll_val, "nll_test": nll_test,
                                       "lr": scheduler.get_last_lr()[0]})
                if accelerator.is_main_process:
                    logger.info("%s lr0=%g epoch %d: validation NLL %.4f, test %.4f, mean training loss %.4f",
                                title, lr0, epoch, nll_val, nll_test,
                                sum(run["losses"][-steps_per_epoch:]) / max(1, len(run["losses"][-steps_per_epoch:])))
                if not math.isfinite(nll_val):
                    run["stop_reason"] = f"non-finite validation NLL ({nll_val}) after epoch {epoch}"
                    break
                if nll_val < run["best_nll_validation"] or opts["select"] == "final":
                    run["best_epoch"], run["best_nll_validation"] = epoch, nll_val
                    best_codes = kept(latent)
                if epoch < opts["epochs"]:  # after the last epoch the lr0's summary is saved instead
                    if sharded or accelerator.is_main_process:  # sharded: gathered by every process (collectives)
                        whole = {"latent": {name: full_tensor(w.detach()).cpu() for name, w in latent.items()},
                                 "optimizer": whole_optimizer_state(optimizer)}
                    if accelerator.is_main_process:  # written by the main one
                        state["current"] = {"run": run, "best_codes": best_codes, **whole,
                                            "scheduler": scheduler.state_dict(), "rng": _rng_state()}
                        save_state(path, state)
                        state["current"] = None
                    accelerator.wait_for_everyone()
            bar.close()
            if run["stop_reason"] and accelerator.is_main_process:
                logger.warning("%s lr0=%g stopped: %s", title, lr0, run["stop_reason"])

            run["step_s"] = run["train_s"] / run["steps"] if run["steps"] else None
            best = min(state["runs"], key=rank, default=None)
            if best is None or rank(run) < rank(best):
                state["best_codes"] = best_codes  # the best of the sweep so far
            state["runs"].append(run)
            if accelerator.is_main_process:
                save_state(path, state)
            accelerator.wait_for_everyone()

        # The best lr0's best epoch (QAFT: exactly on the grid).
        best = min(state["runs"], key=rank)
        best_weights = {layer: grids[layer].dequantize(codes.to(grids[layer].scale.device), fp[layer].dtype)
                        if quantize else codes for layer, codes in state["best_codes"].items()}
        if sharded:
            unshard_linears(model, linears, {layer: w.to(accelerator.device) for layer, w in best_weights.items()})
        else:
            for layer, w in latent.items():
                assign(w, best_weights[layer])
            if quantize:
                bake(linears)
    finally:
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        model.__dict__.pop("_is_accelerate_prepared", None)  # so that a later prepare wraps it again
        accelerator.free_memory()
        if opts["gradient_checkpointing"]:
            model.activation_checkpointing_disable()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        model.eval()

    accelerator.wait_for_everyone()
    # The state stays until the result is safely elsewhere: `repro.runs.run` calls `discard_state`
    # after writing the record (a disk-full or Ctrl-C there loses nothing; a rerun finds every lr0
    # finished and only bakes and evaluates). Callers of `qaft` itself call it when they are done.
    steps = sum(r["steps"] for r in state["runs"])
    train_s = sum(r["train_s"] for r in state["runs"])
    return {
        "lr": best["lr"], "best_epoch": best["best_epoch"], "nll_validation": best["best_nll_validation"],
        **({} if not quantize else {
            # per channel or group: each layer's mean scale here, the scales themselves in grid_scales
            "scales": {layer: float(g.scale.mean()) for layer, g in grids.items()},
            **({"grid_scales": {layer: g.scale.detach().cpu() for layer, g in grids.items()}}
               if not config.grid.per_tensor else {})}),
        "rtn" if quantize else "fp": state["start"],  # epoch 0
        # losses: every optimizer step's training loss (a state from before they were kept has none)
        "runs": [{k: r.get(k, []) if k == "losses" else r[k] for k in ("lr", "history", "stop_reason", "best_epoch",
                                                                     "best_nll_validation", "steps", "step_s", "losses")}
                 for r in state["runs"]],
        "step_s": train_s / steps if steps else None,
        "epochs": opts["epochs"], "steps_per_epoch": steps_per_epoch, "batch_size": opts["batch_size"],
        "grad_accum": opts["grad_accum"], "mixed_precision": opts["mixed_precision"],
        "gradient_checkpointing": opts["gradient_checkpointing"], "select": opts["select"], "sharding": opts["sharding"], "processes": accelerator.num_processes, "resumed_from": resumed_from,
    }


def discard_state(config) -> None:
    """Remove the finished sweep's resume state (and its directory when empty: ``checkpoint_dir``
    may be a user's); ``repro.runs.run`` calls it once the run's record is on disk."""
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, the main process owns it
        return
    path = checkpoint_dir(config) / STATE_FILE
    path.unlink(missing_ok=True)
    with suppress(OSError):
        path.parent.rmdir()

