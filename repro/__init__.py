"""repro: low-precision weight quantization of LLMs, local (GPTQ) vs global (QAFT) objectives.

Library entry points: ``repro.quantize`` (one call: model, text, method, bits), ``repro.models.load_model``, ``repro.data.make_data``, ``repro.quant``
(fake-quantizer), ``repro.methods`` (``method(model, data, config)``), ``repro.evaluate``
(NLL, layer-wise MSE), ``repro.runs`` (cached result records) and ``repro.export`` (a quantized
model written for other tools: dense, or packed integer codes in the compressed-tensors format) and
``repro.harness`` (lm-evaluation-harness tasks on a quantized model).
"""
import importlib

__version__ = "0.1.0"
DISTRIBUTION = "repro-lowbit-quant"  # the name on the package index (import name: repro)


def require(module: str, extra: str):
    """``module`` imported, or an ImportError naming the extra that installs it (``pip install
    'repro-lowbit-quant[extra]'``) instead of a bare ModuleNotFoundError."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ImportError(f"{module} is not installed; it comes with pip install '{DISTRIBUTION}[{extra}]'") from err


def quantize(model, tokenizer=None, method: str = "gptq", bits: int = 4, **kwargs) -> dict:
    """Quantize ``model``'s transformer stack in place in one call; see ``repro.api.quantize``."""
    from repro.api import quantize as quantize_model  # torch and transformers load on first use, not on import

    return quantize_model(model, tokenizer, method, bits, **kwargs)
