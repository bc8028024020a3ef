"""GPTQ timings: repro's layer solve against the reference it copies, the damping search
against one damping value, and whole-model GPTQ.

    .venv/bin/python benchmarks/gptq_bench.py --threads 1 --skip-model   # layer solves
    .venv/bin/python benchmarks/gptq_bench.py --tier cpu --threads 1
    .venv/bin/python benchmarks/gptq_bench.py --device cuda --tier paper  # on a GPU

Part 1 solves one layer of the embedded model's MLP shapes ([out, in] = 1536x576 for
gate/up_proj, 576x1536 for down_proj) on synthetic correlated inputs: ``gptq_quantize``
(block 128, damping 0.01, factor included) against ``fasterquant`` in
``benchmarks/gptq_reference.py`` (a port of IST-DASLab's solve onto the same grid), and the
8-point damping search (with held-out scoring, as the model driver runs it) against one
damping value. Targets: >= 1.5x the reference on both shapes; search <= 3x one damping.
Part 2 runs whole-model GPTQ on the embedded model (calibration data of ``--tier``) with the
8-point search and with a single damping value. Times are medians over ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from gptq_reference import fasterquant
from repro.methods.gptq import DAMPING_GRID, accumulate_hessian, damping_search, gptq, gptq_quantize
from repro.quant import compute_scale


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def layer_part(args):
    print(f"\n## one layer solve ({args.bits} bits, damping {args.damping:g}, median of {args.repeat})\n")
    print("| W [out x in] | reference s | repro s | reference / repro | Q entries differing "
          "| 8-point search s | search / 1 damping |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for out, inp in args.shapes:
        mix = torch.randn(inp, inp, generator=g) / inp ** 0.5
        X = (torch.randn(args.tokens, inp, generator=g) @ mix).to(args.device)
        H, _ = accumulate_hessian(None, 0, X[: args.tokens * 3 // 4])
        H_held, _ = accumulate_hessian(None, 0, X[args.tokens * 3 // 4:])
        W = (torch.randn(out, inp, generator=g) * 0.05).to(args.device)
        scale = compute_scale(W, args.bits, "minmax")
        ours_s, Q = median_time(lambda: gptq_quantize(W, H, scale, args.bits, args.damping), args.repeat)
        ref_s, Q_ref = median_time(lambda: fasterquant(W, H, scale, args.bits, args.damping), args.repeat)
        search_s, _ = median_time(lambda: damping_search(W, H, scale, args.bits, DAMPING_GRID, H_held=H_held),
                                  args.repeat)
        differ = float((Q != Q_ref).float().mean())  # float32 rounding ties flipped by summation order
        print(f"| {out}x{inp} | {ref_s:.3f} | {ours_s:.3f} | {ref_s / ours_s:.2f}x | {differ:.1e} "
              f"| {search_s:.3f} | {search_s / ours_s:.1f}x |", flush=True)


def model_part(args):
    from repro import models
    from repro.config import make_config
    from repro.runs import workbench

    print(f"\n## whole-model GPTQ, embedded model, tier {args.tier} ({args.bits} bits)\n")
    rows = []
    for label, grid in (("1 damping", [args.damping]), ("8-point search", list(DAMPING_GRID))):
        config = make_config("gptq", args.bits, tier=args.tier, options={"damping_grid": grid},
                             device=args.device)
        bench = workbench(config)  # resets the model to FP
        sync()
        start = time.perf_counter()
        info = gptq(bench.model, bench.data, config)
        sync()
        total = time.perf_counter() - start
        models.restore(bench.model, bench.fp_weights)
        rows.append((label, total, info["wall_s"]))
        if label == "1 damping":
            print(f"calibration: {tuple(bench.data.calibration.shape)} tokens, "
                  f"{len(models.blocks(bench.model))} blocks\n")
    print("| run | total s | capture s | Hessian pass s | solves s | propagate s |")
    print("|---|---|---|---|---|---|")
    for label, total, w in rows:
        print(f"| {label} | {total:.1f} | {w['capture']:.1f} | {w['hessian']:.1f} | {w['solve']:.1f} "
              f"| {w['propagate']:.1f} |")
    ratio = rows[1][1] / rows[0][1]
    print(f"\n8-point search / 1 damping, whole model: {ratio:.2f}x (target <= 2x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", default="ci", help="calibration data / model of the whole-model part (ci, cpu, paper)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--damping", type=float, default=0.01, help="the single damping value")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tokens", type=int, default=4096, help="synthetic calibration tokens (part 1)")
    p.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                   default=[(1536, 576), (576, 1536)], help="layer shapes OUTxIN (part 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load:.1f}")
    if not args.skip_layer:
        layer_part(args)
    if not args.skip_model:
        model_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
