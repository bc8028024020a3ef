"""repro: low-precision weight quantization of LLMs, local (GPTQ) vs global (QAFT) objectives.

Library entry points: ``repro.quantize`` (one call: model, text, method, bits), ``repro.models.load_model``, ``repro.data.make_data``, ``repro.quant``
(fake-quantizer), ``repro.methods`` (``method(model, data, config)``), ``repro.evaluate``
(NLL, layer-wise MSE), ``repro.runs`` (cached result records) and ``repro.export`` (a quantized
model written for other tools: dense, or packed integer codes in the compressed-tensors format).
"""
__version__ = "0.1.0"


def quantize(model, tokenizer=None, method: str = "gptq", bits: int = 4, **kwargs) -> dict:
    """Quantize ``model``'s transformer stack in place in one call; see ``repro.api.quantize``."""
    from repro.api import quantize as quantize_model  # torch and transformers load on first use, not on import

    return quantize_model(model, tokenizer, method, bits, **kwargs)
