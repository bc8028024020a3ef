"""Checked notebook outputs do not depend on the machine's thread count: the embedded tiers pin
torch's threads while computing (the tier's ``threads``, ``repro.runs.pinned_threads``), so a notebook
executed with OMP_NUM_THREADS=2 computes the records one executed with 1 computes, to the last digit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repro import runs, store
from repro.config import load_tier, make_config

ROOT = Path(__file__).resolve().parent.parent


def checked_outputs(notebook: Path) -> list[str]:
    """The text of every ``# NBVAL_CHECK_OUTPUT`` cell's outputs (what nbval compares)."""
    cells = json.loads(notebook.read_text())["cells"]
    return ["".join("".join(o.get("text", "")) or "".join(o.get("data", {}).get("text/plain", ""))
                    for o in c["outputs"])
            for c in cells if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]


@pytest.mark.embedded
@pytest.mark.subprocess
def test_quickstart_at_two_threads_computes_the_records_of_one_thread(tmp_path, ci_outputs):
    """Notebook 00 at int3 with the mse observer, executed with OMP_NUM_THREADS=2 into a fresh results
    directory, computes records equal to the session's (computed at one thread, ``tests/ci_records.py``)
    in every number, so it prints the same. Measured unpinned, RTN int3's validation NLL reads 14.119
    at 2 threads and 14.103 at 1 (the observer's float32 sum over a whole tensor is split by thread and
    picks another scale for 14 of 210 tensors)."""
    pinned = load_tier("ci")["threads"]
    configs = [make_config("fp", None, "ci"), make_config("rtn", 3, "ci")]
    assert configs[1].threads == pinned and configs[1].observer == "mse"
    out = tmp_path / "outputs"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "REPRO_OUTPUTS": str(out),
           "REPRO_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-m", "papermill", "00_quickstart.ipynb", str(tmp_path / "00.ipynb"),
                           "-y", "{bits: [3], observers: [mse]}", "--log-level", "WARNING"],
                          cwd=ROOT / "notebooks", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "int3" in checked_outputs(tmp_path / "00.ipynb")[0]
    assert len(list((out / "records").rglob("*.json"))) == len(configs)  # the notebook computed these two
    volatile = ("wall_s", "created", "cached")
    for config in configs:
        one = runs.run(config, ci_outputs)  # the session's, at one thread (computed here if no one has yet)
        two = store.read_record(config, out)
        assert two["environment"]["threads"] == pinned  # whatever the machine's
        assert {k: v for k, v in two.items() if k not in volatile} == {k: v for k, v in one.items() if k not in volatile}
