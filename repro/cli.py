"""``repro`` console command: run methods into cached records, execute the notebooks."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OUTPUTS_HELP = "results directory (default: $REPRO_OUTPUTS, else the checkout's outputs/)"
TIER_HELP = "ci, cpu, paper (repro/params/) or a YAML file of settings (`base: cpu` starts from a tier); default cpu"
SET_HELP = ("override a tier setting (repeatable; enters the record keys), e.g. --set seq_len=128 --set "
            "n_calibration=16 --set methods.qaft.epochs=2: runs use a derived tier file OUTPUTS/tiers/NAME-HASH.yaml")


def _configs(args) -> list:
    """The ``RunConfig`` of each of ``--bits`` (one for a method that quantizes nothing), checked."""
    from repro.config import make_config, parse_values
    from repro.methods import METHODS

    if args.group_size is not None and args.granularity != "group":
        raise ValueError("--group-size applies to --granularity group only")
    quantizes = args.method not in METHODS or METHODS[args.method].quantizes
    if not quantizes and (args.bits is not None or args.granularity not in (None, "tensor")):
        raise ValueError(f"--method {args.method} quantizes nothing: leave out --bits and --granularity")
    return [make_config(args.method, bits, args.tier, options=parse_values(args.option), model=args.model,
                        corpus=args.corpus, observer=args.observer, seed=args.seed, device=args.device,
                        granularity=args.granularity, group_size=args.group_size, start=args.start)
            for bits in (args.bits or [4] if quantizes else [None])]


def _run(args) -> int:
    from repro import runs

    for config in _configs(args):
        record = runs.run(config, args.outputs, force=args.force)
        print(runs.summary(record), flush=True)
    return 0


def _export(args) -> int:
    from repro.export import export_run

    if args.bits and len(args.bits) > 1:
        raise ValueError(f"--bits {' '.join(map(str, args.bits))}: export one width at a time")
    (config,) = _configs(args)
    print(f"written to {export_run(config, args.directory, args.format, args.outputs)}", flush=True)
    return 0


def _eval(args) -> int:
    from repro.harness import eval_run, results_path

    if args.bits and len(args.bits) > 1:
        raise ValueError(f"--bits {' '.join(map(str, args.bits))}: evaluate one width at a time")
    (config,) = _configs(args)
    kept = eval_run(config, args.tasks, args.outputs, args.batch_size, args.max_length, args.limit)
    for task in args.tasks:
        metrics = ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in kept[task]["metrics"].items()
                            if "," in k and "_stderr" not in k and isinstance(v, (int, float)))  # (metric,filter)
        print(f"{config.model} {config.label()} {task}: {metrics}", flush=True)
    print(f"written to {results_path(config, args.outputs)}", flush=True)
    return 0


def _batch(args) -> int:
    from repro import batch
    from repro.studies import NOTEBOOKS

    shard = batch.parse_shard(args.shard) if args.shard else None
    swallowed = [m for m in args.models or [] if m in NOTEBOOKS]
    if swallowed:  # `--models a b` takes every name after it
        raise ValueError(f"--models took the notebook name(s) {', '.join(swallowed)}: put notebook names before "
                         f"--models, e.g. repro batch {' '.join(swallowed)} --models {args.models[0]}")
    jobs = batch.batch(args.tier, args.notebooks or None, args.models, args.outputs, shard=shard, bits=args.bits,
                       processes=args.processes, worker=args.worker)
    return 0 if all(job.status == "passed" for job in jobs) else 1


def _figures(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from repro import plots

    # each study's figures, the default model's as <name>_<tier>.png, the others' with _<model>
    figures = _chosen(_from_studies(args, "figures"), args.figure, "figure", args.outputs)
    print("\n".join(map(str, plots.save_drawn(figures, Path(args.outputs) / "figures"))))
    return 0


def _from_studies(args, kind: str) -> dict:
    """Every study's ``sections`` or ``figures`` (``kind``) of the cached records, merged. The whole set
    needs the main sweep's records (else SystemExit saying how to compute them); with names chosen
    (``--section``/``--figure``), a study without its records is skipped instead."""
    from repro.studies import STUDIES, NoRecordsError

    command = f"repro report --tier {args.tier}" + (f" --model {args.model}" if args.model else "")
    found = {}
    for study in STUDIES.values():
        try:
            found.update(study.sections(args.tier, args.outputs, args.model, command) if kind == "sections"
                         else study.figures(args.tier, args.outputs, args.model))
        except NoRecordsError as err:
            if not (args.section if kind == "sections" else args.figure):
                raise SystemExit(str(err)) from None
    return found


def _chosen(found: dict, names, what: str, outputs) -> dict:
    """``found`` restricted to ``names`` (all of it when None); SystemExit naming any not found."""
    if not names:
        return found
    unknown = [name for name in names if name not in found]
    if unknown:
        raise SystemExit(f"no {what} {', '.join(unknown)} from the records under {outputs}: the {what}s there "
                         f"are {', '.join(found) or 'none'}")
    return {name: found[name] for name in names}


def _report(args) -> int:
    import json

    from repro import report, store
    from repro.config import tier_name

    sections = _from_studies(args, "sections")
    summary = Path(args.outputs) / tier_name(args.tier) / "batch.json"  # where batch.write_summary puts it
    if summary.is_file():
        from repro import batch

        planned = {(job.notebook, job.model) for job in batch.plan(args.tier)}
        sections["batch"] = report.batch_table(json.loads(summary.read_text()), planned)
    sections = _chosen(sections, args.section, "section", args.outputs)
    for name, body in sections.items():
        print(f"<!-- report:{name} -->\n{body}\n<!-- /report:{name} -->\n")
    if args.readme:
        path = Path(args.readme)
        if not path.is_file():
            raise SystemExit(f"{path} not found")
        store.write_text_atomic(path, report.update_markdown(path.read_text(), sections))
        print(f"updated {', '.join(sections)} in {path}", file=sys.stderr)
    return 0


BENCHMARKS = {  # name -> the script's arguments that measure each target of benchmarks/README.md
    "gptq": ["gptq_bench.py", "--threads", "1", "--skip-model"],
    "qaft": ["qaft_bench.py", "--seq-len", "512", "--steps", "4", "--rounds", "3"],
    "eval": ["eval_bench.py"],
    # the GPU check (7B widths, the paper tier's protocol here and on CPU): ~8 min on an H100, not a CPU's
    "gpu": ["gpu_check.py"],
}
CPU_BENCHMARKS = ("gptq", "qaft", "eval")  # what `repro bench` runs by default


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
    names = args.which or list(CPU_BENCHMARKS)
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
    from repro.store import write_text_atomic

    write_text_atomic(path, "\n".join(lines))
    print(f"written to {path}")
    return 1 if any(line.startswith("FAILED") for line in lines) else 0


def main(argv=None) -> int:
    from repro.data import CORPORA
    from repro.methods import METHODS
    from repro.quant import GRANULARITIES, OBSERVERS
    from repro.config import STARTS
    from repro.export import FORMATS

    parser = argparse.ArgumentParser(prog="repro", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (DEBUG: every record read)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    choice = argparse.ArgumentParser(add_help=False)  # which run: `repro run` and `repro export` choose alike
    choice.add_argument("--method", choices=sorted(METHODS), default="rtn")
    choice.add_argument("--bits", type=int, nargs="+", help="bit-widths in 2..8 (default 4)")
    choice.add_argument("--tier", default="cpu", help=TIER_HELP)
    choice.add_argument("--model", help="embedded name (smollm2-135m) or hub id; default: the tier's")
    choice.add_argument("--corpus", help=f"{', '.join(CORPORA)}, a text file, a directory of text files or "
                        "hf:NAME[:CONFIG] (default: the tier's)")
    choice.add_argument("--observer", choices=OBSERVERS, help="scale observer; default: the tier's")
    choice.add_argument("--granularity", choices=GRANULARITIES,
                        help="scales per tensor (default, the paper's), output channel or group of --group-size columns")
    choice.add_argument("--group-size", type=int, help="input columns per scale with --granularity group (default 128)")
    choice.add_argument("--seed", type=int)
    choice.add_argument("--start", choices=STARTS, help="the weights the method starts from: the checkpoint's (fp, "
                        "default) or those of the FPFT run on the same data and budget (fpft, computed first)")
    choice.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    choice.add_argument("--outputs", help=OUTPUTS_HELP)
    choice.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a method option over the tier's (repeatable), e.g. --option window=2 --option lr=1e-3")
    choice.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)

    p = sub.add_parser("run", parents=[choice], help="run a method at one or more bit-widths, print one line each",
                       description="Run a quantization method and write a cached JSON record under "
                                   "OUTPUTS/records (a rerun with the same config reads it).")
    p.add_argument("--force", action="store_true", help="recompute even if a record exists")
    p.set_defaults(func=_run)

    p = sub.add_parser("export", parents=[choice], help="write a run's quantized model where from_pretrained loads it",
                       description="The run's integer codes and scales (computed first when not kept) in a "
                                   "copy of the model, written as a dense transformers checkpoint (--format hf) "
                                   "or packed with its quantization_config (--format compressed-tensors).")
    p.add_argument("directory", help="where to write the checkpoint")
    p.add_argument("--format", choices=FORMATS, default="hf")
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", parents=[choice], help="lm-evaluation-harness tasks on a run's quantized model",
                       description="lm_eval.simple_evaluate on the run's quantized model (computed first when its "
                                   "weights are not kept); results beside the record, <record>.lm_eval.json. "
                                   "corpus_perplexity (word/byte perplexity, bits per byte of the run's corpus's test "
                                   "documents) works offline; standard tasks (wikitext, lambada_openai, hellaswag, "
                                   "arc_easy, piqa, winogrande) need the hub. Needs pip install 'repro-lowbit-quant[eval]'.")
    p.add_argument("--tasks", nargs="+", default=["corpus_perplexity"], help="harness task names (default "
                   "corpus_perplexity)")
    p.add_argument("--limit", type=int, help="documents / examples per task (default: all)")
    p.add_argument("--max-length", type=int, help="tokens per window (default: the run's seq_len)")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=_eval)

    p = sub.add_parser("batch", help="the main job: compute every notebook's runs, then execute the notebooks",
                       description="For each notebook (each of the tier's models where it shows one model): "
                                   "compute the runs it reads (cached ones are read), then execute it with "
                                   "papermill into OUTPUTS/<tier>/notebooks. Interrupted, it resumes; exit "
                                   "status 0 only when every run and notebook passed.")
    p.add_argument("notebooks", nargs="*", help="notebook names (default: all, in order)")
    p.add_argument("--tier", default="cpu", help=TIER_HELP)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--models", nargs="+", help="models (default: the tier's `models`)")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.add_argument("--bits", type=int, nargs="+", help="bit-widths in 2..8 every notebook sweeps instead of the "
                   "tier's (passed to each notebook as its `bits` parameter), e.g. a quick pass at --bits 4")
    p.add_argument("--shard", metavar="K/N", help="compute only the K-th of N deterministic parts of the runs, no "
                   "notebooks (one per GPU or SLURM array task on a shared --outputs; then one plain batch)")
    p.add_argument("--processes", type=int, metavar="N", help="worker processes that compute the runs at once before "
                   "the notebooks execute, each at the tier's `threads` (default: the tier's `processes`, else 1)")
    p.add_argument("--worker", type=int, metavar="K", help="be worker K of --processes (which starts them): compute "
                   "every run no other worker holds, no notebooks")
    p.set_defaults(func=_batch)

    p = sub.add_parser("figures", help="save the figures of the cached records as PNG under OUTPUTS/figures")
    p.add_argument("--tier", default="cpu", help=TIER_HELP)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--model", help="embedded name or hub id; default: the tier's")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.add_argument("--figure", action="append", metavar="NAME",
                   help="only this figure (file stem, repeatable), e.g. corpora_misalignment_cpu after `repro batch "
                        "--tier cpu 05_datasets`: a study without its records is then skipped")
    p.set_defaults(func=_figures)

    p = sub.add_parser("report", help="print the README's result tables from the cached records as markdown",
                       description="Tables of the tier's records (and RTN at every observer), each with a "
                                   "provenance line; --readme rewrites the sections between "
                                   "<!-- report:NAME --> and <!-- /report:NAME --> markers of that file.")
    p.add_argument("--tier", default="cpu", help=TIER_HELP)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--model", help="embedded name or hub id; default: the tier's")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.add_argument("--readme", help="markdown file whose marker sections to rewrite (e.g. README.md)")
    p.add_argument("--section", action="append", metavar="NAME",
                   help="only this section (repeatable), e.g. datasets-smollm2-135m after `repro batch --tier cpu "
                        "05_datasets`: the other sections, and the records they would need, are left alone")
    p.set_defaults(func=_report)

    p = sub.add_parser("bench", help="run the benchmarks of benchmarks/README.md, one at a time, and keep their output",
                       description="Each benchmark against its reference (GPTQ vs IST-DASLab's solve, the QAFT "
                                   "step vs plain fine-tuning, evaluation vs a plain HF forward), printed and "
                                   "written to OUTPUTS/bench/ with machine, torch, date and commit. Minutes on a CPU.")
    p.add_argument("which", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: "
                   f"{', '.join(CPU_BENCHMARKS)}; `repro bench gpu --device cuda` is the GPU check)")
    p.add_argument("--device", help="cpu or cuda (default: the scripts' own, cuda when available)")
    p.add_argument("--outputs", help=OUTPUTS_HELP)
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    from repro.progress import configure_logging

    configure_logging(args.verbose - args.quiet)
    if getattr(args, "outputs", "") is None:
        from repro.store import outputs_dir

        args.outputs = outputs_dir()
    try:
        if getattr(args, "tier", None) is not None:  # a YAML path as an absolute one (notebooks run elsewhere)
            from repro.config import TIERS, tier_path

            args.tier = args.tier if args.tier in TIERS else str(tier_path(args.tier))
        if getattr(args, "set", None):
            from repro.config import derive_tier, parse_settings

            args.tier = derive_tier(args.tier, parse_settings(args.set), Path(args.outputs) / "tiers")
        return args.func(args)
    except (ValueError, RuntimeError, ImportError) as err:  # our own clear messages (a missing extra: its pip
        # command, repro.require), without a traceback
        print(f"repro: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
