"""The main job: every notebook of a tier, over the tier's models, on one shared record cache.

``batch(tier)`` goes through the notebooks in order. For each one it first computes, in this
process, the runs the notebook will read (its ``NOTEBOOKS`` plan; a run already cached is read,
not recomputed, whichever notebook needed it first), with a progress bar over the runs and one
summary line per finished run; then papermill executes the notebook, which only reads records,
into ``OUTPUTS/<tier>/notebooks/`` (a failed one as ``<name>.failed.ipynb``, with its traceback).
A failed run or notebook is reported and the batch goes on.
Records are written atomically (``repro.runs``), so a batch killed at any point (``kill -9``
included) and started again recomputes nothing that had finished.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from repro import runs, store
from repro.config import load_tier, tier_name
from repro.progress import progress
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
    ran: list = field(default_factory=list)

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
          shard: tuple[int, int] | None = None, bits=None) -> list[Job]:
    """Run the batch (see the module docstring); returns the jobs with their status and times.

    ``bits``: the widths every notebook sweeps instead of the tier's (``repro batch --bits 4``), e.g. a
    quick pass over one width; the notebooks get them as their ``bits`` parameter.

    ``shard=(K, N)``: compute only the K-th of N deterministic parts of the runs and execute no
    notebook (``repro batch --shard K/N``, e.g. one per GPU or SLURM array task, on one shared
    outputs directory); a final unsharded batch then reads every record and executes the notebooks."""
    outputs = Path(outputs) if outputs is not None else store.outputs_dir()
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
    bar = progress(total=len(unique) - len(cached), desc="runs", unit="run")
    for job in jobs:
        start = time.perf_counter()
        for config in job.configs:
            path = store.record_path(config, outputs)
            if path in done or path in failed:
                continue
            bar.set_postfix_str(f"{config.model} {config.label()}")
            t0 = time.perf_counter()
            try:
                record = runs.run(config, outputs)
                bar.write(runs.summary(record))
                done.add(path)
                job.ran.append((config, "ran", time.perf_counter() - t0))
            except Exception as err:  # noqa: BLE001 - reported, and the batch goes on
                failed[path] = f"{type(err).__name__}: {err}"
                bar.write(f"FAILED {config.model} {config.label()}: {failed[path]}")
                job.ran.append((config, "failed", time.perf_counter() - t0))
            bar.update(1)
        job.runs_s = time.perf_counter() - start
        missing = [c for c in job.configs if store.record_path(c, outputs) in failed]
        if shard is not None:  # the notebooks run once every shard's records are in
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
    echo(summary_table(jobs, len(cached)))
    if shard is None:  # batch.json describes a whole main job; a batch of some notebooks or widths its own file
        write_summary(jobs, tier, outputs, len(cached), "batch" if notebooks is None and bits is None else
                      "batch-" + "+".join([*dict.fromkeys(notebooks or ["all"]),
                                           *(f"int{b}" for b in bits or [])]))
    return jobs


def summary_table(jobs: list[Job], cached: int) -> str:
    """What ran, was cached or failed, with wall times, per notebook and in total."""
    lines = [f"{'notebook':<34} {'status':<7} {'ran':>4} {'failed':>6} {'runs s':>8} {'exec s':>7}"]
    for job in jobs:
        ran = sum(st == "ran" for _, st, _ in job.ran)
        bad = sum(st == "failed" for _, st, _ in job.ran)
        lines.append(f"{job.name():<34} {job.status:<7} {ran:>4} {bad:>6} {job.runs_s:>8.0f} {job.execute_s:>7.0f}")
    total = sum(j.runs_s + j.execute_s for j in jobs)
    ran = sum(st == "ran" for j in jobs for _, st, _ in j.ran)
    bad = sum(st == "failed" for j in jobs for _, st, _ in j.ran)
    passed = sum(j.status == "passed" for j in jobs)
    lines.append(f"runs: {ran} computed, {cached} cached, {bad} failed | notebooks: {passed} of {len(jobs)} passed | "
                 f"wall {total / 60:.1f} min")
    return "\n".join(lines)


def write_summary(jobs: list[Job], tier: str, outputs: Path, cached: int, name: str = "batch") -> Path:
    """``OUTPUTS/<tier>/<name>.json`` (``batch.json`` for the main job, ``batch-<notebooks>.json`` for
    a batch of some notebooks): per notebook the status, runs computed and wall times."""
    path = outputs / tier_name(tier) / f"{name}.json"
    store.write_json_atomic(path, {
        "tier": tier, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": runs.code_hash(), "cached": cached,
        "jobs": [{"notebook": j.notebook, "model": j.model, "status": j.status, "error": j.error,
                  "runs_s": j.runs_s, "execute_s": j.execute_s,
                  "runs": [{"model": c.model, "run": c.label(), "status": st, "wall_s": s} for c, st, s in j.ran]}
                 for j in jobs]})
    return path
