"""``repro`` console command: run methods into cached records, execute the notebooks."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NOTEBOOKS = ("00_quickstart", "01_misalignment", "06_hyperparameters")


def _run(args) -> int:
    from repro import runs

    for bits in ([None] if args.method == "fp" else args.bits):
        config = runs.make_config(args.method, bits, args.tier, model=args.model, corpus=args.corpus,
                                  observer=args.observer, seed=args.seed, device=args.device)
        record = runs.run(config, args.outputs, force=args.force)
        print(runs.summary(record), flush=True)
    return 0


def _notebooks(args) -> int:
    import papermill as pm

    root = Path(args.notebook_dir)
    out = Path(args.outputs) / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names or NOTEBOOKS:
        src = root / f"{name}.ipynb"
        if not src.exists():
            raise SystemExit(f"notebook {src} not found; available: {', '.join(NOTEBOOKS)}")
        print(f"executing {src} (tier={args.tier}) -> {out / src.name}", flush=True)
        pm.execute_notebook(str(src), str(out / src.name), parameters={"tier": args.tier,
                            "outputs": str(Path(args.outputs).resolve())}, cwd=str(root), progress_bar=True)
    return 0


def _figures(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from repro import plots, runs

    # the records the notebooks show: the tier's configs, not every record on disk (the
    # quickstart's observer comparison, for one, leaves RTN records of other observers there)
    configs = runs.sweep_configs(("fp", "rtn", "gptq", "qaft"), tier=args.tier, model=args.model)
    records = [r for r in (runs.read_record(c, args.outputs) for c in configs) if r is not None]
    if not records:
        raise SystemExit(f"no records for tier {args.tier} under {args.outputs}/records; "
                         f"run `repro run --tier {args.tier} ...` or `repro notebooks --tier {args.tier}` first")
    for path in plots.save_figures(records, Path(args.outputs) / "figures", suffix=f"_{args.tier}"):
        print(path)
    return 0


def main(argv=None) -> int:
    from repro.data import CORPORA
    from repro.methods import METHODS
    from repro.quant import OBSERVERS
    from repro.runs import TIERS

    parser = argparse.ArgumentParser(prog="repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a method at one or more bit-widths, print one line each",
                       description="Run a quantization method and write a cached JSON record under "
                                   "OUTPUTS/records (a rerun with the same config reads it).")
    p.add_argument("--method", choices=sorted(METHODS), default="rtn")
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="bit-widths in 2..8 (default 4)")
    p.add_argument("--tier", choices=TIERS, default="cpu", help="parameter set from params/ (default cpu)")
    p.add_argument("--model", help="embedded name (smollm2-135m) or hub id; default: the tier's")
    p.add_argument("--corpus", choices=CORPORA, help="default: the tier's")
    p.add_argument("--observer", choices=OBSERVERS, help="scale observer; default: the tier's")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--outputs", default="outputs", help="results directory (default ./outputs)")
    p.add_argument("--force", action="store_true", help="recompute even if a record exists")
    p.set_defaults(func=_run)

    p = sub.add_parser("notebooks", help="execute notebooks with papermill into OUTPUTS/notebooks")
    p.add_argument("names", nargs="*", help=f"notebooks to run (default all: {', '.join(NOTEBOOKS)})")
    p.add_argument("--tier", choices=TIERS, default="cpu")
    p.add_argument("--notebook-dir", default="notebooks")
    p.add_argument("--outputs", default="outputs")
    p.set_defaults(func=_notebooks)

    p = sub.add_parser("figures", help="save the figures of the cached records as PNG under OUTPUTS/figures")
    p.add_argument("--tier", choices=TIERS, default="cpu")
    p.add_argument("--model", help="embedded name or hub id; default: the tier's")
    p.add_argument("--outputs", default="outputs")
    p.set_defaults(func=_figures)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:  # our own clear messages, without a traceback
        print(f"repro: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
