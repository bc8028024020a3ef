"""Block-wise PTQ memory: the predicted training peak per window against a measured one.

    .venv/bin/python benchmarks/blockwise_memory.py                         # SmolLM2, cpu-tier data
    .venv/bin/python benchmarks/blockwise_memory.py --model gemma3-270m --windows 1 2 4 --lookaheads 0 1 2

For each (m, l) it runs ``repro.methods.blockwise`` on the first window only (a model cut to
m + l blocks, so the run is one window) and measures the peak memory of the training above the
memory before it: on a GPU ``torch.cuda.max_memory_allocated``, on CPU the process's resident set
sampled every 2 ms by a thread (``/proc/self/statm``). The prediction is the record's own
components (``repro.studies.cross_block.memory_table``): 2 x the window's fp32 weights (latent + gradient) +
Adam's two moments + the tensors autograd saved for one mini-batch. CPU RSS also holds allocator
caches and the chain's activations on CPU, so it is an upper reading; the GPU number is exact.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import threading
import time
from contextlib import suppress

import torch

from repro import data as data_mod
from repro import models
from repro.methods.blockwise import blockwise
from repro.config import make_config


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    function = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    function.restype = _MallInfo2
    return function


def _malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out and not got back (all arenas, mmapped chunks included):
    what the process has allocated, without the free memory malloc keeps cached."""
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd


class PeakRSS:
    """Peak resident set above the level at entry, sampled by a thread. On entry glibc hands its
    free cached memory back to the OS (``malloc_trim``), so that memory freed earlier and reused
    inside the block counts as the block's."""

    read = staticmethod(_rss)

    def __enter__(self):
        with suppress(OSError, AttributeError):  # not glibc: the reading is a lower bound
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self.read()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.read())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra = self.peak - self.base


class PeakMalloc(PeakRSS):
    """Peak of the bytes allocated through malloc (torch's CPU tensors included) above the level at
    entry, sampled by a thread: the CPU counterpart of ``torch.cuda.max_memory_allocated``, blind to
    allocator caches (glibc only)."""

    read = staticmethod(_malloc_in_use)


def memory_parser(description: str) -> argparse.ArgumentParser:
    """The options the memory benchmarks share: model, tier, bits, device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tier", default="cpu")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def measure_peak(run, device: str, meter=PeakRSS):
    """``(run(), peak bytes above the start)``: ``torch.cuda.max_memory_allocated`` on a GPU,
    else ``meter`` sampled on CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        return result, torch.cuda.max_memory_allocated() - before
    with meter() as peak:
        result = run()
    return result, peak.extra


def main() -> None:
    parser = memory_parser(__doc__)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lookaheads", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    model, tokenizer = models.load_model(args.model, device=args.device)
    snapshot = models.fp_snapshot(model)
    stack = models.blocks(model)
    full = list(stack)
    base = make_config("blockwise", args.bits, args.tier, model=args.model)
    data = data_mod.make_data(tokenizer, base.corpus, base.seq_len, base.n_calibration, 1, base.seed,
                              model_max=models.max_length(model))
    print(f"{args.model} int{args.bits}, {len(data.calibration)} x {base.seq_len} calibration tokens, "
          f"batch {base.batch_size}, {args.steps} steps, {args.device}, torch {torch.__version__}")
    print(f"{'m':>2} {'l':>2} {'window params':>14} {'predicted MB':>13} {'measured MB':>12} {'ratio':>6}")
    for m in args.windows:
        for l in args.lookaheads:
            models.restore(model, snapshot)
            del stack[m + l:]  # one window and its look-ahead: the run is that window
            config = make_config("blockwise", args.bits, args.tier, model=args.model,
                                 options={"window": m, "lookahead": l, "steps": args.steps, "eval_every": args.steps})
            info, measured = measure_peak(lambda: blockwise(model, data, config), args.device)
            window = info["windows"][0]
            mem = window["memory_bytes"]
            predicted = 2 * mem["window_weights"] + mem["optimizer_state"] + mem["saved_activations"]
            print(f"{m:>2} {l:>2} {window['trainable_params']:>14} {predicted / 1e6:>13.1f} {measured / 1e6:>12.1f} "
                  f"{measured / predicted:>6.2f}", flush=True)
            stack.extend(full[m + l:])


if __name__ == "__main__":
    main()
