"""Why the main job computes its runs in two one-thread processes (``processes: 2``, ``threads: 1`` in
``cpu.yaml``): the throughput of one process at two torch threads against two one-thread processes at
once, on the 2-core machine, for the two kinds of work a run does: an evaluation pass (validation NLL,
16 x 256 tokens; GEMM-bound) and GPTQ at int4 on the ci tier (Hessians, the column sweep).

    .venv/bin/python benchmarks/processes.py            # the table (about 4 minutes)

One process at two threads runs each job twice in a row; two processes at one thread run one each at
the same time. Runs are timed after a warm-up pass (the model loaded, kernels initialised).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

JOB = r"""
import json, sys, time, torch
from repro import evaluate, runs
from repro.config import make_config
from repro.methods import METHODS
torch.set_num_threads(int(sys.argv[1]))
repeats = int(sys.argv[2])
fp = runs.workbench(make_config("rtn", 4, "cpu"))
evaluate.nll(fp.model, fp.data.validation[:4], 4, desc=None)  # warm-up
out = {"nll": [], "gptq": []}
for _ in range(repeats):
    bench = runs.workbench(make_config("rtn", 4, "cpu"))
    t = time.perf_counter(); evaluate.nll(bench.model, bench.data.validation, 4, desc=None)
    out["nll"].append(time.perf_counter() - t)
    config = make_config("gptq", 4, "ci")
    bench = runs.workbench(config)
    t = time.perf_counter(); METHODS["gptq"].run(bench.model, bench.data, config)
    out["gptq"].append(time.perf_counter() - t)
print("RESULT " + json.dumps(out))
"""


def launch(threads: int, repeats: int) -> subprocess.Popen:
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "REPRO_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-c", JOB, str(threads), str(repeats)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env_threads})


def result(proc: subprocess.Popen) -> dict:
    out = proc.communicate()[0]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    start = time.perf_counter()
    one = result(launch(2, 2))
    pair = [result(p) for p in [launch(1, 1), launch(1, 1)]]
    print("| job | 1 process x 2 threads: two jobs in a row, s | 2 processes x 1 thread: two jobs at once, s | throughput |")
    print("| --- | --- | --- | --- |")
    for job in ("nll", "gptq"):
        serial, parallel = sum(one[job]), max(p[job][0] for p in pair)
        print(f"| {job} | {serial:.1f} | {parallel:.1f} | {serial / parallel:.2f}x |")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
