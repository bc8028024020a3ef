"""Evaluation throughput: repro's NLL passes against a plain Hugging Face forward over the same batches.

    .venv/bin/python benchmarks/eval_bench.py                       # SmolLM2, cpu-tier batches
    .venv/bin/python benchmarks/eval_bench.py --model gemma3-270m   # 262k vocabulary
    .venv/bin/python benchmarks/eval_bench.py --device cuda --seq-len 2048 --batches 16

Three passes over the same ``--batches`` mini-batches of ``--batch-size`` x ``--seq-len`` tokens
of the embedded corpus, timed in alternating rounds (median):

* reference: ``model(input_ids).logits`` then ``F.cross_entropy`` on the full ``[b, seq, vocab]``
  logits: what a plain Hugging Face evaluation loop does;
* ``evaluate.nll``: repro's NLL (the decoder once, the LM head and log-softmax in chunks of
  ``LOGIT_CHUNK_BYTES``, so memory does not grow with the vocabulary);
* the record's test pass: ``evaluate.nll`` with the own-input layer MSE hooks of every stack
  linear recording at the same time (one forward gives NLL and layer MSE).

Prints tokens/s and the ratios (target: ``evaluate.nll`` >= 0.95x the reference), and the peak
logits memory of each (the reference's full logits against the chunk bound).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from repro import data as data_mod
from repro import evaluate, models
from repro.quant import bake, prepare


def reference_nll(model, sequences: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in sequences.split(batch_size):
            batch = batch.to(evaluate.model_device(model))
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"))
            count += target.numel()
    return total / count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = models.load_model(args.model, device=args.device)
    model.eval()
    data = data_mod.make_data(tokenizer, seq_len=args.seq_len, n_calibration=1, n_eval=args.batches * args.batch_size,
                              seed=0, model_max=models.max_length(model))
    sequences = data.test
    fp = models.fp_snapshot(model)
    linears = models.stack_linears(model)
    prepare(linears, 4, "minmax")
    bake(linears)  # a quantized model, as every record's test pass measures

    def record_pass():
        with evaluate.recording_layer_mse(model, fp):
            return evaluate.nll(model, sequences, args.batch_size, desc=None)

    passes = {"reference (HF forward + full logits)": lambda: reference_nll(model, sequences, args.batch_size),
              "evaluate.nll (chunked LM head)": lambda: evaluate.nll(model, sequences, args.batch_size, desc=None),
              "record test pass (NLL + layer MSE hooks)": record_pass}
    times = {name: [] for name in passes}
    values = {}
    for name, fn in passes.items():  # warm-up
        values[name] = fn()
    for _ in range(args.rounds):
        for name, fn in passes.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    tokens = sequences.numel()
    ref = statistics.median(times[next(iter(passes))])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads, {platform.machine()}, load {load:.1f}), "
          f"{args.batches} batches of {args.batch_size} x {args.seq_len} tokens, median of {args.rounds}\n")
    print("| pass | s | tokens/s | reference / this | NLL |")
    print("|---|---|---|---|---|")
    result = {}
    for name in passes:
        t = statistics.median(times[name])
        result[name] = {"s": t, "tokens_per_s": tokens / t, "ratio": ref / t, "nll": values[name]}
        print(f"| {name} | {t:.2f} | {tokens / t:.0f} | {ref / t:.2f}x | {values[name]:.4f} |")
    vocab = model.get_output_embeddings().weight.shape[0]
    full = args.batch_size * args.seq_len * vocab * 4
    print(f"\nlogits memory per batch: reference {full / 1e6:.0f} MB (float32 [b, seq, vocab], vocab {vocab}); "
          f"evaluate.nll at most {evaluate.LOGIT_CHUNK_BYTES / 1e6:.0f} MB per chunk")
    return result


if __name__ == "__main__":
    main()
