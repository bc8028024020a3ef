"""``repro`` console command: run methods into cached records, execute the notebooks."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OUTPUTS_HELP = "results directory (default: $REPRO_OUTPUTS, else the checkout's outputs/)"


def _options(pairs) -> dict:
    """``["window=2", "lr=1e-3"]`` -> ``{"window": 2, "lr": 0.001}`` (values read as YAML)."""
    import yaml

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: write KEY=VALUE, e.g. --option window=2")
        raw, value = value, yaml.safe_load(value)
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw  # YAML 1.1 reads no/yes/on/off as booleans: mixed_precision=no means "no"
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        options[key] = value
    return options


def _run(args) -> int:
    from repro import runs

    if args.group_size is not None and args.granularity != "group":
        raise ValueError("--group-size applies to --granularity group only")
    if args.method == "fp" and (args.bits is not None or args.granularity not in (None, "tensor")):
        raise ValueError("--method fp quantizes nothing: leave out --bits and --granularity")

    for bits in ([None] if args.method == "fp" else args.bits or [4]):
        config = runs.make_config(args.method, bits, args.tier, options=_options(args.option), model=args.model,
                                  corpus=args.corpus, observer=args.observer, seed=args.seed, device=args.device,
                                  granularity=args.granularity, group_size=args.group_size)
        record = runs.run(config, args.outputs, force=args.force)
        print(runs.summary(record), flush=True)
    return 0


def _batch(args) -> int:
    from repro import batch

    shard = batch.parse_shard(args.shard) if args.shard else None
    swallowed = [m for m in args.models or [] if m in batch.NOTEBOOKS]
    if swallowed:  # `--models a b` takes every name after it
        raise ValueError(f"--models took the notebook name(s) {', '.join(swallowed)}: put notebook names before "
                         f"--models, e.g. repro batch {' '.join(swallowed)} --models {args.models[0]}")
    jobs = batch.batch(args.tier, args.notebooks or None, args.models, args.outputs, shard=shard, bits=args.bits)
    return 0 if all(job.status == "passed" for job in jobs) else 1


def _read_records(configs, outputs) -> list[dict]:
    from repro import runs

    return [r for r in (runs.read_record(c, outputs) for c in configs) if r is not None]


def _tier_records(args, model=None, required: bool = True) -> list[dict]:
    """The records the notebooks show: the tier's sweep (fp, rtn, gptq, qaft at the tier's bits),
    not every record on disk (the quickstart's observer comparison, for one, leaves RTN records of
    other observers there). Exits with the command to run when there are none and ``required``."""
    from repro import runs
    from repro.methods import MAIN

    model = model or args.model
    configs = runs.sweep_configs(MAIN, tier=args.tier, model=model)
    records = _read_records(configs, args.outputs)
    if not records and required:
        raise SystemExit(f"no records for tier {args.tier}{f' and model {model}' if model else ''} under "
                         f"{args.outputs}/records; run `repro batch --tier {args.tier}` first")
    return records


def _cross_block_records(args, model) -> list[dict]:
    """The records notebook 04 reads for ``model`` (the tier's ``cross_block`` runs), plus the
    controls run by hand (``report.CROSS_BLOCK_CONTROLS``), where present."""
    from repro import report, runs

    configs = runs.cross_block_configs(args.tier, model)
    bits = sorted({c.bits for c in configs if c.method == "blockwise"})
    configs += [runs.make_config("blockwise", b, args.tier, model=model, options=dict(o))
                for b in bits for o in report.CROSS_BLOCK_CONTROLS]
    return _read_records(configs, args.outputs)


def _cross_models(args, params, models) -> list[str]:
    """``models``, then (unless ``--model`` chose one) the tier's ``cross_block.models`` not among them."""
    extra = [] if args.model else (params.get("cross_block") or {}).get("models", [])
    return list(dict.fromkeys([*models, *extra]))


def _observer_records(args, model=None) -> list[dict]:
    from repro import runs
    from repro.quant import OBSERVERS

    return _read_records([runs.make_config("rtn", b, args.tier, model=model or args.model, observer=obs)
                          for obs in OBSERVERS for b in runs.load_tier(args.tier)["bits"]], args.outputs)


def _figures(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repro import plots, report, runs

    params = runs.load_tier(args.tier)
    default = args.model or params["model"]
    models = [default] if args.model else [default, *(m for m in params.get("models") or [] if m != default)]
    directory = Path(args.outputs) / "figures"
    every, drawn = [], {}
    # the default model's figures as <name>_<tier>.png, the others' with _<model>
    for model in _cross_models(args, params, models):
        records = _tier_records(args, model, required=model == default) if model in models else []
        every += records
        suffix = f"_{args.tier}" + ("" if model == default else f"_{model.replace('/', '--')}")
        drawn.update(dict.fromkeys(plots.save_figures(records, directory, suffix=suffix)) if records else {})
        cross = _cross_block_records(args, model)
        if report.blockwise_bits(cross):  # notebook 04's figures
            figures = {f"spectrum_int{b}": (lambda b=b: plots.spectrum(cross, b, model))
                       for b in report.blockwise_bits(cross)}
            figures["window_time"] = lambda: plots.window_time(cross)
            drawn.update(dict.fromkeys(plots.save_drawn(figures, directory, suffix)))
    for model, result in _landscapes(args, params).items():  # notebook 03's figures
        from repro import landscape

        suffix = f"_{args.tier}" + ("" if model == default else f"_{model.replace('/', '--')}")
        figures = {f"landscape_int{b}": (lambda b=b: plots.landscape(result, b)) for b in result["bits"]}
        figures["basin"] = lambda: plots.basin_fits(result)
        analysis = landscape.misalignment_vs_radius([result], args.outputs, compute=False)
        if analysis["rows"]:
            figures["eta_vs_rho"] = lambda: plots.eta_vs_rho(analysis)
        drawn.update(dict.fromkeys(plots.save_drawn(figures, directory, suffix)))
    for model, (records, results) in _datasets(args, params).items():  # notebook 05's figures
        suffix = f"_{args.tier}" + ("" if model == default else f"_{model.replace('/', '--')}")
        figures = {"corpora_misalignment": lambda: plots.misalignment_scatter(records, column="corpus")}
        figures.update({f"landscape_{r['corpus']}_int{b}": (lambda r=r, b=b: plots.landscape(r, b))
                        for r in results for b in r["bits"]})
        drawn.update(dict.fromkeys(plots.save_drawn(figures, directory, suffix)))
    for model, (records, _) in _granularity(args, params).items():  # notebook 08's figures
        from repro import report

        suffix = f"_{args.tier}" + ("" if model == default else f"_{model.replace('/', '--')}")
        main = [r for r in records if r["config"]["method"] != "blockwise"]
        figures = {"granularity_misalignment": lambda main=main: plots.misalignment_scatter(main, column=report.grid_of),
                   "granularity_pareto": lambda main=main: plots.pareto(main)}
        drawn.update(dict.fromkeys(plots.save_drawn(figures, directory, suffix)))
    if len({r["config"]["model"] for r in every}) > 1:  # Fig. 2 over all of the tier's models
        fig = plots.pareto(every)
        fig.savefig(directory / f"pareto_{args.tier}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        drawn[directory / f"pareto_{args.tier}.png"] = None
    print("\n".join(map(str, drawn)))
    return 0


def _landscapes(args, params) -> dict:
    """``{model: landscape}`` of the tier's landscape models whose every point is cached."""
    from repro import landscape

    section = params.get("landscape") or {}
    found = {}
    for model in section.get("models") or []:
        result = landscape.landscape(model, section.get("bits", [4]), args.tier, args.outputs, cached_only=True)
        if result is not None:
            found[model] = result
    return found


def _datasets(args, params) -> dict:
    """``{model: (records, landscapes)}`` of notebook 05 (the tier's ``datasets`` section), cached only:
    FP/RTN/GPTQ/QAFT records on each corpus (and the default corpus) and the complete landscapes."""
    from repro import landscape, runs
    from repro.methods import MAIN

    section = params.get("datasets") or {}
    found = {}
    for model in section.get("models") or []:
        configs = [c for corpus in [*section.get("corpora", []), None] for c in
                   runs.sweep_configs(MAIN, section.get("bits"), args.tier, model=model,
                                      corpus=corpus)]
        records = _read_records(configs, args.outputs)
        results = [landscape.landscape(model, section.get("bits"), args.tier, args.outputs, cached_only=True,
                                       corpus=corpus, **section.get("landscape", {})) for corpus in section.get("corpora", [])]
        if any(r["config"]["corpus"] in section.get("corpora", []) for r in records):
            found[model] = (records, [r for r in results if r is not None])
    return found


def _granularity(args, params) -> dict:
    """``{model: (records, basin)}`` of notebook 08 (the tier's ``granularity_study``), cached only, for
    the models with any per-channel or group record; basin: ``landscape.basin_radius`` of the FP
    landscape where it is cached, else None."""
    from repro import landscape, runs

    found = {}
    for model in (params.get("granularity_study") or {}).get("models") or []:
        records = _read_records(runs.granularity_configs(args.tier, model), args.outputs)
        if any(r["config"].get("granularity", "tensor") != "tensor" for r in records):
            result = landscape.landscape(model, None, args.tier, args.outputs, cached_only=True)
            found[model] = (records, landscape.basin_radius(result) if result else None)
    return found


def _report(args) -> int:
    import json

    from repro import report, runs

    params = runs.load_tier(args.tier)
    default = args.model or params["model"]
    records = _tier_records(args, default)
    in_sample = _read_records([runs.make_config("gptq", b, args.tier, model=default, options={"holdout": 0})
                               for b in params["bits"]], args.outputs)  # the A/B, if run
    others = {}  # the tier's other models that have records
    for model in [] if args.model else [m for m in params.get("models") or [] if m != default]:
        sweep = _tier_records(args, model, required=False)
        if sweep:
            others[model] = (sweep, _observer_records(args, model))
    command = f"repro report --tier {args.tier}" + (f" --model {args.model}" if args.model else "")
    sections = report.readme_sections(records, _observer_records(args, default), tier=args.tier, command=command,
                                      in_sample_records=in_sample, other_models=others)
    pairs = []  # QAFT trained under bf16 autocast vs fp32, everything else equal (the A/B, where run)
    for model in [default, *others]:
        for b in params["bits"]:
            found = _read_records([runs.make_config("qaft", b, args.tier, model=model, options={"mixed_precision": mp})
                                   for mp in ("bf16", "no")], args.outputs)
            if len(found) == 2:
                pairs.append(tuple(found))
    if pairs:
        sections["qaft-precision"] = (f"{report.precision_table(pairs)}\n\n"
                                      f"{report.provenance([r for p in pairs for r in p], args.tier, command)}")
    sweep = _read_records([runs.make_config("blockwise", report.BLOCKWISE_SWEEP_BITS, args.tier, model=default, options=o)
                           for o in report.BLOCKWISE_SWEEP], args.outputs)  # the defaults' sweep, where run
    if len(sweep) > 1:  # the sweep, not only the tier's default run
        sections["blockwise-sweep"] = (f"{report.blockwise_sweep_table(sweep)}\n\n"
                                       f"{report.provenance(sweep, args.tier, command)}")
    cross = {model: _cross_block_records(args, model) for model in _cross_models(args, params, [default, *others])}
    cross = {model: rs for model, rs in cross.items() if report.blockwise_bits(rs)}
    for model, rs in cross.items():
        sections[f"spectrum-{model}"] = "\n\n".join(
            [f"int{b}:\n\n{report.spectrum_table(rs, b, model)}" for b in report.blockwise_bits(rs)]
            + [report.provenance(rs, args.tier, command)])
    if cross:
        every = [r for rs in cross.values() for r in rs]
        blockwise = [r for r in every if r["config"]["method"] == "blockwise"]
        growth = "\n".join(f"- {model}: {report.growth_summary([r for r in blockwise if r['config']['model'] == model])}"
                            for model in cross)
        sections["cross-block"] = (f"{report.cross_block_summary(every)}\n\n{growth}\n\n"
                                   f"{report.memory_table(blockwise)}\n\n{report.provenance(every, args.tier, command)}")
    for model, result in _landscapes(args, params).items():
        from repro import landscape

        analysis = landscape.misalignment_vs_radius([result], args.outputs, compute=False)
        sections[f"landscape-{model}"] = "\n\n".join(
            [f"int{b} segments:\n\n{report.barrier_table(result, b)}" for b in result["bits"]]
            + [f"Basin radius:\n\n{report.basin_table(result)}", report.radius_summary(analysis),
               f"RTN against a random step of the same length:\n\n{report.rtn_vs_random_table(result)}",
               f"*Generated from {len(result['points'])} cached landscape points by `{command}`: tier {args.tier}, "
               f"model {model}, code {', '.join(sorted({p.get('code', 'unknown') for p in result['points']}))}.*"])
    for model, (records, results) in _datasets(args, params).items():
        from repro import landscape

        parts = [report.corpora_table(records), report.corpora_summary(records)]
        parts += [f"{r['corpus']}:\n\n{report.basin_table(r)}" for r in results]
        if results:
            section = params.get("datasets") or {}
            parts.append(report.radius_summary(landscape.misalignment_vs_radius(
                results, args.outputs, compute=False, bits=section.get("bits"))))
        sections[f"datasets-{model}"] = "\n\n".join(parts + [report.provenance(records, args.tier, command)])
    for model, (records, basin) in _granularity(args, params).items():
        sections[f"granularity-{model}"] = "\n\n".join([report.granularity_table(records),
                                                          report.granularity_summary(records, **(
                                                              {"radius": basin["R"], "bound": basin["bound"]}
                                                              if basin else {})),
                                                          report.provenance(records, args.tier, command)])
    summary = Path(args.outputs) / args.tier / "batch.json"
    if summary.is_file():
        from repro import batch

        planned = {(job.notebook, job.model) for job in batch.plan(args.tier)}
        sections["batch"] = report.batch_table(json.loads(summary.read_text()), planned)
    for name, body in sections.items():
        print(f"<!-- report:{name} -->\n{body}\n<!-- /report:{name} -->\n")
    if args.readme:
        path = Path(args.readme)
        if not path.is_file():
            raise SystemExit(f"{path} not found")
        runs.write_text_atomic(path, report.update_markdown(path.read_text(), sections))
        print(f"updated {', '.join(sections)} in {path}", file=sys.stderr)
    return 0


BENCHMARKS = {  # name -> the script's arguments that measure each target of benchmarks/README.md
    "gptq": ["gptq_bench.py", "--threads", "1", "--skip-model"],
    "qaft": ["qaft_bench.py", "--seq-len", "512", "--steps", "4", "--rounds", "3"],
    "eval": ["eval_bench.py"],
}


def _bench(args) -> int:
    """Run the benchmarks one after another (never two at once: they time the same cores) and write
    their output, with machine, torch, date and commit, to OUTPUTS/bench/bench-<date>.md."""
    import platform
    import subprocess
    import time

    import torch

    directory = Path(__file__).resolve().parent.parent / "benchmarks"
    if not directory.is_dir():
        raise RuntimeError(f"repro bench runs the scripts of a repository checkout's benchmarks/ ({directory} "
                           f"not found); clone the repository and install it with `make install`")
    names = args.which or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    extra = ["--device", args.device] if args.device else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=directory, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    lines = [f"# repro bench, {time.strftime('%Y-%m-%d %H:%M')}, commit {commit}",
             f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n"]
    for name in names:
        command = [sys.executable, str(directory / BENCHMARKS[name][0]), *BENCHMARKS[name][1:], *extra]
        print(f"$ {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, cwd=directory, capture_output=True, text=True)
        print(done.stdout, flush=True)
        lines += [f"## {name}: `python benchmarks/{' '.join(BENCHMARKS[name] + extra)}`\n", done.stdout]
        if done.returncode:
            lines.append(f"FAILED (exit {done.returncode}):\n{done.stderr[-2000:]}")
            print(done.stderr[-2000:], file=sys.stderr)
    path = Path(args.outputs) / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    from repro.runs import write_text_atomic

    write_text_atomic(path, "\n".join(lines))
    print(f"written to {path}")
    return 1 if any(line.startswith("FAILED") for line in lines) else 0


def main(argv=None) -> int:
    from repro.data import CORPORA
    from repro.methods import METHODS
    from repro.quant import GRANULARITIES, OBSERVERS
    from repro.runs import TIERS

    parser = argparse.ArgumentParser(prog="repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a method at one or more bit-widths, print one line each",
                       description="Run a quantization method and write a cached JSON record under "
                                   "OUTPUTS/records (a rerun with the same config reads it).")
    p.add_argument("--method", choices=sorted(METHODS), default="rtn")
    p.add_argument("--bits", type=int, nargs="+", help="bit-widths in 2..8 (default 4)")
    p.add_argument("--tier", choices=TIERS, default="cpu", help="parameter set from params/ (default cpu)")
    p.add_argument("--model", help="embedded name (smollm2-135m) or hub id; default: the tier's")
    p.add_argument("--corpus", choices=CORPORA, help="default: the tier's")
    p.add_argument("--observer", choices=OBSERVERS, help="scale observer; default: the tier's")
    p.add_argument("--granularity", choices=GRANULARITIES,
                   help="scales per tensor (default, the paper's), output channel or group of --group-size columns")
    p.add_argument("--group-size", type=int, help="input columns per scale with --granularity group (default 128)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.add_argument("--force", action="store_true", help="recompute even if a record exists")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method option over the tier's (repeatable), e.g. --option window=2 --option lr=1e-3")
    p.set_defaults(func=_run)

    p = sub.add_parser("batch", help="the main job: compute every notebook's runs, then execute the notebooks",
                       description="For each notebook (each of the tier's models where it shows one model): "
                                   "compute the runs it reads (cached ones are read), then execute it with "
                                   "papermill into OUTPUTS/<tier>/notebooks. Interrupted, it resumes; exit "
                                   "status 0 only when every run and notebook passed.")
    p.add_argument("notebooks", nargs="*", help="notebook names (default: all, in order)")
    p.add_argument("--tier", choices=TIERS, default="cpu")
    p.add_argument("--models", nargs="+", help="models (default: the tier's `models`)")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.add_argument("--bits", type=int, nargs="+", help="bit-widths in 2..8 every notebook sweeps instead of the "
                   "tier's (passed to each notebook as its `bits` parameter), e.g. a quick pass at --bits 4")
    p.add_argument("--shard", metavar="K/N", help="compute only the K-th of N deterministic parts of the runs, no "
                   "notebooks (one per GPU or SLURM array task on a shared --outputs; then one plain batch)")
    p.set_defaults(func=_batch)

    p = sub.add_parser("figures", help="save the figures of the cached records as PNG under OUTPUTS/figures")
    p.add_argument("--tier", choices=TIERS, default="cpu")
    p.add_argument("--model", help="embedded name or hub id; default: the tier's")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.set_defaults(func=_figures)

    p = sub.add_parser("report", help="print the README's result tables from the cached records as markdown",
                       description="Tables of the tier's records (and RTN at every observer), each with a "
                                   "provenance line; --readme rewrites the sections between "
                                   "<!-- report:NAME --> and <!-- /report:NAME --> markers of that file.")
    p.add_argument("--tier", choices=TIERS, default="cpu")
    p.add_argument("--model", help="embedded name or hub id; default: the tier's")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.add_argument("--readme", help="markdown file whose marker sections to rewrite (e.g. README.md)")
    p.set_defaults(func=_report)

    p = sub.add_parser("bench", help="run the benchmarks of benchmarks/README.md, one at a time, and keep their output",
                       description="Each benchmark against its reference (GPTQ vs IST-DASLab's solve, the QAFT "
                                   "step vs plain fine-tuning, evaluation vs a plain HF forward), printed and "
                                   "written to OUTPUTS/bench/ with machine, torch, date and commit. Minutes on a CPU.")
    p.add_argument("which", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--device", help="cpu or cuda (default: the scripts' own, cuda when available)")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    if getattr(args, "outputs", "") is None:
        from repro.runs import outputs_dir

        args.outputs = outputs_dir()
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:  # our own clear messages, without a traceback
        print(f"repro: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
