"""What determines a run: the tiers (``params/<tier>.yaml``), ``RunConfig`` and its key, and
``make_config`` (a tier's settings, a model's own settings, then the caller's overrides).

A record is keyed by ``RunConfig.key()``: a hash of everything that determines it (run-time
placement excluded) plus the method's and the shared code's versions.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from repro import data as data_mod
from repro import models
from repro.methods import METHODS
from repro.quant import OBSERVERS, Grid, check_bits, check_granularity, is_int

PARAMS_DIR = Path(__file__).parent / "params"
TIERS = ("ci", "cpu", "paper")

# where a run executes, and whether its weights are kept, do not change what it computes; the
# thread count changes only float rounding (``pinned_threads``)
HASH_EXCLUDE = ("device", "device_map", "tier", "save_weights", "threads")
STARTS = ("fp", "fpft")  # RunConfig.start
# RunConfig.dtype: the dtype weights load in (None: float32); "auto": the checkpoint's own (fp16/bf16 at 7B)
DTYPES = ("float32", "bfloat16", "float16", "auto")
# Versions of the code every record shares, part of every record's key: bump one when what it
# computes changes, so stale records are recomputed rather than re-read. (Methods carry their own.)
SHARED_VERSIONS = {"evaluation": 4,  # 2: layer MSE on test, both input readings; 3: FP size at 16 bits;
                   # 4: per-window NLL and the windows' id
                   "data": 2}  # 2: windows start with BOS where the tokenizer adds one



@dataclass
class RunConfig:
    """Everything that determines one run. ``options`` holds the method's own settings."""

    method: str = "rtn"
    bits: int | None = 4  # None for the FP references ("fp", "fpft": methods that quantize nothing)
    model: str = models.DEFAULT_MODEL
    corpus: str = data_mod.DEFAULT_CORPUS
    observer: str = "histogram"
    granularity: str = "tensor"  # scales per tensor, output channel or group (repro.quant)
    group_size: int = 128  # input columns per scale at granularity "group"
    seq_len: int | None = 512  # None: the model's maximum length (paper protocol)
    n_calibration: int = 128
    n_eval: int | None = None  # validation/test sequences (None: whole split)
    eval_windows: str = "consecutive"  # which n_eval windows: the split's first (paper) or spread over it
    # also the test perplexity under the common GPTQ protocol (``repro.data.gptq_protocol_windows``), so
    # numbers compare with published tables (the paper tier)
    gptq_protocol_ppl: bool = False
    batch_size: int = 4
    seed: int = 0
    options: dict = field(default_factory=dict)
    tier: str | None = None
    device: str | None = None  # None: cuda when available, else cpu
    # torch's intra-op CPU threads while computing (None: torch's default). Float reductions split
    # by thread, so records are bit-identical only at one count: the embedded tiers pin 1 (per process).
    threads: int | None = None
    save_weights: bool = False  # keep the quantized weights beside the record (``weights_path``)
    # the dtype the model loads in (None: float32; DTYPES). GPTQ's Hessians and solve and the NLL sums are
    # float32 whatever it is; methods that train (QAFT, FPFT, block-wise) keep float32 latent weights (an lr0 of
    # 1e-6 moves a weight by less than bf16 resolves), so for them it is always None
    dtype: str | None = None
    device_map: str | None = None  # "auto": spread a large model over the visible GPUs (placement only)
    # the weights the method starts from: "fp" the checkpoint's; "fpft" those of the FPFT run on the same
    # data and budget (``start_config``), a minimum of the calibration corpus's loss as the paper assumes w is
    start: str = "fp"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not METHODS[self.method].quantizes:
            self.bits, self.granularity = None, "tensor"  # nothing is quantized
            check_granularity(self.granularity, self.group_size)
        else:
            Grid(self.bits, self.granularity, self.group_size)  # checked once, here
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if self.granularity != "tensor" and self.observer == "histogram":
            raise ValueError(f"observer 'histogram' is per tensor only (torch has no per-channel HistogramObserver); "
                             f"granularity {self.granularity!r} takes observer 'mse' or 'minmax'")
        if self.eval_windows not in data_mod.EVAL_WINDOWS:
            raise ValueError(f"eval_windows={self.eval_windows!r}: choose one of {', '.join(data_mod.EVAL_WINDOWS)}")
        data_mod.check_corpus(self.corpus)
        if data_mod.is_file_corpus(self.corpus):  # notebooks run in notebooks/: a relative path would not hold
            self.corpus = str(Path(self.corpus).expanduser().resolve())
        for name, low, optional in (("n_calibration", 1, False), ("n_eval", 1, True), ("seq_len", 2, True),
                                    ("batch_size", 1, False), ("seed", 0, False), ("threads", 1, True)):
            value = getattr(self, name)
            if (value is None and not optional) or (value is not None and not is_int(value, low)):
                raise ValueError(f"{name}={value!r}: an integer >= {low}" + (" or None (the whole split / the "
                                 "model's maximum length / torch's default threads)" if optional else ""))
        if self.device is not None:
            models.check_device(self.device)
        METHODS[self.method].check_options(self)  # options are checked now, not after the model has loaded
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)} (or None: float32)")
        if self.dtype == "float32" or (self.dtype is not None and (METHODS[self.method].trains or self.start != "fp")):
            # (a start from FPFT's float32 weights: rounding them to the load dtype would move the start)
            self.dtype = None  # float32: one key for the default, whether or not it was spelled out
        if self.start not in STARTS:
            raise ValueError(f"start={self.start!r}: choose one of {', '.join(STARTS)}")
        if self.start != "fp" and not METHODS[self.method].quantizes:
            raise ValueError(f"start={self.start!r}: {self.method} is a reference; only a quantizing method starts "
                             f"from another model")
        if self.start != "fp" and self.tier is None:
            raise ValueError(f"start={self.start!r} needs a tier config (make_config): the FPFT run it starts "
                             f"from takes the tier's QAFT budget")
        if self.save_weights and not METHODS[self.method].keeps_weights:
            raise ValueError(f"save_weights: {self.method} runs have no quantized weights to keep "
                             f"(methods that do: {', '.join(n for n, m in METHODS.items() if m.keeps_weights)})")

    def key(self) -> str:
        """Hash of the config (placement excluded) and the method's version."""
        content = {k: v for k, v in dataclasses.asdict(self).items() if k not in HASH_EXCLUDE}
        content["corpus"] = data_mod.corpus_identity(self.corpus)  # a file corpus: by its bytes, not its path
        # per-tensor keys as before granularity existed (their records stay valid); a group size
        # matters only to groups
        if self.granularity == "tensor":
            del content["granularity"]
        if self.granularity != "group":
            del content["group_size"]
        if self.eval_windows == "consecutive":  # records from before the option keep their keys
            del content["eval_windows"]
        if not self.gptq_protocol_ppl:  # (likewise)
            del content["gptq_protocol_ppl"]
        if self.start == "fp":  # (likewise)
            del content["start"]
        else:  # which FPFT run it starts from (the tier's QAFT budget, which this config does not hold)
            content["start"] = self.start_config().key()
        if self.dtype is None:
            del content["dtype"]
        content["method_version"] = METHODS[self.method].version
        content.update(SHARED_VERSIONS)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def grid(self) -> Grid | None:
        """The run's integer grid (bits and scale layout); None for the FP reference."""
        return None if self.bits is None else Grid(self.bits, self.granularity, self.group_size)

    def start_config(self) -> "RunConfig":
        """The FPFT run whose weights a ``start="fpft"`` run starts from: the same tier, model and data,
        the tier's QAFT options, its weights kept."""
        data = {k: getattr(self, k) for k in ("model", "corpus", "seq_len", "n_calibration", "n_eval",
                                              "eval_windows", "batch_size", "seed", "device", "threads")}
        return make_config("fpft", None, self.tier, save_weights=True, **data)

    def label(self) -> str:
        name = self.method
        if self.bits is None:
            return name
        if self.method == "blockwise":
            from repro.methods.blockwise import variant

            name = variant(self.options)
        start = "from FPFT" if self.start == "fpft" else ""
        return " ".join(filter(None, (name, f"int{self.bits}", self.grid.label, start)))


# Tier keys a model may set for itself under ``model_settings`` (the data, the grid and method
# options, merged into the tier's per option; not the sweep or which model runs).
MODEL_SETTINGS = {"observer", "corpus", "seq_len", "n_calibration", "n_eval", "batch_size", "seed", "methods",
                  "cross_block"}


# What every tier sets (after its `base:` chain); the rest has defaults (``RunConfig``).
REQUIRED_SETTINGS = ("model", "corpus", "bits")


def tier_path(tier: str) -> Path:
    """The YAML of a tier: ``params/<tier>.yaml`` for a named tier, else ``tier`` itself when it is
    an existing ``.yaml``/``.yml`` file (a user's own tier)."""
    if tier in TIERS:
        return PARAMS_DIR / f"{tier}.yaml"
    path = Path(str(tier)).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)} or the path of a YAML file "
                     f"(`base: cpu` in it starts from that tier's settings)")


def tier_name(tier: str) -> str:
    """A tier's short name, for directories and file names: the named tier, or a YAML file's stem."""
    return tier if tier in TIERS else tier_path(tier).stem


def _merge(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, dict by dict (other values replaced)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_tier(tier: str, _seen: tuple = ()) -> dict:
    """The parameter set of a tier (``params/<tier>.yaml`` or a YAML file, ``tier_path``) as a dict (the
    caller's own copy). A file's ``base: NAME`` (a tier, or a YAML path relative to the file) starts from
    that tier's settings, merged dict by dict."""
    path = tier_path(tier).resolve()
    if path in _seen:
        raise ValueError(f"{path}: `base:` comes back to a file it started from ({' -> '.join(map(str, _seen))})")
    try:
        params = copy.deepcopy(_parse_tier(path, path.stat().st_mtime_ns))
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: a tier file is a YAML mapping of settings, not {type(params).__name__}")
    params = _numbers(params)  # 1e-4 (no dot) is a string to YAML 1.1; a number here, as on the command line
    base = params.pop("base", None)
    if base is not None:
        params = _merge(load_tier(_base_tier(path, base), (*_seen, path)), params)
    missing = [key for key in REQUIRED_SETTINGS if key not in params]
    if missing and not _seen:
        raise ValueError(f"{path}: a tier sets {', '.join(REQUIRED_SETTINGS)}; missing {', '.join(missing)}. "
                         f"Start from a shipped tier with `base: cpu` (or ci, paper) and set only what differs")
    return params


def _base_tier(path: Path, base) -> str:
    """A tier file's ``base:`` as ``load_tier`` takes it: a named tier, else a path (relative to the file)."""
    return base if base in TIERS or Path(str(base)).expanduser().is_absolute() else str(path.parent / str(base))


def parse_values(pairs, flag: str = "--option") -> dict:
    """``["window=2", "lr=1e-3"]`` -> ``{"window": 2, "lr": 0.001}`` (values read as YAML; the command-line
    flag ``flag`` is named in errors)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: write KEY=VALUE, e.g. {flag} "
                             f"{'window=2' if flag == '--option' else 'seq_len=128'}")
        raw, value = value, yaml.safe_load(value)
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw  # YAML 1.1 reads no/yes/on/off as booleans: mixed_precision=no means "no"
        options[key] = _numbers(value)
    return options


def _numbers(value):
    """YAML reads 1e-3 (no dot) as a string: such strings as floats, in lists and mappings too."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_settings(pairs) -> dict:
    """``["seq_len=128", "methods.qaft.epochs=2"]`` -> the nested dict they set (values read as YAML)."""
    settings = {}
    for dotted, value in parse_values(pairs, flag="--set").items():
        # a bit-width in the path is an int key, as in the YAML (observer.4=minmax sets int4's observer)
        *parents, key = (int(part) if part.isdigit() else part for part in dotted.split("."))
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return settings


def derive_tier(tier: str, settings: dict, directory) -> str:
    """A tier file ``directory/<name>-<hash>.yaml``: ``tier``'s settings with ``settings`` merged in,
    written once (content-addressed) and returned as a path for ``--tier``. Every setting then enters
    the runs' configs, and so their record keys, like the tier's own; notebooks get the same tier."""
    merged = _merge(load_tier(tier), settings)
    unknown = sorted(set(settings) - set(load_tier(tier)) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: not a setting of tier {tier_name(tier)} or a run field "
                         f"({', '.join(f.name for f in dataclasses.fields(RunConfig))})")
    text = yaml.safe_dump(merged, sort_keys=False)
    path = Path(directory).resolve() / f"{tier_name(tier)}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    if not path.exists():
        from repro.store import write_text_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, f"# tier {tier_name(tier)} with --set {json.dumps(settings)}\n{text}")
    return str(path)


@functools.lru_cache(maxsize=None)
def _parse_tier(path: Path, mtime_ns: int) -> dict:
    """A tier's YAML parsed once per version of the file: a batch plan builds hundreds of configs,
    and parsing the file for each took most of ``batch.plan``'s time."""
    return yaml.safe_load(path.read_text())


def make_config(method: str = "rtn", bits: int | None = 4, tier: str = "cpu", options: dict | None = None,
                **overrides) -> RunConfig:
    """A ``RunConfig`` from a tier's YAML, the method's options there, then ``overrides``
    (any ``RunConfig`` field; ``None`` values are ignored so CLI defaults fall through)."""
    if method in METHODS and not METHODS[method].quantizes and bits is not None:
        raise ValueError(f"method {method!r} quantizes nothing: pass bits=None, not {bits!r}")
    params = load_tier(tier)
    model = overrides.get("model") or params.get("model")
    own = (params.pop("model_settings", None) or {}).get(model, {})  # what this model sets differently
    misplaced = set(own) - MODEL_SETTINGS
    if misplaced:
        raise ValueError(f"{tier_path(tier)}: model_settings of {model!r} may set {', '.join(sorted(MODEL_SETTINGS))}, "
                         f"not {', '.join(sorted(misplaced))}")
    params.update({k: v for k, v in own.items() if k != "methods"})
    tier_method = (METHODS[method].options_of if method in METHODS else None) or method  # FPFT: QAFT's budget
    method_options = {**(params.pop("methods", {}).get(tier_method) or {}),
                      **(own.get("methods", {}).get(tier_method) or {})}
    method_options.update(options or {})
    params.pop("bits", None)
    if isinstance(params.get("observer"), dict):  # chosen per bit-width (fp: the highest width's)
        if method not in METHODS or METHODS[method].quantizes:
            check_bits(bits)
        by_bits = params["observer"]
        if bits is not None and bits not in by_bits:
            raise ValueError(f"tier {tier!r} chooses an observer per bit-width for {sorted(by_bits)} only, not "
                             f"int{bits}; pass observer=... (CLI: --observer) or add int{bits} to {tier_path(tier)}")
        params["observer"] = by_bits[bits if bits is not None else max(by_bits)]
    quantizes = method not in METHODS or METHODS[method].quantizes
    if (overrides.get("granularity") or "tensor") != "tensor" and not overrides.get("observer") and quantizes:
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


def bit_widths(bits, default=None) -> list[int]:
    """Bit-widths as a notebook parameter or a caller gives them, checked: None -> ``default``; an int; a
    list of ints; or text of either (``"4"``, ``"[4, 3]"``: papermill's ``-p`` passes what it cannot read as a
    number as a string). Anything else is refused with the value as given, not character by character."""
    given = bits
    if bits is None:
        bits = default
    if isinstance(bits, str):
        try:
            bits = yaml.safe_load(bits)
        except yaml.YAMLError:
            pass
    widths = [bits] if is_int(bits) else bits
    if not isinstance(widths, (list, tuple)) or not widths or not all(is_int(b) for b in widths):
        raise ValueError(f"bits={given!r}: give a width as an integer (papermill: -p bits 4) or a list of them "
                         "(-y 'bits: [4, 3]'), each in 2..8")
    return [check_bits(b) for b in widths]


def sweep_configs(methods=("fp", "rtn"), bits=None, tier: str = "cpu", **overrides) -> list[RunConfig]:
    """The configs of every (method, bits) pair (an FP reference once); ``bits=None`` takes the tier's list
    (``bit_widths``: an int or text is accepted)."""
    bits = bit_widths(bits, load_tier(tier)["bits"])
    return [make_config(method, b, tier, **overrides)
            for method in methods for b in (bits if METHODS[method].quantizes else [None])]


# Tier sections that are the paper's protocol (compared by ``deviations``); the rest (block-wise
# options, granularity and seed studies) are the package's own studies, not the paper's.
PROTOCOL_SECTIONS = ("models", "corpus", "observer", "dtype", "seq_len", "n_calibration", "n_eval", "eval_windows",
                     "gptq_protocol_ppl",
                     "batch_size", "threads", "bits", "methods.gptq", "methods.qaft", "cross_block", "landscape",
                     "datasets")


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and not all(isinstance(k, int) for k in value):  # (per-width maps stay values)
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def effective_settings(tier: str) -> dict:
    """A tier's settings flattened (``methods.qaft.epochs``), method options with the method's defaults
    filled in (what a run of that tier uses)."""
    settings = load_tier(tier)
    for method in settings.get("methods", {}):
        settings["methods"][method] = METHODS[method].check_options(make_config(method, max(settings["bits"]), tier))
    return _flatten(settings)


def deviations(tier: str, reference: str = "paper") -> dict[str, tuple]:
    """``{setting: (reference value, tier value)}`` for every setting of ``PROTOCOL_SECTIONS`` where
    ``tier`` differs from ``reference`` (the paper's protocol); a value one tier does not set is None.
    The reasons live in the tier's YAML (``paper_deviations``: setting -> why)."""
    ours, theirs = effective_settings(tier), effective_settings(reference)
    wanted = lambda key: any(key == s or key.startswith(s + ".") for s in PROTOCOL_SECTIONS)  # noqa: E731
    return {key: (theirs.get(key), ours.get(key)) for key in sorted({*ours, *theirs}, key=str)
            if wanted(key) and theirs.get(key) != ours.get(key)}


def deviation_reasons(tier: str) -> dict[str, str]:
    """The tier's ``paper_deviations``, checked against ``deviations``: every differing setting has a
    reason (its own or its section's) and every reason names a setting that differs."""
    reasons = load_tier(tier).get("paper_deviations") or {}
    found = deviations(tier)
    missing = [k for k in found if not any(k == r or k.startswith(r + ".") for r in reasons)]
    stale = [r for r in reasons if not any(k == r or k.startswith(r + ".") for k in found)]
    if missing or stale:
        raise ValueError(f"{tier_path(tier)} paper_deviations: " + "; ".join(
            filter(None, [missing and f"no reason for {', '.join(missing)}",
                          stale and f"{', '.join(stale)} no longer differ from the paper tier"])))
    return reasons
