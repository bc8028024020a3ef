"""Quantization methods. Each is a plain function ``method(model, data, config) -> dict``.

It quantizes ``model`` (its stack linears) in place, using ``data`` (a ``repro.data.Data``)
and ``config`` (a ``repro.runs.RunConfig``; ``config.options`` holds method-specific
settings), and returns a JSON-able dict of what it wants recorded (e.g. chosen dampings).
Evaluation is separate (``repro.evaluate``), so methods compose with user code.
"""
from repro.methods.blockwise import blockwise, blockwise_options
from repro.methods.qaft import discard_state, qaft, qaft_options
from repro.methods.gptq import gptq, gptq_options
from repro.methods.rtn import fp, rtn

# name -> (function, version). Bump a version when a method's results change: the version
# is part of the record hash, so stale cached records are not reused.
METHODS = {
    "fp": (fp, 1),
    "rtn": (rtn, 1),
    "gptq": (gptq, 4),  # 2: damping scored on held-out calibration sequences; 3: each block gets its own
    #                     arguments (Gemma 3's global-attention blocks had block 0's sliding-window rotary);
    #                     4: the sweep with the Hessian's Cholesky factor (other float rounding, see README)
    "blockwise": (blockwise, 1),  # block PTQ / MB-PTQ / LA-PTQ by options window, lookahead
    "qaft": (qaft, 1),
}


def _no_options(config) -> dict:
    if config.options:
        raise ValueError(f"method {config.method!r} takes no options, got {', '.join(sorted(config.options))}")
    return {}


# name -> the function that checks a config's options (raises ValueError naming the problem), so a
# mistyped option fails when the config is made, before any model is loaded
OPTION_CHECKS = {"fp": _no_options, "rtn": _no_options, "gptq": gptq_options, "qaft": qaft_options,
                 "blockwise": blockwise_options}

# name -> what to clean up once a run's record is safely written (not before: see repro.methods.qaft)
AFTER_RECORD = {"qaft": discard_state}
