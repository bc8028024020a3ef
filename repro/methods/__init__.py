"""Quantization methods: one ``Method`` entry per method in ``METHODS``, the only place to register one.

A method is a plain function ``method(model, data, config) -> dict`` and must keep this contract
(``tests/test_methods.py`` checks every registered method against it on tiny models):

* **It changes only the stack's linear weights** (``repro.models.stack_linears``: their
  ``weight``, in place, same shape and dtype). Embeddings, norms, biases, the LM head and every
  buffer stay as they were; so does any module it wraps or parametrizes while it works (removed
  before it returns). One model object is reused across the runs of a process and reset by
  ``repro.models.restore``, which copies only those weights back: a method that folded scales
  into a norm would leak them into every later run.
* ``data`` is a ``repro.data.Data`` (calibration, validation, test windows ``[n, seq_len]``),
  ``config`` a ``repro.config.RunConfig`` whose ``options`` the entry's ``check_options`` has
  already checked (the config is refused when it is made, before any model loads).
* It returns a JSON-able dict of what it wants recorded (chosen dampings, training history ...).
  Evaluation is separate (``repro.evaluate``), so methods compose with user code.
* With ``keeps_weights``, its quantized weights sit on the ``repro.quant`` grid when it returns,
  with the scales ``repro.quant.prepare`` gave each linear (``[out, 1]`` per channel, ``[out, ceil(in /
  group_size)]`` per group, a scalar per tensor), which ``repro.store.save_weights`` stores as
  integer codes.

To add a method: write its module here and add one ``Method`` to ``METHODS`` (``docs/ARCHITECTURE.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from repro.methods.blockwise import blockwise, blockwise_options, describe as describe_blockwise
from repro.methods.gptq import gptq, gptq_options
from repro.methods.qaft import discard_state, fpft, qaft, qaft_options
from repro.methods.rtn import fp, rtn


def _no_options(config) -> dict:
    if config.options:
        raise ValueError(f"method {config.method!r} takes no options, got {', '.join(sorted(config.options))}")
    return {}


@dataclass(frozen=True)
class Description:
    """How tables and figures name a run of a method with given options."""

    label: str  # "GPTQ", "LA-PTQ l=1" ...
    sees: str  # what its objective sees, in words (the locality spectrum's axis)
    spectrum: tuple  # sort key along the locality spectrum, most local objective first


@dataclass(frozen=True)
class Method:
    """Everything the library knows about one method."""

    run: Callable[..., dict]  # (model, data, config) -> info
    # Part of the record hash: bump it when the method's results change, so stale records are not reused.
    version: int
    label: str
    color: str  # matplotlib colour of its points and bars
    sees: str = "—"
    spectrum: int = -1  # rank on the locality spectrum (FP -1, RTN 0 ... QAFT 4)
    check_options: Callable[..., dict] = _no_options  # config -> options, or ValueError naming the problem
    after_record: Callable[..., None] | None = None  # clean-up once the record is safely written
    keeps_weights: bool = True  # its quantized weights can be kept (``save_weights``)
    describe_options: Callable[[dict], Description] | None = None  # where options make another method
    quantizes: bool = True  # False: an FP reference (no bits, no grid; FP and fine-tuned FP)
    # A fine-tuning method: the method whose record is its epoch 0 (its NLLs are not measured again), and
    # its info["nll_validation"] is the returned weights' (measured when it chose them)
    starts_from: str | None = None
    options_of: str | None = None  # takes this method's options from a tier (a control at the same budget)
    trains: bool = False  # trains latent weights (kept float32 whatever ``RunConfig.dtype``)

    def describe(self, options: dict | None = None) -> Description:
        if self.describe_options is not None:
            return self.describe_options(options or {})
        return Description(self.label, self.sees, (self.spectrum, 0, 0, 0, 0))


METHODS: dict[str, Method] = {
    "fp": Method(fp, 1, "FP", "black", keeps_weights=False, quantizes=False),
    # QAFT's loop with the quantizer off: the fine-tuned FP control, at QAFT's data, steps and lr0 grid
    # (its kept weights are float: a start for the other methods, ``RunConfig.start``)
    "fpft": Method(fpft, 1, "FPFT", "tab:gray", check_options=qaft_options, after_record=discard_state,
                   quantizes=False, starts_from="fp", options_of="qaft", trains=True),
    "rtn": Method(rtn, 1, "RTN", "tab:blue", "one weight tensor", 0),
    # gptq 2: damping scored on held-out calibration sequences; 3: each block gets its own arguments (Gemma 3's
    # global-attention blocks had block 0's sliding-window rotary); 4: the sweep with the Hessian's Cholesky
    # factor (other float rounding, see README)
    "gptq": Method(gptq, 4, "GPTQ", "tab:orange", "one linear layer", 1, gptq_options),
    # block PTQ / MB-PTQ / LA-PTQ by options window, lookahead (ranks 2 and 3)
    "blockwise": Method(blockwise, 1, "block-wise", "tab:red", check_options=blockwise_options,
                        describe_options=lambda options: Description(*describe_blockwise(options)), trains=True),
    "qaft": Method(qaft, 1, "QAFT", "tab:green", "whole network (NLL)", 4, qaft_options, discard_state,
                   starts_from="rtn", trains=True),
}

QUANTIZERS = ("rtn", "gptq", "qaft")  # the headline sweep's quantized methods, most local objective first
REFERENCES = ("fp", "fpft")  # its unquantized references: the model as loaded, and fine-tuned like QAFT
MAIN = (*REFERENCES, *QUANTIZERS)  # the headline sweep (notebooks 00-03, 05, the Pareto front)


def describe(config: dict) -> Description:
    """The label, what the objective sees and the spectrum key of a record's ``config`` dict."""
    return METHODS[config["method"]].describe(config.get("options"))
