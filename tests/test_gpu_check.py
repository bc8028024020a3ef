"""The GPU check (benchmarks/gpu_check.py) runs end to end at toy widths on CPU, so that the command a
person with a GPU for ten minutes runs (`repro bench gpu --device cuda`) is known to execute."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess
ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_section_at_toy_widths_on_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT / "benchmarks", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading in ("## 1. bf16 matmul", "## 2. GPTQ memory", "## 3-4. Evaluation and QAFT throughput",
                    "## 5. The paper tier's protocol", "## 6. FSDP"):
        assert heading in out
    assert "predicted (solve_memory, largest block)" in out and "tokens/s" in out
    assert "| gpt2 rtn int4 |" in out and "FAILED" not in out
    assert "FSDP x 2 vs one process" in out and "held 50% of the stack" in out and "unsharded: True" in out
