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


def _read_records(configs, outputs) -> list[dict]:
    from repro import runs

    return [r for r in (runs.read_record(c, outputs) for c in configs) if r is not None]


def _tier_records(args) -> list[dict]:
    """The records the notebooks show: the tier's sweep (fp, rtn, gptq, qaft at the tier's bits),
    not every record on disk (the quickstart's observer comparison, for one, leaves RTN records of
    other observers there). Exits with the command to run when there are none."""
    from repro import runs

    configs = runs.sweep_configs(("fp", "rtn", "gptq", "qaft"), tier=args.tier, model=args.model)
    records = _read_records(configs, args.outputs)
    if not records:
        raise SystemExit(f"no records for tier {args.tier} under {args.outputs}/records; "
                         f"run `repro run --tier {args.tier} ...` or `repro notebooks --tier {args.tier}` first")
    return records


def _figures(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from repro import plots

    records = _tier_records(args)
    for path in plots.save_figures(records, Path(args.outputs) / "figures", suffix=f"_{args.tier}"):
        print(path)
    return 0


def _report(args) -> int:
    from repro import report, runs
    from repro.quant import OBSERVERS

    records = _tier_records(args)
    observer_records = _read_records([runs.make_config("rtn", b, args.tier, model=args.model, observer=obs)
                                      for obs in OBSERVERS for b in runs.load_tier(args.tier)["bits"]],
                                     args.outputs)
    in_sample = _read_records([runs.make_config("gptq", b, args.tier, model=args.model, options={"holdout": 0})
                               for b in runs.load_tier(args.tier)["bits"]], args.outputs)  # the A/B, if run
    command = f"repro report --tier {args.tier}" + (f" --model {args.model}" if args.model else "")
    sections = report.readme_sections(records, observer_records, tier=args.tier, command=command,
                                      in_sample_records=in_sample)
    for name, body in sections.items():
        print(f"<!-- report:{name} -->\n{body}\n<!-- /report:{name} -->\n")
    if args.readme:
        path = Path(args.readme)
        if not path.is_file():
            raise SystemExit(f"{path} not found")
        runs.write_text_atomic(path, report.update_markdown(path.read_text(), sections))
        print(f"updated {', '.join(sections)} in {path}", file=sys.stderr)
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

    p = sub.add_parser("report", help="print the README's result tables from the cached records as markdown",
                       description="Tables of the tier's records (and RTN at every observer), each with a "
                                   "provenance line; --readme rewrites the sections between "
                                   "<!-- report:NAME --> and <!-- /report:NAME --> markers of that file.")
    p.add_argument("--tier", choices=TIERS, default="cpu")
    p.add_argument("--model", help="embedded name or hub id; default: the tier's")
    p.add_argument("--outputs", default="outputs")
    p.add_argument("--readme", help="markdown file whose marker sections to rewrite (e.g. README.md)")
    p.set_defaults(func=_report)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:  # our own clear messages, without a traceback
        print(f"repro: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
