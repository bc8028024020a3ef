"""The main job: every notebook of a tier, over the tier's models, on one shared record cache.

``batch(tier)`` goes through the notebooks in order. For each one it first computes, in this
process, the runs the notebook will read (its ``NOTEBOOKS`` plan; a run already cached is read,
not recomputed, whichever notebook needed it first), with a progress bar over the runs and one
summary line per finished run; then papermill executes the notebook, which only reads records,
into ``OUTPUTS/<tier>/notebooks/`` (a failed one as ``<name>.failed.ipynb``, with its traceback).
A failed run or notebook is reported and the batch goes on.
Records are written atomically (``repro.runs``), so a batch killed at any point (``kill -9``
included) and started again recomputes nothing that had finished.

With ``processes`` > 1 (the tier's ``processes``, or ``repro batch --processes N``) the runs are
computed first by that many worker processes at once (``repro batch --worker``), each at the tier's
``threads``: every worker walks the same plan and takes the next run no other worker holds
(``claim``), so a run is computed once and the workers stay busy to the end; the workers also share
what a notebook computes beyond runs (``Notebook.precompute``: the landscape's points, one claim per
point); then this process reads every record and executes the notebooks. In isolation, on 2 cores, two one-thread workers do GPTQ
1.46x and an evaluation pass 1.09x faster than one process at two threads (``benchmarks/processes.py``:
GPTQ's column sweep and the Python between kernels do not split over threads); over the whole main
job the gain is small (each run took about twice its two-thread time), more cores gain more.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from repro import runs, store
from repro.config import load_tier, tier_name
from repro.progress import progress
from repro.report import wall_s
from repro.studies import NOTEBOOKS

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass
class Job:
    """One notebook execution: the notebook, its model (None: all of the tier's), its runs."""

    notebook: str
    model: str | None
    configs: list
    status: str = "pending"
    runs_s: float = 0.0  # computing the runs this notebook was the first to need
    execute_s: float = 0.0
    error: str | None = None
    output: Path | None = None
    ran: list = field(default_factory=list)  # {"model", "run", "status", "wall_s"} per run it computed or failed

    def name(self) -> str:
        return self.notebook + (f"-{self.model.replace('/', '--')}" if self.model else "")


def tier_models(tier: str, models=None) -> list[str]:
    """``models``, else the tier's ``models`` list, else its single ``model``."""
    params = load_tier(tier)
    return list(models or params.get("models") or [params["model"]])


def plan(tier: str, notebooks=None, models=None, bits=None) -> list[Job]:
    """The jobs of a batch; ``models`` defaults to the tier's ``models``. Per-model notebooks come
    first, grouped by model (each model is loaded once), then the notebooks over all models.
    Without ``notebooks``: every notebook but the tier's ``on_request`` ones. ``bits`` (a list of
    widths) replaces every notebook's widths, as its ``bits`` parameter does (None: the tier's)."""
    params = load_tier(tier)
    names = list(notebooks or [n for n in NOTEBOOKS if n not in (params.get("on_request") or [])])
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebook(s) {', '.join(unknown)}; available: {', '.join(NOTEBOOKS)}")

    def notebook_models(name):
        section = NOTEBOOKS[name].section
        return tier_models(tier, models or (params.get(section) or {}).get("models"))

    per_model = [name for name in names if NOTEBOOKS[name].per_model]
    order = list(dict.fromkeys(m for name in per_model for m in notebook_models(name)))
    jobs = [Job(name, model, NOTEBOOKS[name].configs(tier, model, bits))
            for model in order for name in per_model if model in notebook_models(name)]
    jobs += [Job(name, None, [c for model in notebook_models(name) for c in NOTEBOOKS[name].configs(tier, model, bits)])
             for name in names if not NOTEBOOKS[name].per_model]
    return jobs


def _execute(job: Job, tier: str, outputs: Path, models: list[str], bits=None) -> None:
    """papermill ``job``'s notebook into ``outputs/<tier>/notebooks`` (complete file or none)."""
    from repro import require

    pm = require("papermill", "notebooks")
    directory = outputs / tier_name(tier) / "notebooks"
    directory.mkdir(parents=True, exist_ok=True)
    job.output = directory / f"{job.name()}.ipynb"
    partial = directory / f".{job.name()}.partial.ipynb"
    parameters = {"tier": tier, "outputs": str(outputs.resolve())}
    parameters.update({"model": job.model} if job.model else {"models": models})
    if bits is not None:
        parameters["bits"] = list(bits)
    try:
        pm.execute_notebook(str(NOTEBOOK_DIR / f"{job.notebook}.ipynb"), str(partial), parameters=parameters,
                            cwd=str(NOTEBOOK_DIR), progress_bar=False)
    except Exception:  # a failed notebook's output holds the traceback: keep it under its own name
        if partial.exists():
            os.replace(partial, directory / f"{job.name()}.failed.ipynb")
        raise
    os.replace(partial, job.output)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N, or a ValueError saying the form."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. --shard 2/8")
    return k, n


def in_shard(config, shard: tuple[int, int] | None) -> bool:
    """Whether a run belongs to shard ``(K, N)``: by its record key (a hash), so every process and
    node agrees without talking to the others, and the N shards cover every run exactly once."""
    return shard is None or int(config.key(), 16) % shard[1] == shard[0] - 1


@contextmanager
def claim(path: Path):
    """Yields whether this process holds the run whose record is ``path`` for the block: a
    non-blocking ``flock`` on ``.<record>.claim`` beside it, False while another worker holds it (that
    worker computes the run; ``--worker`` goes on to the next). Where the filesystem has no ``flock``
    it yields True and ``repro.runs.run``'s record lock keeps the run from being computed twice
    (the second worker waits for the first and reads its record)."""
    import fcntl

    lock = path.with_name(f".{path.name}.claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield False
                return
            if err.errno not in store._NO_FLOCK:
                raise
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker_summary_path(outputs: Path, tier: str, worker: int) -> Path:
    """Where worker ``worker`` of ``repro batch --processes`` writes what it computed (``--worker``)."""
    return outputs / tier_name(tier) / "workers" / f"worker-{worker}.json"


def run_workers(processes: int, tier: str, notebooks, models, outputs: Path, bits, echo=print) -> tuple[float, dict]:
    """Start ``processes`` ``repro batch --worker K`` on ``outputs`` at once and wait for them all.
    Returns the wall seconds and, per ``(notebook, model)``, the runs the workers computed
    (``{"model", "run", "status", "wall_s"}`` rows). Their output goes to this process's stdout/stderr."""
    command = [sys.executable, "-m", "repro.cli", "batch", "--tier", tier, "--outputs", str(outputs),
               *(notebooks or []), *(["--models", *models] if models else []),
               *(["--bits", *map(str, bits)] if bits else [])]
    for k in range(1, processes + 1):
        worker_summary_path(outputs, tier, k).unlink(missing_ok=True)
    echo(f"computing the runs in {processes} worker processes ({' '.join(command[2:])} --worker K)")
    start = time.perf_counter()
    procs = [subprocess.Popen([*command, "--worker", str(k)]) for k in range(1, processes + 1)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    ran = {}
    for k, code in enumerate(codes, 1):
        path = worker_summary_path(outputs, tier, k)
        if not path.exists():
            echo(f"worker {k} stopped (exit {code}) before it wrote {path}: its runs are computed below")
            continue
        for job in json.loads(path.read_text())["jobs"]:
            ran.setdefault((job["notebook"], job["model"]), []).extend(job["runs"])
    return wall, ran


class HubUnavailableError(RuntimeError):
    """The batch needs hub models or corpora that cannot be had now (no network, nothing cached)."""


def check_hub(configs, tier: str) -> None:
    """Before any work: when the Hugging Face hub is unreachable, every hub model and corpus the
    ``configs`` need must be in the local caches; else one error lists what is missing and how to
    bring it (instead of hundreds of runs failing one by one)."""
    from repro import data, models

    reason = models.hub_unreachable()
    if reason is None:
        return
    needed_models = sorted({c.model for c in configs if c.model not in models.EMBEDDED and not Path(c.model).is_dir()})
    missing_models = [m for m in needed_models if not models.in_hf_cache(m)]
    missing_corpora = [c for c in sorted({c.corpus for c in configs}) if not data.corpus_available(c)]
    if not (missing_models or missing_corpora):
        return
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    raise HubUnavailableError(
        f"the {tier} tier needs the Hugging Face hub, which is unreachable ({reason}), and the local cache "
        f"(HF_HOME={home}) lacks " + "; ".join(filter(None, (
            f"model(s) {', '.join(missing_models)}" if missing_models else "",
            f"corpus/corpora {', '.join(missing_corpora)}" if missing_corpora else ""))) +
        ". On a connected machine fill a cache with them (`huggingface-cli download MODEL` for each model; "
        "`python -c \"from repro import data; data.load_corpus('NAME')\"` for each corpus), copy it here and "
        "set HF_HOME to it (and HF_HUB_OFFLINE=1). The embedded default needs none of this: `repro batch --tier cpu`.")


def batch(tier: str = "cpu", notebooks=None, models=None, outputs: Path | None = None, echo=print,
          shard: tuple[int, int] | None = None, bits=None, processes: int | None = None,
          worker: int | None = None) -> list[Job]:
    """Run the batch (see the module docstring); returns the jobs with their status and times.

    ``bits``: the widths every notebook sweeps instead of the tier's (``repro batch --bits 4``), e.g. a
    quick pass over one width; the notebooks get them as their ``bits`` parameter.

    ``shard=(K, N)``: compute only the K-th of N deterministic parts of the runs and execute no
    notebook (``repro batch --shard K/N``, e.g. one per GPU or SLURM array task, on one shared
    outputs directory); a final unsharded batch then reads every record and executes the notebooks.

    ``processes``: worker processes that compute the runs first (module docstring; None: the tier's
    ``processes``, else 1). ``worker=K``: be the K-th of them: compute every run of the plan that no
    other worker holds, execute no notebook, write what it computed (``worker_summary_path``)."""
    outputs = Path(outputs) if outputs is not None else store.outputs_dir()
    processes = processes or load_tier(tier).get("processes") or 1
    if processes < 1:
        raise ValueError(f"processes={processes}: expected a number of worker processes >= 1")
    if shard is not None and worker is not None:
        raise ValueError("--shard and --worker exclude each other: a worker takes whatever run is free, a shard a "
                         "fixed part (for separate machines)")
    workers_wall, worker_runs = None, {}
    if processes > 1 and shard is None and worker is None:
        cached_before = _cached_count(tier, notebooks, models, outputs, bits)
        workers_wall, worker_runs = run_workers(processes, tier, notebooks, models, outputs, bits, echo)
    jobs = plan(tier, notebooks, models, bits)  # per notebook: the models given, else its own or the tier's list
    models = tier_models(tier, models)
    unique = {}
    for job in jobs:
        job.configs = [c for c in job.configs if in_shard(c, shard)]
        for config in job.configs:
            unique.setdefault(store.record_path(config, outputs), config)
    cached = {path for path in unique if path.exists()}
    check_hub([c for path, c in unique.items() if path not in cached], tier)
    echo(f"repro batch --tier {tier}{f' --shard {shard[0]}/{shard[1]}' if shard else ''}: {len(jobs)} notebook(s), "
         f"{len(unique)} run(s), {len(cached)} cached, {len(unique) - len(cached)} to compute; outputs in {outputs}")
    done, failed = set(cached), {}
    bar = progress(total=len(unique) - len(cached), desc="runs" + (f" (worker {worker})" if worker else ""),
                   unit="run", position=(worker or 1) - 1)
    for job in jobs:
        start = time.perf_counter()
        for config in job.configs:
            path = store.record_path(config, outputs)
            if path in done or path in failed:
                continue
            with claim(path) if worker else nullcontext(True) as mine:
                if not mine:  # another worker is computing it
                    done.add(path)
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"{config.model} {config.label()}")
                t0 = time.perf_counter()
                try:
                    record = runs.run(config, outputs)
                    if not record.get("cached"):  # (another worker may have just written it)
                        bar.write(runs.summary(record))
                        job.ran.append(_ran(config, "ran", t0))
                    done.add(path)
                except Exception as err:  # noqa: BLE001 - reported, and the batch goes on
                    failed[path] = f"{type(err).__name__}: {err}"
                    bar.write(f"FAILED {config.model} {config.label()}: {failed[path]}")
                    job.ran.append(_ran(config, "failed", t0))
            bar.update(1)
        if worker is not None and job.model and NOTEBOOKS[job.notebook].precompute:  # e.g. the landscape's points
            t0 = time.perf_counter()
            try:
                NOTEBOOKS[job.notebook].precompute(tier, job.model, bits, outputs, claim)
                job.ran.append({"model": job.model, "run": "precompute", "status": "precomputed",
                                "wall_s": time.perf_counter() - t0})
            except Exception as err:  # noqa: BLE001 - the notebook computes what is missing when it executes
                bar.write(f"precomputing {job.name()} failed ({type(err).__name__}: {err}); it executes without")
        job.runs_s = time.perf_counter() - start
        if worker_runs:  # computed by the workers: their runs, and their time summed over processes
            by_workers = worker_runs.get((job.notebook, job.model), [])
            job.ran = by_workers + job.ran
            job.runs_s += sum(r["wall_s"] for r in by_workers)
        missing = [c for c in job.configs if store.record_path(c, outputs) in failed]
        if shard is not None or worker is not None:  # the notebooks run once every part's records are in
            job.status = "failed" if missing else "passed"
            job.error = f"{len(missing)} run(s) failed" if missing else None
            continue
        if missing:
            job.status = "failed"
            job.error = f"{len(missing)} of its run(s) failed: " + ", ".join(f"{c.model} {c.label()}" for c in missing)
            bar.write(f"notebook {job.name()}: skipped, {job.error}")
            continue
        start = time.perf_counter()
        try:
            _execute(job, tier, outputs, models, bits)
            job.status = "passed"
        except Exception as err:  # noqa: BLE001
            job.status, job.error = "failed", f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:300]}"
            if not type(err).__name__.startswith("Papermill"):
                traceback.print_exc()
        job.execute_s = time.perf_counter() - start
        bar.write(f"notebook {job.name()}: {job.status} ({job.runs_s:.0f} s runs + {job.execute_s:.0f} s "
                  f"executing){' - ' + job.error if job.error else ''}"
                  + (f" -> {job.output}" if job.output else ""))
    bar.close()
    cached = cached_before if workers_wall is not None else len(cached)
    echo(summary_table(jobs, cached, workers_wall, processes))
    if worker is not None:
        write_summary(jobs, tier, outputs, cached, path=worker_summary_path(outputs, tier, worker))
    elif shard is None:  # batch.json describes a whole main job; a batch of some notebooks or widths its own file
        write_summary(jobs, tier, outputs, cached, workers_wall, processes,
                      outputs / tier_name(tier) / ("batch.json" if notebooks is None and bits is None else
                      "batch-" + "+".join([*dict.fromkeys(notebooks or ["all"]), *(f"int{b}" for b in bits or [])])
                      + ".json"))
    return jobs


def _ran(config, status: str, started: float) -> dict:
    return {"model": config.model, "run": config.label(), "status": status, "wall_s": time.perf_counter() - started}


def _cached_count(tier: str, notebooks, models, outputs: Path, bits) -> int:
    """How many of the plan's runs have records now."""
    paths = {store.record_path(c, outputs) for job in plan(tier, notebooks, models, bits) for c in job.configs}
    return sum(path.exists() for path in paths)



def summary_table(jobs: list[Job], cached: int, workers_wall: float | None = None, processes: int = 1) -> str:
    """What ran, was cached or failed, with wall times, per notebook and in total (with workers, a
    notebook's runs s are its runs' seconds summed over the worker processes)."""
    lines = [f"{'notebook':<34} {'status':<7} {'ran':>4} {'failed':>6} {'runs s':>8} {'exec s':>7}"]
    count = lambda runs, status: sum(r["status"] == status for r in runs)  # noqa: E731
    for job in jobs:
        lines.append(f"{job.name():<34} {job.status:<7} {count(job.ran, 'ran'):>4} {count(job.ran, 'failed'):>6} "
                     f"{job.runs_s:>8.0f} {job.execute_s:>7.0f}")
    total = wall_s([j.runs_s for j in jobs], [j.execute_s for j in jobs], workers_wall)
    every = [r for j in jobs for r in j.ran]
    passed = sum(j.status == "passed" for j in jobs)
    workers = "" if workers_wall is None else f" ({workers_wall / 60:.1f} min of runs in {processes} processes)"
    lines.append(f"runs: {count(every, 'ran')} computed, {cached} cached, {count(every, 'failed')} failed | notebooks: "
                 f"{passed} of {len(jobs)} passed | wall {total / 60:.1f} min{workers}")
    return "\n".join(lines)


def write_summary(jobs: list[Job], tier: str, outputs: Path, cached: int, workers_wall: float | None = None,
                  processes: int = 1, path: Path | None = None) -> Path:
    """``path`` (default ``OUTPUTS/<tier>/batch.json``, the main job's; ``batch-<notebooks>.json`` for a
    batch of some notebooks): per notebook the status, runs computed and wall times; with worker
    processes, their wall time (``workers_wall_s``), which the total counts instead of the runs' sum."""
    path = path or outputs / tier_name(tier) / "batch.json"
    store.write_json_atomic(path, {
        "tier": tier, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": runs.code_hash(tier), "cached": cached,
        "processes": processes, "workers_wall_s": workers_wall,
        "jobs": [{"notebook": j.notebook, "model": j.model, "status": j.status, "error": j.error,
                  "runs_s": j.runs_s, "execute_s": j.execute_s, "runs": j.ran} for j in jobs]})
    return path
