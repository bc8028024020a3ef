"""Multi-process QAFT: `accelerate launch --config_file configs/accelerate/ddp.yaml` with 2 processes
(on CPU: gloo, DDP) gives the single-process result on the same global batch, and a launch killed
mid-sweep resumes from its saved state."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.methods.qaft import qaft

from test_qaft import stack_state, tiny_config, tiny_data
from tiny_models import tiny_model

pytestmark = pytest.mark.subprocess
HELPER = Path(__file__).resolve().parent / "qaft_launch.py"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "ddp.yaml"  # the README's


def launch(out: Path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess:
    """2 processes x 1 sequence per step = the single process's 2 sequences per step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
               "--dynamo_backend", "no", "--main_process_port", str(port), str(HELPER), str(out), str(checkpoint), "1",
               *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    model = tiny_model("llama")
    info = qaft(model, tiny_data(), tiny_config(tmp_path_factory.mktemp("single") / "ck", batch_size=2,
                                                lr_grid=[1e-2]))
    return info, stack_state(model)


def assert_same_result(result: dict, single):
    info, weights = single
    assert result["info"]["processes"] == 2 and info["processes"] == 1
    assert result["info"]["steps_per_epoch"] == info["steps_per_epoch"] == 4
    assert info["best_epoch"] > 0  # trained weights are compared, not RTN
    for h, h_ref in zip(result["info"]["runs"][0]["history"], info["runs"][0]["history"]):
        assert h["nll_validation"] == pytest.approx(h_ref["nll_validation"], abs=1e-4)
        assert h["nll_test"] == pytest.approx(h_ref["nll_test"], abs=1e-4)
    differ = sum(int((torch.tensor(result["weights"][n]) != w).sum()) for n, w in weights.items())
    assert differ <= 0.01 * sum(w.numel() for w in weights.values())  # float rounding may flip a few codes


def test_two_process_qaft_equals_the_single_process_run(tmp_path, single):
    done = launch(tmp_path / "out.json", tmp_path / "ck")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_result(json.loads((tmp_path / "out.json").read_text()), single)


def test_a_killed_two_process_launch_resumes(tmp_path, single):
    killed = launch(tmp_path / "out.json", tmp_path / "ck", "interrupt")
    assert killed.returncode != 0 and (tmp_path / "ck" / "state.pt").exists()
    assert not (tmp_path / "out.json").exists()
    resumed = launch(tmp_path / "out.json", tmp_path / "ck")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["info"]["resumed_from"] == {"lr_index": 0, "epoch": 1}
    assert_same_result(result, single)
