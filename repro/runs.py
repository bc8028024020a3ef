"""Experiment config -> cached, resumable result records (JSON) under outputs/.

A record is keyed by a hash of everything that determines it (the ``RunConfig`` minus
run-time placement, plus the method's version). ``run`` returns the cached record when one
exists, so a killed batch (``sweep``) resumes where it stopped; records are written atomically
(temporary file + rename), so an interrupted write never leaves a half record.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import repro
from repro import data as data_mod
from repro import evaluate, models
from repro.methods import MAIN, METHODS, QUANTIZERS
from repro.progress import progress
from repro.quant import OBSERVERS, check_bits, check_granularity, expand_scale, grid_name, is_int

PARAMS_DIR = Path(__file__).parent / "params"
TIERS = ("ci", "cpu", "paper")
# where a run executes, and whether its weights are kept, do not change what it computes; the
# thread count changes only float rounding (``pinned_threads``)
HASH_EXCLUDE = ("device", "tier", "save_weights", "threads")
# Versions of the code every record shares, part of every record's key: bump one when what it
# computes changes, so stale records are recomputed rather than re-read. (Methods carry their own.)
SHARED_VERSIONS = {"evaluation": 3,  # 2: layer MSE on test, both input readings; 3: FP size at 16 bits
                   "data": 2}  # 2: windows start with BOS where the tokenizer adds one


# The sources that compute a record's numbers (not the plots, tables, widgets or CLI around them).
COMPUTE_SOURCES = ("models.py", "data.py", "quant.py", "evaluate.py", "runs.py", "methods/*.py", "params/*.yaml")


@functools.cache
def code_hash() -> str:
    """sha256 (12 hex) of ``COMPUTE_SOURCES`` as this process imported them: the code that
    produced a record (recorded in it; not part of its key, see ``SHARED_VERSIONS``)."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(p for pattern in COMPUTE_SOURCES for p in root.glob(pattern)):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def outputs_dir() -> Path:
    """Results root: ``$REPRO_OUTPUTS``; else ``outputs/`` of the repository checkout that holds
    the working directory (found upwards: a directory with ``pyproject.toml`` and ``notebooks/``),
    so a notebook run from the root or from ``notebooks/`` writes to the same place; else
    ``./outputs``."""
    if "REPRO_OUTPUTS" in os.environ:
        return Path(os.environ["REPRO_OUTPUTS"])
    here = Path.cwd().resolve()
    for root in (here, *here.parents):
        if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
            return root / "outputs"
    return Path("outputs")


@dataclass
class RunConfig:
    """Everything that determines one run. ``options`` holds the method's own settings."""

    method: str = "rtn"
    bits: int | None = 4  # None for the "fp" reference
    model: str = models.DEFAULT_MODEL
    corpus: str = data_mod.DEFAULT_CORPUS
    observer: str = "histogram"
    granularity: str = "tensor"  # scales per tensor, output channel or group (repro.quant)
    group_size: int = 128  # input columns per scale at granularity "group"
    seq_len: int | None = 512  # None: the model's maximum length (paper protocol)
    n_calibration: int = 128
    n_eval: int | None = None  # validation/test sequences (None: whole split)
    batch_size: int = 4
    seed: int = 0
    options: dict = field(default_factory=dict)
    tier: str | None = None
    device: str | None = None  # None: cuda when available, else cpu
    # torch's intra-op CPU threads while computing (None: torch's default). Float reductions split
    # by thread, so records are bit-identical only at one count: the embedded tiers pin 2.
    threads: int | None = None
    save_weights: bool = False  # keep the quantized weights beside the record (``weights_path``)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "fp":
            self.bits, self.granularity = None, "tensor"  # nothing is quantized
        else:
            check_bits(self.bits)
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        check_granularity(self.granularity, self.group_size)
        if self.granularity != "tensor" and self.observer == "histogram":
            raise ValueError(f"observer 'histogram' is per tensor only (torch has no per-channel HistogramObserver); "
                             f"granularity {self.granularity!r} takes observer 'mse' or 'minmax'")
        if self.corpus not in data_mod.CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; choose one of {', '.join(data_mod.CORPORA)}")
        for name, low, optional in (("n_calibration", 1, False), ("n_eval", 1, True), ("seq_len", 2, True),
                                    ("batch_size", 1, False), ("seed", 0, False), ("threads", 1, True)):
            value = getattr(self, name)
            if (value is None and not optional) or (value is not None and not is_int(value, low)):
                raise ValueError(f"{name}={value!r}: an integer >= {low}" + (" or None (the whole split / the "
                                 "model's maximum length / torch's default threads)" if optional else ""))
        if self.device is not None:
            models.check_device(self.device)
        METHODS[self.method].check_options(self)  # options are checked now, not after the model has loaded
        if self.save_weights and not METHODS[self.method].keeps_weights:
            raise ValueError(f"save_weights: {self.method} runs have no quantized weights to keep "
                             f"(methods that do: {', '.join(n for n, m in METHODS.items() if m.keeps_weights)})")

    def key(self) -> str:
        """Hash of the config (placement excluded) and the method's version."""
        content = {k: v for k, v in dataclasses.asdict(self).items() if k not in HASH_EXCLUDE}
        # per-tensor keys as before granularity existed (their records stay valid); a group size
        # matters only to groups
        if self.granularity == "tensor":
            del content["granularity"]
        if self.granularity != "group":
            del content["group_size"]
        content["method_version"] = METHODS[self.method].version
        content.update(SHARED_VERSIONS)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def grid_label(self) -> str:
        """The grid's scales: "" per tensor (the default), "per channel" or "g128"."""
        return "" if self.granularity == "tensor" else grid_name(self.granularity, self.group_size)

    def label(self) -> str:
        if self.bits is None:
            return "fp"
        name = self.method
        if self.method == "blockwise":
            from repro.methods.blockwise import variant

            name = variant(self.options)
        return " ".join(filter(None, (name, f"int{self.bits}", self.grid_label())))


# Tier keys a model may set for itself under ``model_settings`` (the data, the grid and method
# options, merged into the tier's per option; not the sweep or which model runs).
MODEL_SETTINGS = {"observer", "corpus", "seq_len", "n_calibration", "n_eval", "batch_size", "seed", "methods",
                  "cross_block"}


def load_tier(tier: str) -> dict:
    """The parameter set of a tier (``params/<tier>.yaml``) as a dict (the caller's own copy)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    path = PARAMS_DIR / f"{tier}.yaml"
    return copy.deepcopy(_parse_tier(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=None)
def _parse_tier(path: Path, mtime_ns: int) -> dict:
    """A tier's YAML parsed once per version of the file: a batch plan builds hundreds of configs,
    and parsing the file for each took most of ``batch.plan``'s time."""
    return yaml.safe_load(path.read_text())


def make_config(method: str = "rtn", bits: int | None = 4, tier: str = "cpu", options: dict | None = None,
                **overrides) -> RunConfig:
    """A ``RunConfig`` from a tier's YAML, the method's options there, then ``overrides``
    (any ``RunConfig`` field; ``None`` values are ignored so CLI defaults fall through)."""
    if method == "fp" and bits is not None:
        raise ValueError(f"method 'fp' quantizes nothing: pass bits=None, not {bits!r}")
    params = load_tier(tier)
    model = overrides.get("model") or params.get("model")
    own = (params.pop("model_settings", None) or {}).get(model, {})  # what this model sets differently
    misplaced = set(own) - MODEL_SETTINGS
    if misplaced:
        raise ValueError(f"params/{tier}.yaml: model_settings of {model!r} may set {', '.join(sorted(MODEL_SETTINGS))}, "
                         f"not {', '.join(sorted(misplaced))}")
    params.update({k: v for k, v in own.items() if k != "methods"})
    method_options = {**(params.pop("methods", {}).get(method) or {}), **(own.get("methods", {}).get(method) or {})}
    method_options.update(options or {})
    params.pop("bits", None)
    if isinstance(params.get("observer"), dict):  # chosen per bit-width (fp: the highest width's)
        if method != "fp":
            check_bits(bits)
        by_bits = params["observer"]
        if bits is not None and bits not in by_bits:
            raise ValueError(f"tier {tier!r} chooses an observer per bit-width for {sorted(by_bits)} only, not "
                             f"int{bits}; pass observer=... (CLI: --observer) or add int{bits} to params/{tier}.yaml")
        params["observer"] = by_bits[bits if bits is not None else max(by_bits)]
    if (overrides.get("granularity") or "tensor") != "tensor" and not overrides.get("observer") and method != "fp":
        # per channel / group: the tier's granularity_study observer for this width (histogram is per
        # tensor only), else minmax in histogram's place
        study = (params.get("granularity_study") or {}).get("observer")
        chosen = study.get(bits) if isinstance(study, dict) else study
        params["observer"] = chosen or ("minmax" if params["observer"] == "histogram" else params["observer"])
    # the landscape (notebook 03) reads the quantized weights of its methods at its widths: keep them
    landscape = params.get("landscape") or {}
    # (RTN's follow from its record's scales: nothing to keep)
    landscape_models = {*landscape.get("models", [model]), *(params.get("datasets") or {}).get("models", [])}
    params["save_weights"] = (method != "rtn" and method in landscape.get("methods", ())
                              and bits in landscape.get("bits", ()) and model in landscape_models)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    params = {k: v for k, v in params.items() if k in fields}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(method=method, bits=bits, options=method_options, tier=tier, **params)


def record_path(config: RunConfig, outputs: Path | None = None) -> Path:
    outputs = Path(outputs) if outputs is not None else outputs_dir()
    bits = "fp" if config.bits is None else f"int{config.bits}"
    model = config.model.replace("/", "--")
    return outputs / "records" / config.method / f"{model}-{config.corpus}-{bits}-{config.key()}.json"


def weights_path(config: RunConfig, outputs: Path | None = None) -> Path:
    """Where a run's quantized weights are kept: beside its record, ``<record>.safetensors``."""
    return record_path(config, outputs).with_suffix(".safetensors")


def save_weights(model, config: RunConfig, info: dict, path: Path, fp_weights: dict | None = None,
                 created: str = "", grid_scales: dict | None = None) -> None:
    """The stack's quantized weights as int8 codes (the weight's stored layout) and their float32
    scales (``<name>`` and ``<name>.scale``: 0-d, or [out, 1] / [out, n_groups] of the [out, in]
    matrix), written atomically, with the record's ``created`` stamp, the group size and the
    transposed (Conv1D) layers in the file's metadata (so a landscape point can tell which
    computation of the run it used). A weight that is not ``code * scale``
    (in the weight's own dtype) raises. Scales come from ``grid_scales`` (per channel / group, as
    the method returned them), else the method's record (per tensor: RTN/QAFT ``scales``, GPTQ per
    layer), else from the observer on the FP weight in ``fp_weights`` (every method's grid)."""
    from safetensors.torch import save_file

    from repro.quant import codes, compute_scale

    known = {}
    if config.granularity == "tensor":
        known = {name: torch.tensor(s) for name, s in (info.get("scales") or {}).items()}
        known.update({name: torch.tensor(layer["scale"]) for name, layer in (info.get("layers") or {}).items()
                      if "scale" in layer})
    known.update(grid_scales or {})
    group_size = config.group_size if config.granularity == "group" else None
    tensors, transposed = {}, []
    for name, m in models.stack_linears(model).items():
        w = models.weight_matrix(m).detach().cpu()
        scale = known[name] if name in known else compute_scale(
            models.weight_matrix(m, fp_weights[name]), config.bits, config.observer, config.granularity,
            config.group_size).cpu()
        c = codes(w.float(), scale, config.bits, group_size)
        if not torch.equal((c.float() * expand_scale(scale, w.shape[-1], group_size)).to(w.dtype), w):
            raise RuntimeError(f"{config.label()}: {name} is not on its int{config.bits} grid; weights not saved")
        if models.is_conv1d(m):
            c = c.t()
            transposed.append(name)
        tensors[name], tensors[f"{name}.scale"] = c.contiguous(), scale.float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"key": config.key(), "bits": str(config.bits), "created": created,
                                          "group_size": str(group_size or ""), "transposed": ",".join(transposed)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_stamp(config: RunConfig, outputs: Path | None = None) -> str | None:
    """The ``created`` stamp of the record whose computation wrote the kept weights (None: none kept)."""
    from safetensors import safe_open

    path = weights_path(config, outputs)
    try:
        with safe_open(str(path), "pt") as f:
            created = (f.metadata() or {}).get("created")
        return created or f"mtime:{path.stat().st_mtime_ns}"  # a file kept before the stamp existed
    except Exception:  # noqa: BLE001 - missing or torn (safetensors raises its own error type): not kept
        return None


def load_weights(config: RunConfig, outputs: Path | None = None) -> dict[str, torch.Tensor]:
    """A run's kept quantized weights (name -> float32 tensor, the weight's stored layout); the
    run is computed first, or computed again when its record predates keeping weights."""
    from safetensors.torch import load_file

    config = dataclasses.replace(config, save_weights=True)
    path = weights_path(config, outputs)
    if not path.exists():
        run(config, outputs, need_weights=True)
    if not path.exists():
        raise RuntimeError(f"{config.model} {config.label()}: its weights could not be kept (see the warning "
                           f"above); a landscape needs them")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    group_size = int(metadata.get("group_size") or 0) or None
    transposed = set(filter(None, metadata.get("transposed", "").split(",")))
    stored, weights = load_file(str(path)), {}
    for name, c in stored.items():
        if not name.endswith(".scale"):
            matrix = c.t() if name in transposed else c
            weight = matrix.float() * expand_scale(stored[f"{name}.scale"], matrix.shape[-1], group_size)
            weights[name] = weight.t() if name in transposed else weight
    return weights


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old or the complete new file (temporary
    file in the same directory, fsync, rename; an existing file's mode is kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as JSON, written atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=1))


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
    key = (config.model, config.corpus, config.seq_len, config.n_calibration, config.n_eval, config.seed, device)
    if _WORKBENCH and _WORKBENCH[0].key == key:
        bench = _WORKBENCH[0]
        models.restore(bench.model, bench.fp_weights)
        return bench
    _WORKBENCH.clear()
    model, tokenizer = models.load_model(config.model, device=device)
    model_max = models.max_length(model)
    data = data_mod.make_data(tokenizer, config.corpus, config.seq_len or model_max, config.n_calibration,
                              config.n_eval, config.seed, model_max=model_max)
    bench = Workbench(model, tokenizer, data, models.fp_snapshot(model), key)
    _WORKBENCH.append(bench)
    return bench


def evaluate_model(model, data: data_mod.Data, fp_weights: dict, batch_size: int, bits: int | None,
                   fp_grams: dict | None = None, fp_hidden: list | None = None,
                   nll_validation: float | None = None, granularity: str = "tensor", group_size: int = 128) -> dict:
    """The metrics every record carries (definitions in ``repro.evaluate``).

    Validation NLL is for selection (QAFT's lr0 and epoch); every comparison across methods
    uses the test split, so the layer-wise MSEs, both readings, are measured on test. With
    ``fp_grams`` (``evaluate.input_grams`` of the FP model on test) the FP-input reading costs
    no forward pass; without, one pass with the FP weights exchanged in. With ``fp_hidden``
    (``evaluate.block_outputs`` of the FP model on test) the same test pass also measures every
    block's output MSE against the FP residual stream (``block_output_mse``; else ``None``).
    ``nll_validation``, when the method already measured it on these weights, is not measured again.
    ``granularity``/``group_size``: the grid's, for the weight size (its scales count).
    """
    nll_val = nll_validation if nll_validation is not None else \
        evaluate.nll(model, data.validation, batch_size, desc="NLL validation")
    if bits is None:
        nll_test = evaluate.nll(model, data.test, batch_size, desc="NLL test")
        zeros = dict.fromkeys(models.stack_linears(model), 0.0)
        mse = {"layer_mse": zeros, "layer_mse_fp_inputs": zeros}
        block_mse = [0.0] * len(models.blocks(model))
    else:  # the test NLL pass also records the own-input layer MSE and the block outputs (one forward)
        blocks_ctx = evaluate.recording_block_mse(model, fp_hidden) if fp_hidden is not None else nullcontext()
        with evaluate.recording_layer_mse(model, fp_weights) as own, blocks_ctx as block_mse:
            nll_test = evaluate.nll(model, data.test, batch_size, desc="NLL test + layer MSE")
        fp_inputs = (evaluate.layer_mse_from_grams(model, fp_weights, fp_grams) if fp_grams is not None else
                     evaluate.layer_mse(model, fp_weights, data.test, batch_size, inputs="fp", desc="layer MSE (FP inputs)"))
        mse = {"layer_mse": own, "layer_mse_fp_inputs": fp_inputs}
    n_layers = len(mse["layer_mse"])
    return {
        "nll_validation": nll_val, "nll_test": nll_test,
        "ppl_validation": evaluate.perplexity(nll_val), "ppl_test": evaluate.perplexity(nll_test),
        **mse, **{f"mean_{key}": sum(values.values()) / n_layers for key, values in mse.items()},
        "block_output_mse": block_mse, "mean_block_output_mse": sum(block_mse) / len(block_mse) if block_mse else None,
        "weight_mse": sum(evaluate.weight_mse(model, fp_weights).values()) / n_layers,
        "weight_distance": evaluate.weight_distance(model, fp_weights),
        # FP: float16, as the paper
        "weight_size_gb": models.weight_size_gb(model, 16) if bits is None else
        models.weight_size_gb(model, bits, granularity, group_size),
        "stack_params": models.stack_param_count(model),
    }


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


def read_record(config: RunConfig, outputs: Path | None = None) -> dict | None:
    """The cached record of ``config`` (marked ``cached``), or ``None`` if it has not run.

    A record that is not valid JSON, or not this config's (a truncated or hand-edited file), is
    never trusted: it is moved aside to ``<name>.corrupt`` with a warning naming it, and ``None``
    is returned so the run is computed again."""
    path = record_path(config, outputs)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("key", config.key()) != config.key():
            raise ValueError(f"it holds key {record.get('key') if isinstance(record, dict) else None!r}, "
                             f"not {config.key()!r}")
    except FileNotFoundError:  # another process moved it aside a moment ago
        return None
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
            where = f"moved to {aside}"
        except FileNotFoundError:
            return None
        except OSError as move_err:  # a read-only results directory: leave it, never trust it
            where = f"left in place ({type(move_err).__name__})"
        warnings.warn(f"record {path} is unreadable ({str(err).splitlines()[0][:120]}); {where}, "
                      f"the run is computed again", stacklevel=2)
        return None
    return {**record, "cached": True}


def check_writable(directory: Path) -> None:
    """Raise a clear error, before any long work, when results cannot be written to ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as err:
        raise RuntimeError(f"cannot write results to {directory} ({type(err).__name__}: {err.strerror or err}); "
                           f"choose a writable directory with --outputs or REPRO_OUTPUTS") from None


def run(config: RunConfig, outputs: Path | None = None, force: bool = False, need_weights: bool = False) -> dict:
    """Run one config (or read its cached record) and return the record dict.

    Runs of the same config at the same time (two ``repro batch`` on one outputs/) do not both
    compute it: each takes the record's lock (``<record>.lock``), and the one that waited finds
    the record and reads it. ``need_weights``: a record without kept weights (``save_weights``;
    an older run) is computed again to keep them."""
    path = record_path(config, outputs)
    record = None if force else _reusable(config, outputs, need_weights)
    if record is None:
        check_writable(path.parent)  # before hours of work, not after
        # Under `accelerate launch` every rank runs this config together (QAFT's DDP needs them all):
        # no lock between them; rank 0 writes the record.
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        with nullcontext() if distributed else models.file_lock(path.with_name(f".{path.name}.lock")):
            # another process may have just written it
            record = None if force else _reusable(config, outputs, need_weights, warn=False)
            if record is None:
                record = _compute(config, outputs)
    # after the record is on disk (also when a process stopped between writing it and cleaning up)
    if METHODS[config.method].after_record is not None:
        METHODS[config.method].after_record(config)
    return record


def _reusable(config: RunConfig, outputs: Path | None, need_weights: bool = False, warn: bool = True) -> dict | None:
    """The cached record, unless weights are needed and it kept none (an older run)."""
    record = read_record(config, outputs)
    if record is not None and need_weights and not weights_path(config, outputs).exists():
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
    mse observer picks another scale for 14 of 210 int3 tensors and RTN int3 validation NLL moves
    14.119 -> 14.103; GPTQ int8's damping choices move its validation NLL 3.572 -> 3.560). Pinning
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
    weights_path(config, outputs).unlink(missing_ok=True)  # kept by an earlier computation: stale now
    bench = workbench(config)
    if config.bits is not None and bench.fp_test_grams is None and \
            evaluate.gram_bytes(bench.model) <= evaluate.GRAM_LIMIT_BYTES:  # the model is FP here
        bench.fp_test_grams = evaluate.input_grams(bench.model, bench.data.test, config.batch_size,
                                                   desc="FP test inputs (Gram)")
    if config.bits is not None and (bench.fp_test_hidden or (None,))[0] != config.batch_size and \
            evaluate.hidden_bytes(bench.model, bench.data.test) <= evaluate.HIDDEN_LIMIT_BYTES:
        bench.fp_test_hidden = (config.batch_size, evaluate.block_outputs(
            bench.model, bench.data.test, config.batch_size, desc="FP test block outputs"))
    torch.manual_seed(config.seed)
    method, version = METHODS[config.method].run, METHODS[config.method].version
    extra = {}
    if config.method == "qaft":  # its epoch 0 is RTN on the same grid: reuse that record's NLL when there is one
        rtn = read_record(dataclasses.replace(config, method="rtn", options={}), outputs)
        if rtn is not None:
            extra["rtn_nll"] = {"nll_validation": rtn["nll_validation"], "nll_test": rtn["nll_test"]}
    start = time.perf_counter()
    info = method(bench.model, bench.data, config, **extra)
    grid_scales = info.pop("grid_scales", None)  # tensors (per channel / group), for the kept weights only
    method_s = time.perf_counter() - start
    # QAFT measured the validation NLL of exactly these (baked) weights when it picked them
    known = info["nll_validation"] if config.method == "qaft" else None
    metrics = evaluate_model(bench.model, bench.data, bench.fp_weights, config.batch_size, config.bits,
                             bench.fp_test_grams, bench.fp_test_hidden[1] if bench.fp_test_hidden else None,
                             nll_validation=known, granularity=config.granularity, group_size=config.group_size)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    record = {
        "key": config.key(), "config": dataclasses.asdict(config), "method_version": version,
        "versions": {"package": repro.__version__, "code": code_hash(), "method": version, **SHARED_VERSIONS},
        **metrics, "info": info,
        "wall_s": {"method": method_s, "evaluate": time.perf_counter() - start - method_s},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": str(next(bench.model.parameters()).device), "threads": torch.get_num_threads(),
                        **machine()},
        "created": created,
    }
    if config.save_weights:  # before the record, which then has them; a failure costs the weights only
        try:
            save_weights(bench.model, config, info, weights_path(config, outputs), bench.fp_weights, created,
                         grid_scales)
        except RuntimeError as err:
            warnings.warn(f"{err}; the record is written without them", stacklevel=2)
    write_json_atomic(record_path(config, outputs), record)
    record["cached"] = False
    return record


def sweep_configs(methods=("fp", "rtn"), bits=None, tier: str = "cpu", **overrides) -> list[RunConfig]:
    """The configs of every (method, bits) pair (``fp`` once); ``bits=None`` takes the tier's list."""
    bits = load_tier(tier)["bits"] if bits is None else bits
    return [make_config(method, b, tier, **overrides)
            for method in methods for b in ([None] if method == "fp" else bits)]


def cross_block_configs(tier: str = "cpu", model: str | None = None, bits=None, variants=None) -> list[RunConfig]:
    """The runs of the cross-block study and the locality spectrum for one model: FP, RTN, GPTQ and
    QAFT, and the block-wise ``variants`` (option dicts of ``blockwise``: ``window``, ``lookahead``
    ...) at ``bits`` (int or list); ``None`` takes the tier's ``cross_block`` section (a model's
    ``model_settings`` may set its own)."""
    params = load_tier(tier)
    model = model or params["model"]
    section = {**params.get("cross_block", {}),
               **(params.get("model_settings") or {}).get(model, {}).get("cross_block", {})}
    bits = section["bits"] if bits is None else bits
    bits = [bits] if isinstance(bits, int) else list(bits)
    variants = section["variants"] if variants is None else variants
    return [*sweep_configs(MAIN, bits, tier, model=model),
            *(make_config("blockwise", b, tier, options=dict(v), model=model) for b in bits for v in variants)]


def granularity_configs(tier: str = "cpu", model: str | None = None, bits=None, granularities=None) -> list[RunConfig]:
    """Notebook 08's runs for one model: FP; the section's methods at its widths per tensor (the
    tier's own runs) and at each of its ``granularities`` (with the section's observer per width
    and ``group_size``); the locality spectrum's block-wise ``variants`` at its ``locality`` widths,
    per tensor and at each granularity. ``None``: the tier's ``granularity_study`` section."""
    params = load_tier(tier)
    section = params.get("granularity_study") or {}
    model = model or params["model"]
    bits = section.get("bits", params["bits"]) if bits is None else bits
    bits = [bits] if isinstance(bits, int) else list(bits)
    granularities = section.get("granularities", ["channel", "group"]) if granularities is None else granularities
    locality = section.get("locality") or {}

    def grid(granularity):  # (the observer: make_config takes the section's for the width)
        return {} if granularity == "tensor" else {"granularity": granularity,
                                                   "group_size": section.get("group_size", 128)}

    methods = section.get("methods", list(QUANTIZERS))
    configs = [make_config("fp", None, tier, model=model)]
    for granularity in ["tensor", *granularities]:
        configs += [make_config(m, b, tier, model=model, **grid(granularity)) for b in bits for m in methods]
        configs += [make_config("blockwise", b, tier, options=dict(v), model=model, **grid(granularity))
                    for b in locality.get("bits", []) for v in locality.get("variants", [])]
    return configs


def sweep(methods=("fp", "rtn"), bits=None, tier: str = "cpu", outputs: Path | None = None,
          **overrides) -> list[dict]:
    """Run every (method, bits) pair (``fp`` once), resuming from cached records.
    ``bits=None`` takes the tier's list."""
    configs = sweep_configs(methods, bits, tier, **overrides)
    return [run(config, outputs) for config in progress(configs, desc="runs")]


def summary(record: dict) -> str:
    """One line: what ran and its headline numbers."""
    c = record["config"]
    bits = "fp" if c["bits"] is None else f"int{c['bits']}"
    return (f"{c['method']} {c['model']} {bits} ({c['observer']}, {c['corpus']}): "
            f"NLL val {record['nll_validation']:.3f} (ppl {record['ppl_validation']:.1f}), "
            f"test {record['nll_test']:.3f} | mean layer MSE (test) own inputs {record['mean_layer_mse']:.3g}, "
            f"FP inputs {record.get('mean_layer_mse_fp_inputs', float('nan')):.3g} | "
            f"{record['wall_s']['method']:.1f} s{' [cached]' if record.get('cached') else ''}")


def table(records: list[dict]):
    """Records as a pandas DataFrame, one row per run (no per-layer columns)."""
    import pandas as pd

    rows = []
    for r in records:
        c = r["config"]
        rows.append({"method": c["method"], "bits": c["bits"], "observer": c["observer"],
                     "nll_validation": r["nll_validation"], "ppl_validation": r["ppl_validation"],
                     "nll_test": r["nll_test"], "mean_layer_mse": r["mean_layer_mse"],
                     "mean_layer_mse_fp_inputs": r.get("mean_layer_mse_fp_inputs"), "weight_mse": r["weight_mse"],
                     "weight_size_gb": r["weight_size_gb"], "method_s": r["wall_s"]["method"]})
    return pd.DataFrame(rows)
