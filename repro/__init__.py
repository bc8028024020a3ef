"""repro: low-precision weight quantization of LLMs, local (GPTQ) vs global (QAFT) objectives.

Library entry points: ``repro.models.load_model``, ``repro.data.make_data``, ``repro.quant``
(fake-quantizer), ``repro.methods`` (``method(model, data, config)``), ``repro.evaluate``
(NLL, layer-wise MSE) and ``repro.runs`` (cached result records).
"""
__version__ = "0.1.0"
