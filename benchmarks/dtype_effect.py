"""What loading the weights in bf16 (``RunConfig.dtype``, the paper tier's ``dtype: auto`` at 7B) changes,
measured on an embedded model: FP, RTN and GPTQ at one width, loaded in float32 and in bfloat16, everything
else the tier's.

    .venv/bin/python benchmarks/dtype_effect.py                         # SmolLM2, cpu tier, int4
    .venv/bin/python benchmarks/dtype_effect.py --model gemma3-270m --bits 8 4 --outputs outputs

Per run: test and validation NLL (nats/token) in each dtype and the difference, the mean layer MSE with FP
inputs (each dtype against its own FP weights), and for GPTQ the share of integer codes that differ
between the two (from the weights both runs keep). Records are cached in ``--outputs`` like any run (the
float32 ones are the main job's when it points at the main job's outputs).
"""
from __future__ import annotations

import argparse
import dataclasses

from safetensors.torch import load_file

from repro import runs, store
from repro.config import make_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tier", default="cpu")
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--outputs", default=None, help="results directory (default: the repository's outputs/)")
    args = parser.parse_args()
    outputs = args.outputs or store.outputs_dir()
    print(f"{args.model}, {args.tier} tier: float32 vs bfloat16 weights\n")
    print("| run | test NLL fp32 | bf16 | Δ | validation NLL fp32 | bf16 | Δ | layer MSE (FP inputs) fp32 | bf16 "
          "| codes that differ |")
    print("| --- " * 10 + "|")
    for method, bits in [("fp", None), *((m, b) for b in args.bits for m in ("rtn", "gptq"))]:
        base = make_config(method, bits, args.tier, model=args.model, save_weights=method == "gptq")
        pair = [runs.run(dataclasses.replace(base, dtype=d), outputs, need_weights=method == "gptq")
                for d in (None, "bfloat16")]
        codes = "—"
        if method == "gptq":
            kept = [load_file(str(store.weights_path(dataclasses.replace(base, dtype=d), outputs)))
                    for d in (None, "bfloat16")]
            names = [n for n in kept[0] if not n.endswith(".scale")]
            differ = sum(int((kept[0][n] != kept[1][n]).sum()) for n in names)
            total = sum(kept[0][n].numel() for n in names)
            codes = f"{differ / total:.2%}"
        mse = [r.get("mean_layer_mse_fp_inputs") for r in pair]
        cells = [f"{pair[0][k]:.4f} | {pair[1][k]:.4f} | {pair[1][k] - pair[0][k]:+.4f}"
                 for k in ("nll_test", "nll_validation")]
        mse_cells = " | ".join("—" if m is None else f"{m:.4g}" for m in mse)
        print(f"| {base.label()} | {cells[0]} | {cells[1]} | {mse_cells} | {codes} |", flush=True)


if __name__ == "__main__":
    main()
