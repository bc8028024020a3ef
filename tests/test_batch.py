"""The main job's batch runner and notebook 02's papermill forms, on the ci tier (real models)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro import batch, runs, store
from repro.config import load_tier, make_config
from repro.studies import Notebook

ROOT = Path(__file__).resolve().parent.parent
REPRO = [sys.executable, "-m", "repro.cli"]


def test_plan_covers_every_notebook_and_model():
    jobs = batch.plan("ci")
    models = load_tier("ci")["models"]
    assert len(models) == 2
    assert [j.name() for j in jobs if j.notebook == "00_quickstart"] == [f"00_quickstart-{m}" for m in models]
    (pareto,) = [j for j in jobs if j.notebook == "02_pareto"]
    assert pareto.model is None and {c.model for c in pareto.configs} == set(models)
    assert {c.method for c in pareto.configs} == {"fp", "rtn", "gptq", "qaft"}
    landscape_models = load_tier("ci")["landscape"]["models"]
    assert [j.model for j in jobs if j.notebook == "03_landscape"] == landscape_models
    with pytest.raises(ValueError, match="unknown notebook"):
        batch.plan("ci", ["99_missing"])
    # `repro batch --bits 2`: every notebook's widths, a section's own included (08's block-wise
    # locality pair keeps its section's width, as the notebook does)
    narrow = batch.plan("ci", ["00_quickstart", "04_cross_block", "05_datasets", "08_granularity"], ["smollm2-135m"], [2])
    assert {c.bits for j in narrow for c in j.configs if c.bits is not None
            and not (j.notebook == "08_granularity" and c.method == "blockwise")} == {2}
    with pytest.raises(ValueError, match="bits=9"):
        batch.plan("ci", ["01_misalignment"], bits=[9])


def _records(outputs: Path) -> dict:
    return {p.relative_to(outputs): p.read_bytes() for p in sorted((outputs / "records").rglob("*.json"))}


# RTN's observers, cheapest first: 0.8, 3 and 9 s of scale search on SmolLM2 at the ci tier (then ~8 s of evaluation)
OBSERVER_COST = ("minmax", "histogram", "mse")


def _cheapest(configs, k: int = 1) -> list:
    """``k`` distinct RTN runs of ``configs``, cheapest observer first (seconds each, where GPTQ and QAFT
    take minutes)."""
    rtn = {c.key(): c for c in configs if c.method == "rtn"}.values()
    return sorted(rtn, key=lambda c: OBSERVER_COST.index(c.observer))[:k]


@pytest.mark.embedded
@pytest.mark.subprocess
def test_batch_killed_after_the_first_notebook_resumes(tmp_path, seed_records):
    """kill -9 after the first notebook: the rerun computes only what was missing, reads the rest,
    and every record written before the kill (the batch's own and those it found) is left byte for
    byte as it was. Both notebooks' runs but one of each come from the session's records."""
    env = {**os.environ, "REPRO_OUTPUTS": str(tmp_path), "REPRO_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    command = [*REPRO, "batch", "--tier", "ci", "00_quickstart", "08_granularity", "--models", "smollm2-135m"]
    first_job, second_job = batch.plan("ci", ["00_quickstart", "08_granularity"], ["smollm2-135m"])
    left = _cheapest(first_job.configs) + _cheapest(c for c in second_job.configs if c not in first_job.configs)
    seed_records(tmp_path, [c for c in first_job.configs + second_job.configs if c not in left])
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    first = []
    for line in proc.stdout:
        first.append(line)
        if line.startswith("notebook 00_quickstart-"):  # the first of the two notebooks is done
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(first)
    before = _records(tmp_path)
    assert store.record_path(left[0], tmp_path).relative_to(tmp_path) in before, "".join(first)  # its own

    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header = done.stdout.splitlines()[0]
    cached = int(header.split(" cached")[0].rsplit(" ", 1)[1])
    assert cached == len(before) > 0, header
    after = _records(tmp_path)
    assert all(after[path] == content for path, content in before.items())  # untouched
    assert len(after) > len(before)
    summary = json.loads((tmp_path / "ci" / "batch-00_quickstart+08_granularity.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["passed", "passed"]
    assert not (tmp_path / "ci" / "batch.json").exists()  # the main job's summary is not overwritten
    assert all((tmp_path / "ci" / "notebooks" / f"{n}-smollm2-135m.ipynb").is_file()
               for n in ("00_quickstart", "08_granularity"))
    assert not list((tmp_path / "ci" / "notebooks").glob(".*partial"))


def _numbers(outputs: Path) -> dict:
    """Each record's key and results (test and validation NLL, layer MSE), no timings."""
    out = {}
    for path in sorted((outputs / "records").rglob("*.json")):
        r = json.loads(path.read_text())
        out[path.relative_to(outputs)] = (r["key"], r["nll_test"], r["nll_validation"], r["layer_mse"])
    return out


@pytest.mark.embedded
@pytest.mark.subprocess
def test_two_shards_in_two_processes_equal_the_unsharded_batch(tmp_path, seed_records):
    """`repro batch --shard 1/2` and `--shard 2/2` at the same time on one outputs/ compute the
    same records as one process (the session's, from `repro.runs.run` at the tier's thread count),
    each exactly once, and execute no notebook; the unsharded batch after them finds nothing to
    compute and executes it. Each shard has one or two RTN runs to compute (which runs a shard holds
    follows from their record keys); the rest of notebook 00's runs come from the session's records."""
    base = [*REPRO, "batch", "--tier", "ci", "00_quickstart", "--models", "smollm2-135m"]
    env = {**os.environ, "REPRO_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    (job,) = batch.plan("ci", ["00_quickstart"], ["smollm2-135m"])
    per_shard = [_cheapest([c for c in job.configs if batch.in_shard(c, (k, 2))], 2) for k in (1, 2)]
    assert all(per_shard), "a shard holds no RTN run of notebook 00: the test needs work on both"
    left = [c for shard in per_shard for c in shard]
    seed_records(shared, [c for c in job.configs if c not in left])
    seed_records(alone, job.configs)
    procs = [subprocess.Popen([*base, "--shard", f"{k}/2"], env={**env, "REPRO_OUTPUTS": str(shared)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) for k in (1, 2)]
    logs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    computed = [int(log.split(" to compute")[0].rsplit(" ", 1)[1]) for log in logs]
    assert computed == [len(shard) for shard in per_shard], logs  # both shards had work
    assert not (shared / "ci" / "notebooks").exists() and not (shared / "ci" / "batch.json").exists()
    assert _numbers(shared) == _numbers(alone) and len(_numbers(alone)) == len({store.record_path(c) for c in job.configs})
    final = subprocess.run(base, env={**env, "REPRO_OUTPUTS": str(shared)}, capture_output=True, text=True, cwd=ROOT)
    assert final.returncode == 0 and " 0 to compute" in final.stdout.splitlines()[0], final.stdout[-2000:]
    assert (shared / "ci" / "notebooks" / "00_quickstart-smollm2-135m.ipynb").is_file()


def test_a_bad_shard_is_refused():
    for text in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(ValueError, match="K/N"):
            batch.parse_shard(text)
    assert batch.parse_shard("2/8") == (2, 8)


@pytest.mark.embedded
@pytest.mark.subprocess
def test_pareto_notebook_runs_as_typed_from_root_and_from_notebooks(tmp_path):
    """`papermill notebooks/02_pareto.ipynb -p bits 3` with no output notebook, from a checkout's
    root, then the form with an output notebook from notebooks/: both write the figure and table
    to the checkout's outputs/ (no REPRO_OUTPUTS), the second reading the first's records."""
    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "02_pareto.ipynb", checkout / "notebooks")
    shutil.copy(ROOT / "pyproject.toml", checkout)
    if os.environ.get("REPRO_OUTPUTS"):  # under `make test`: share records with nbval's run of 02
        (checkout / "outputs").mkdir()
        Path(os.environ["REPRO_OUTPUTS"], "records").mkdir(parents=True, exist_ok=True)
        (checkout / "outputs" / "records").symlink_to(Path(os.environ["REPRO_OUTPUTS"], "records"))
    env = {k: v for k, v in os.environ.items() if k != "REPRO_OUTPUTS"}
    env["REPRO_PROGRESS"] = "0"
    papermill = [sys.executable, "-m", "papermill"]
    first = subprocess.run([*papermill, "notebooks/02_pareto.ipynb", "-p", "bits", "3"], cwd=checkout, env=env,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    outputs = checkout / "outputs"
    table = (outputs / "tables" / "pareto_ci.md").read_text()
    assert (outputs / "figures" / "pareto_ci.png").stat().st_size > 10_000
    assert "int3" in table or "| 3 " in table
    records = _records(outputs)
    made = [r["config"] for r in map(json.loads, records.values()) if "config" in r]  # (not landscape points)
    for model in load_tier("ci")["models"]:
        assert {(c["method"], c["bits"]) for c in made if c["model"] == model} >= {
            ("fp", None), ("rtn", 3), ("gptq", 3), ("qaft", 3)}

    second = subprocess.run([*papermill, "02_pareto.ipynb", str(tmp_path / "out.ipynb"), "-p", "bits", "3"],
                            cwd=checkout / "notebooks", env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    # read, not recomputed: every record the first run left is byte for byte the same (under `make test`
    # the other xdist worker may add records of its own to the shared directory meanwhile)
    now = _records(outputs)
    assert (tmp_path / "out.ipynb").is_file() and {p: now.get(p) for p in records} == records
    assert (outputs / "tables" / "pareto_ci.md").read_text() == table
    # a width papermill cannot read as a number arrives as text: named as typed, before any run
    typo = subprocess.run([*papermill, "02_pareto.ipynb", str(tmp_path / "typo.ipynb"), "-p", "bits", "five"],
                          cwd=checkout / "notebooks", env=env, capture_output=True, text=True)
    assert typo.returncode != 0 and "bits='five': give a width as an integer" in typo.stderr + typo.stdout


def test_a_failed_run_or_notebook_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    """Failures are reported in the final table and the exit status; the other notebooks still run."""
    from repro import cli

    def plan_of(bits):
        return lambda tier, model, widths: [make_config("rtn", bits, tier, model=model)]

    monkeypatch.setattr(batch, "NOTEBOOKS", {"a": Notebook("a", plan_of(4)), "b": Notebook("b", plan_of(3), per_model=False)})
    monkeypatch.setattr(batch, "check_hub", lambda configs, tier: None)  # models "x", "y" are stand-ins
    monkeypatch.setattr(runs, "run", lambda config, outputs: (_ for _ in ()).throw(RuntimeError("boom"))
                        if config.model == "x" else {"config": {}, "wall_s": {}})
    monkeypatch.setattr(runs, "summary", lambda record: "ok")
    executed = []
    monkeypatch.setattr(batch, "_execute", lambda job, *a: executed.append(job.name()))
    status = cli.main(["batch", "--tier", "ci", "--models", "x", "y", "--outputs", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert executed == ["a-y"]  # a-x and b lost a run; a-y ran
    assert "FAILED x rtn int4: RuntimeError: boom" in out and "notebooks: 1 of 3 passed" in out
    summary = json.loads((tmp_path / "ci" / "batch.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["failed", "passed", "failed"]


def test_paper_tier_offline_fails_at_once_listing_what_it_needs(tmp_path, monkeypatch):
    """No hub and nothing cached: one error before any run, naming every missing model and corpus
    and how to point HF_HOME at a pre-filled cache (not hundreds of failed runs)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(batch.HubUnavailableError) as err:
        batch.batch("paper", outputs=tmp_path / "out", echo=lambda *_: None)
    message = str(err.value)
    for needed in ("gpt2", "facebook/opt-125m", "meta-llama/Llama-2-7b-hf", "wikitext2", "c4", "lambada",
                   "HF_HOME", "HF_HUB_OFFLINE=1", "--tier cpu"):
        assert needed in message, needed
    assert "smollm2" not in message  # embedded models need nothing
    assert time.perf_counter() - start < 60 and not (tmp_path / "out" / "records").exists()


def test_a_claimed_run_is_skipped_by_other_workers(tmp_path):
    """`claim` is exclusive and does not wait: a second holder is told no while the first holds it."""
    path = tmp_path / "records" / "rtn" / "x.json"
    with batch.claim(path) as first:
        with batch.claim(path) as second:
            assert first and not second
    with batch.claim(path) as again:
        assert again


@pytest.mark.embedded
@pytest.mark.subprocess
def test_two_worker_processes_compute_each_run_once(tmp_path, seed_records):
    """`repro batch --processes 2`: two workers take the runs between them, each run is computed by
    exactly one of them, the records equal one process's (the session's, from `repro.runs.run` at the
    tier's thread count), and the parent executes the notebook after them with nothing left to compute;
    batch.json counts the workers' wall time once. Four RTN runs are left to compute; the rest come
    from the session's records."""
    base = [*REPRO, "batch", "--tier", "ci", "00_quickstart", "--models", "smollm2-135m"]
    env = {**os.environ, "REPRO_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    (job,) = batch.plan("ci", ["00_quickstart"], ["smollm2-135m"])
    left = _cheapest(job.configs, 4)
    seed_records(shared, [c for c in job.configs if c not in left])
    seed_records(alone, job.configs)
    done = subprocess.run([*base, "--processes", "2", "--outputs", str(shared)], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers = [json.loads(batch.worker_summary_path(shared, "ci", k).read_text()) for k in (1, 2)]
    computed = [r["run"] for w in workers for j in w["jobs"] for r in j["runs"] if r["status"] == "ran"]
    assert sorted(computed) == sorted(c.label() for c in left)  # each once, by one worker or the other
    summary = json.loads((shared / "ci" / "batch-00_quickstart.json").read_text())
    assert summary["processes"] == 2 and summary["workers_wall_s"] > 0 and summary["cached"] == len(
        {store.record_path(c) for c in job.configs}) - len(left)
    assert [j["status"] for j in summary["jobs"]] == ["passed"]
    assert sorted(r["run"] for r in summary["jobs"][0]["runs"]) == sorted(c.label() for c in left)
    assert "in 2 processes" in done.stdout
    assert _numbers(shared) == _numbers(alone)
