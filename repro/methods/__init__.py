"""Quantization methods. Each is a plain function ``method(model, data, config) -> dict``.

It quantizes ``model`` (its stack linears) in place, using ``data`` (a ``repro.data.Data``)
and ``config`` (a ``repro.runs.RunConfig``; ``config.options`` holds method-specific
settings), and returns a JSON-able dict of what it wants recorded (e.g. chosen dampings).
Evaluation is separate (``repro.evaluate``), so methods compose with user code.
"""
from repro.methods.blockwise import blockwise
from repro.methods.qaft import qaft
from repro.methods.gptq import gptq
from repro.methods.rtn import fp, rtn

# name -> (function, version). Bump a version when a method's results change: the version
# is part of the record hash, so stale cached records are not reused.
METHODS = {
    "fp": (fp, 1),
    "rtn": (rtn, 1),
    "gptq": (gptq, 3),  # 2: damping scored on held-out calibration sequences; 3: each block gets its own
    #                     arguments (Gemma 3's global-attention blocks had block 0's sliding-window rotary)
    "blockwise": (blockwise, 1),  # block PTQ / MB-PTQ / LA-PTQ by options window, lookahead
    "qaft": (qaft, 1),
}
