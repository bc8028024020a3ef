"""Running: a ``RunConfig`` -> its record, computed or read from the store.

``run`` returns the cached record when one exists, so a killed batch (``sweep``) resumes where it
stopped; the record store (``repro.store``) writes records atomically, so an interrupted write
never leaves a half record. The model and data of the last run stay loaded (``workbench``) for
the next run on the same model. Provenance (the code's hash, the machine) is written into every
record.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import time
import warnings
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

import repro
from repro import data as data_mod
from repro import evaluate, models, store
from repro.config import SHARED_VERSIONS, RunConfig, load_tier, sweep_configs
from repro.methods import METHODS
from repro.progress import progress

logger = logging.getLogger(__name__)

# The sources that compute a record's numbers (not the plots, tables, widgets or CLI around them); a
# record's code version adds the settings of its own tier (``code_hash``).
COMPUTE_SOURCES = ("models.py", "data.py", "quant.py", "evaluate.py", "stack.py", "config.py", "store.py", "runs.py",
                   "methods/*.py")


@functools.cache
def code_hash(tier: str | None) -> str:
    """sha256 (12 hex) of ``COMPUTE_SOURCES`` as this process imported them and of ``tier``'s settings as
    ``load_tier`` reads them (its ``base:`` chain merged; None, a config made without a tier: none): the
    code and settings that produced a record of that tier (recorded in it; not part of its key, see
    ``SHARED_VERSIONS``). Only the record's own tier counts, so that trimming the ``ci`` tier, which
    `make test` computes, leaves the version of ``cpu`` and ``paper`` records, which the README reports,
    as it was; and only the parsed settings count, so that rewording a comment (or a ``paper_deviations``
    reason) in a tier's YAML does not."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(p for pattern in COMPUTE_SOURCES for p in root.glob(pattern)):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    if tier:
        settings = {k: v for k, v in load_tier(tier).items() if k != "paper_deviations"}  # (prose: README table)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


@dataclass
class Workbench:
    """A loaded model with its tokenizer, tokenised data and FP weight snapshot."""

    model: torch.nn.Module
    tokenizer: object
    data: data_mod.Data
    fp_weights: dict
    key: tuple
    fp_test_grams: dict | None = None  # the FP model's test-split input Gram matrices, once per bench
    fp_test_hidden: tuple | None = None  # (batch size, the FP model's block outputs per test mini-batch)


_WORKBENCH: list[Workbench] = []  # the one most recently used (models are large)


def workbench(config: RunConfig) -> Workbench:
    """Load (or reuse) the model and data a config needs; the model is reset to FP."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (config.model, config.corpus, config.seq_len, config.n_calibration, config.n_eval, config.eval_windows,
           config.gptq_protocol_ppl, config.seed, device, config.dtype, config.device_map)
    if _WORKBENCH and _WORKBENCH[0].key == key:
        bench = _WORKBENCH[0]
        models.restore(bench.model, bench.fp_weights)
        return bench
    _WORKBENCH.clear()
    dtype = {None: torch.float32, "auto": "auto"}.get(config.dtype) or getattr(torch, config.dtype)
    model, tokenizer = models.load_model(config.model, dtype=dtype, device=None if config.device_map else device,
                                         device_map=config.device_map)
    model_max = models.max_length(model)
    data = data_mod.make_data(tokenizer, config.corpus, config.seq_len or model_max, config.n_calibration,
                              config.n_eval, config.seed, model_max=model_max, eval_windows=config.eval_windows,
                              gptq_protocol=config.gptq_protocol_ppl)
    bench = Workbench(model, tokenizer, data, models.fp_snapshot(model), key)
    _WORKBENCH.append(bench)
    return bench


@functools.cache
def machine() -> dict[str, str]:
    """The CPU and the kernel path torch dispatches to on it: float results of the chaotic runs
    (GPTQ, QAFT at low bits on few calibration tokens) differ between kernel paths, so a record
    says where it was computed."""
    cpu = platform.processor() or platform.machine()
    with suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}



def epoch0_config(config: RunConfig) -> RunConfig | None:
    """The run whose record a fine-tuning reads its epoch 0 from (QAFT: RTN on the same grid; FPFT: FP),
    so that computing it first saves the fine-tuning that evaluation; ``None`` for other methods."""
    starts_from = METHODS[config.method].starts_from
    return dataclasses.replace(config, method=starts_from, options={}, save_weights=False) if starts_from else None

def run(config: RunConfig, outputs: Path | None = None, force: bool = False, need_weights: bool = False) -> dict:
    """Run one config (or read its cached record) and return the record dict.

    Runs of the same config at the same time (two ``repro batch`` on one outputs/) do not both
    compute it: each takes the record's lock (``<record>.lock``), and the one that waited finds
    the record and reads it. ``need_weights``: a record without kept weights (``save_weights``;
    an older run) is computed again to keep them."""
    path = store.record_path(config, outputs)
    record = None if force else _reusable(config, outputs, need_weights)
    if record is None:
        store.check_writable(path.parent)  # before hours of work, not after
        # Under `accelerate launch` every rank runs this config together (QAFT's DDP needs them all):
        # no lock between them; rank 0 writes the record.
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        with nullcontext() if distributed else store.file_lock(path.with_name(f".{path.name}.lock")):
            # another process may have just written it
            record = None if force else _reusable(config, outputs, need_weights, warn=False)
            if record is None:
                logger.info("computing %s %s (key %s)", config.model, config.label(), config.key())
                record = _compute(config, outputs)
                logger.info("%s %s: validation NLL %.4f, test %.4f", config.model, config.label(),
                            record.get("nll_validation", float("nan")), record.get("nll_test", float("nan")))
    else:
        logger.debug("read %s %s from %s", config.model, config.label(), path)
    # after the record is on disk (also when a process stopped between writing it and cleaning up)
    if METHODS[config.method].after_record is not None:
        METHODS[config.method].after_record(config)
    return record


def _reusable(config: RunConfig, outputs: Path | None, need_weights: bool = False, warn: bool = True) -> dict | None:
    """The cached record, unless weights are needed and it kept none (an older run)."""
    record = store.read_record(config, outputs)
    if record is not None and need_weights and not store.weights_path(config, outputs).exists():
        if not warn:
            return None
        warnings.warn(f"{config.model} {config.label()}: its record has no kept weights; computing it again "
                      f"to keep them", stacklevel=2)
        return None
    return record


@contextmanager
def pinned_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` inside the block (``None``: left as is).

    Why: a float32 reduction is split across threads, so its rounding depends on their number;
    argmin-style choices amplify that (measured on SmolLM2 at the ci tier, 1 vs 2 threads: the
    mse observer picks another scale for 14 of 210 int3 tensors and RTN int3 validation NLL reads
    14.103 at 1 thread, 14.119 at 2; GPTQ int8's damping choices move its validation NLL between
    3.560 and 3.572). Pinning
    the count makes a record the same on any machine with the same CPU kernels, whatever its cores."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compute(config: RunConfig, outputs: Path | None) -> dict:
    """Load (or reuse) the model and data, run the method, evaluate, write the record (at the
    config's ``threads``)."""
    with pinned_threads(config.threads):
        return _compute_pinned(config, outputs)


def _compute_pinned(config: RunConfig, outputs: Path | None) -> dict:
    store.weights_path(config, outputs).unlink(missing_ok=True)  # kept by an earlier computation: stale now
    start_weights = load_weights(config.start_config(), outputs) if config.start == "fpft" else None
    bench = workbench(config)
    changes_weights = config.method != "fp"  # the FP reference's layer MSEs are 0 by definition
    if changes_weights and bench.fp_test_grams is None and \
            evaluate.gram_bytes(bench.model) <= evaluate.GRAM_LIMIT_BYTES:  # the model is FP here
        bench.fp_test_grams = evaluate.input_grams(bench.model, bench.data.test, config.batch_size,
                                                   desc="FP test inputs (Gram)")
    if changes_weights and (bench.fp_test_hidden or (None,))[0] != config.batch_size and \
            evaluate.hidden_bytes(bench.model, bench.data.test) <= evaluate.HIDDEN_LIMIT_BYTES:
        bench.fp_test_hidden = (config.batch_size, evaluate.block_outputs(
            bench.model, bench.data.test, config.batch_size, desc="FP test block outputs"))
    reference, grams, hidden = bench.fp_weights, bench.fp_test_grams, bench.fp_test_hidden
    if start_weights is not None:  # the method starts from FPFT's weights, and its layer MSEs are against them
        models.restore(bench.model, start_weights)
        reference, grams, hidden = start_weights, None, None
    torch.manual_seed(config.seed)
    method, version = METHODS[config.method].run, METHODS[config.method].version
    extra, starts_from = {}, METHODS[config.method].starts_from
    if starts_from:  # a fine-tuning's epoch 0 (QAFT: RTN on the same grid; FPFT: FP): reuse that record's NLL
        start = store.read_record(epoch0_config(config), outputs)
        if start is not None:
            extra["start_nll"] = {"nll_validation": start["nll_validation"], "nll_test": start["nll_test"]}
    start = time.perf_counter()
    info = method(bench.model, bench.data, config, **extra)
    grid_scales = info.pop("grid_scales", None)  # tensors (per channel / group), for the kept weights only
    method_s = time.perf_counter() - start
    # a fine-tuning measured the validation NLL of exactly these (QAFT: baked) weights when it picked them
    known = info["nll_validation"] if starts_from else None
    metrics = evaluate.record_metrics(bench.model, bench.data, reference, config.batch_size, config.grid,
                                      grams, hidden[1] if hidden else None, nll_validation=known,
                                      changed=changes_weights)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    record = {
        "key": config.key(), "config": dataclasses.asdict(config), "method_version": version,
        "versions": {"package": repro.__version__, "code": code_hash(config.tier), "method": version, **SHARED_VERSIONS},
        **metrics, "info": info,
        "wall_s": {"method": method_s, "evaluate": time.perf_counter() - start - method_s},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": str(next(bench.model.parameters()).device), "threads": torch.get_num_threads(),
                        **machine()},
        "created": created,
    }
    if config.save_weights:  # before the record, which then has them; a failure costs the weights only
        try:
            store.save_weights(bench.model, config, info, store.weights_path(config, outputs), reference, created,
                               grid_scales)
        except RuntimeError as err:
            warnings.warn(f"{err}; the record is written without them", stacklevel=2)
    store.write_json_atomic(store.record_path(config, outputs), record)
    record["cached"] = False
    return record


def load_weights(config: RunConfig, outputs: Path | None = None) -> dict[str, torch.Tensor]:
    """A run's kept quantized weights (name -> float32 tensor, the weight's stored layout); the
    run is computed first, or computed again when its record predates keeping weights."""
    config = dataclasses.replace(config, save_weights=True)
    path = store.weights_path(config, outputs)
    if not path.exists():
        run(config, outputs, need_weights=True)
    if not path.exists():
        raise RuntimeError(f"{config.model} {config.label()}: its weights could not be kept (see the warning "
                           f"above); a landscape needs them")
    return store.read_weights(path)


def quantized_model(config: RunConfig, outputs: Path | None = None, device: str = "cpu"):
    """``(model, tokenizer, scales)``: a freshly loaded copy of the run's model holding the run's kept
    weights (``load_weights``: computed first when missing) and their scales (name -> tensor,
    ``store.save_weights``' layout; None for FPFT, whose kept weights are float); the FP reference
    (``fp``) as loaded."""
    from safetensors.torch import load_file

    if config.method == "fp":
        return (*models.load_model(config.model, device=device), None)
    config = dataclasses.replace(config, save_weights=True)
    weights = load_weights(config, outputs)  # name -> the weight (stored layout)
    stored = load_file(str(store.weights_path(config, outputs)))
    model, tokenizer = models.load_model(config.model, device=device)
    with torch.no_grad():
        for name, module in models.stack_linears(model).items():
            module.weight.copy_(weights[name].to(module.weight.dtype))
    return model, tokenizer, None if config.grid is None else {name: stored[f"{name}.scale"] for name in weights}


def sweep(methods=("fp", "rtn"), bits=None, tier: str = "cpu", outputs: Path | None = None,
          **overrides) -> list[dict]:
    """Run every (method, bits) pair (``fp`` once), resuming from cached records.
    ``bits=None`` takes the tier's list."""
    configs = sweep_configs(methods, bits, tier, **overrides)
    return [run(config, outputs) for config in progress(configs, desc="runs")]


def summary(record: dict) -> str:
    """One line: what ran and its headline numbers."""
    c = record["config"]
    bits = "" if c["bits"] is None else f" int{c['bits']}"
    return (f"{c['method']} {c['model']}{bits} ({c['observer']}, {c['corpus']}): "
            f"NLL val {record['nll_validation']:.3f} (ppl {record['ppl_validation']:.1f}), "
            f"test {record['nll_test']:.3f}"
            + (f" (GPTQ-protocol ppl {record['ppl_test_gptq_protocol']:.2f})" if "ppl_test_gptq_protocol" in record else "")
            + f" | mean layer MSE (test) own inputs {record['mean_layer_mse']:.3g}, "
            f"FP inputs {record.get('mean_layer_mse_fp_inputs', float('nan')):.3g} | "
            f"{record['wall_s']['method']:.1f} s{' [cached]' if record.get('cached') else ''}")


def table(records: list[dict]):
    """Records as a pandas DataFrame, one row per run (no per-layer columns)."""
    from repro import require

    pd = require("pandas", "notebooks")

    rows = []
    for r in records:
        c = r["config"]
        rows.append({"method": c["method"], "bits": c["bits"], "observer": c["observer"],
                     "nll_validation": r["nll_validation"], "ppl_validation": r["ppl_validation"],
                     "nll_test": r["nll_test"], "mean_layer_mse": r["mean_layer_mse"],
                     "mean_layer_mse_fp_inputs": r.get("mean_layer_mse_fp_inputs"), "weight_mse": r["weight_mse"],
                     "weight_size_gb": r["weight_size_gb"], "method_s": r["wall_s"]["method"]})
    return pd.DataFrame(rows)
