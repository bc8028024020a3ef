"""Quantization methods. Each is a plain function ``method(model, data, config) -> dict``.

It quantizes ``model`` (its stack linears) in place, using ``data`` (a ``repro.data.Data``)
and ``config`` (a ``repro.runs.RunConfig``; ``config.options`` holds method-specific
settings), and returns a JSON-able dict of what it wants recorded (e.g. chosen dampings).
Evaluation is separate (``repro.evaluate``), so methods compose with user code.
"""
from repro.methods.qaft import qaft
from repro.methods.gptq import gptq
from repro.methods.rtn import fp, rtn

# name -> (function, version). Bump a version when a method's results change: the version
# is part of the record hash, so stale cached records are not reused.
METHODS = {
    "fp": (fp, 1),
    "rtn": (rtn, 1),
    "gptq": (gptq, 2),  # 2: damping scored on held-out calibration sequences
    "qaft": (qaft, 1),
}
