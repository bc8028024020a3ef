"""Compute the ``ci``-tier records the notebooks (under nbval) and the embedded tests read, once per
pytest run, before the tests: ``python tests/ci_records.py K N OUTPUTS`` computes the K-th of N
parts (``make test`` starts N = 2 at once, one per core, from ``conftest.py``).

The parts are balanced by an estimate of each run's cost (longest first onto the part with the
least so far), and each part runs its configs grouped by model and corpus (one load each), the runs
a fine-tuning starts from before it (its epoch 0 is their record's NLL, not evaluated again). Every
record is computed by ``repro.runs.run``, exactly as a test or a notebook kernel would compute it
(same tier, same pinned thread count), so whichever reads it gets what it would have computed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

# seconds per run at one thread on the 2-core machine (SmolLM2, measured 2026-12-07; Gemma 3's vocabulary costs ~1.8x)
COST = {"fp": 5, "rtn": 12, "gptq": 30, "qaft": 30, "fpft": 25, "blockwise": 65}
MODEL_FACTOR = {"gemma3-270m": 1.8}


def configs() -> list:
    """The runs of every notebook nbval executes, as it executes them: each per-model notebook with
    its default model (SmolLM2), the Pareto notebook over the tier's models."""
    from repro import batch
    from repro.config import load_tier
    from repro.studies import NOTEBOOKS

    per_model = [name for name, notebook in NOTEBOOKS.items() if notebook.per_model]
    default = load_tier("ci")["model"]
    jobs = batch.plan("ci", per_model, [default]) + batch.plan("ci", [n for n in NOTEBOOKS if n not in per_model])
    unique = {}
    for job in jobs:
        for config in job.configs:
            unique.setdefault(config.key(), config)
    return list(unique.values())


def cost(config) -> float:
    return COST.get(config.method, 30) * MODEL_FACTOR.get(config.model, 1.0)


def part(all_configs: list, k: int, n: int) -> list:
    """The K-th of N parts: longest-processing-time-first onto the least loaded part. A fine-tuning and
    the run it reads its epoch 0 from (``repro.runs.epoch0_config``) go to one part, that run first."""
    from repro.runs import epoch0_config

    keys = {c.key() for c in all_configs}
    unit_of = {c.key(): (start.key() if (start := epoch0_config(c)) and start.key() in keys else c.key())
               for c in all_configs}
    units = {}
    for config in all_configs:
        units.setdefault(unit_of[config.key()], []).append(config)
    loads, parts = [0.0] * n, [[] for _ in range(n)]
    for unit in sorted(units.values(), key=lambda u: (-sum(map(cost, u)), u[0].key())):
        i = loads.index(min(loads))
        parts[i] += unit
        loads[i] += sum(map(cost, unit))
    return sorted(parts[k - 1], key=lambda c: (c.model, c.corpus, epoch0_config(c) is not None, -cost(c)))


def main(k: int, n: int, outputs: Path) -> None:
    from repro import runs

    start = time.perf_counter()
    mine = part(configs(), k, n)
    for config in mine:
        runs.run(config, outputs)
    print(f"ci records part {k}/{n}: {len(mine)} runs in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
