"""Multi-process QAFT: `accelerate launch --config_file configs/accelerate/ddp.yaml` with 2 processes
(on CPU: gloo, DDP) and `torchrun --nproc-per-node 2` with ``sharding: fsdp`` (FSDP2) each give the
single-process result on the same global batch, and a launch killed mid-sweep resumes from its saved
state."""
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
FSDP_TIER = CONFIG.parent.parent / "qaft_fsdp.yaml"  # the README's torchrun command's tier


def launch(out: Path, checkpoint: Path, sharding: str, *extra: str) -> subprocess.CompletedProcess:
    """2 processes x 1 sequence per step = the single process's 2 sequences per step; DDP through
    accelerate's launcher and the README's config, FSDP through torchrun (the README's command)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if sharding == "fsdp":
        launcher = ["torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    else:
        launcher = ["accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
                    "--dynamo_backend", "no", "--main_process_port", str(port)]
    command = [sys.executable, "-m", *launcher, str(HELPER), str(out), str(checkpoint), "1", sharding, *extra]
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
    assert result["info"]["processes"] == 2 and info["processes"] == 1 and result["plain"]
    if result["info"]["sharding"] == "fsdp":  # each of the 2 processes held half the stack while training
        assert result["share"] == pytest.approx(0.5, abs=0.01)
    assert result["info"]["steps_per_epoch"] == info["steps_per_epoch"] == 4
    assert info["best_epoch"] > 0  # trained weights are compared, not RTN
    for h, h_ref in zip(result["info"]["runs"][0]["history"], info["runs"][0]["history"]):
        assert h["nll_validation"] == pytest.approx(h_ref["nll_validation"], abs=1e-4)
        assert h["nll_test"] == pytest.approx(h_ref["nll_test"], abs=1e-4)
    differ = sum(int((torch.tensor(result["weights"][n]) != w).sum()) for n, w in weights.items())
    assert differ <= 0.01 * sum(w.numel() for w in weights.values())  # float rounding may flip a few codes


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_process_qaft_equals_the_single_process_run(tmp_path, single, sharding):
    done = launch(tmp_path / "out.json", tmp_path / "ck", sharding)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_result(json.loads((tmp_path / "out.json").read_text()), single)


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_a_killed_two_process_launch_resumes(tmp_path, single, sharding):
    killed = launch(tmp_path / "out.json", tmp_path / "ck", sharding, "interrupt")
    assert killed.returncode != 0 and (tmp_path / "ck" / "state.pt").exists()
    assert not (tmp_path / "out.json").exists()
    resumed = launch(tmp_path / "out.json", tmp_path / "ck", sharding)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["info"]["resumed_from"] == {"lr_index": 0, "epoch": 1}
    assert_same_result(result, single)


def test_the_fsdp_tier_is_the_paper_tier_with_sharded_fine_tuning():
    """The README's 8-GPU command: QAFT and FPFT (QAFT's options) shard; everything else is the paper's."""
    from repro.config import load_tier, make_config

    fsdp, paper = load_tier(str(FSDP_TIER)), load_tier("paper")
    for method in ("qaft", "fpft"):
        config = make_config(method, 4 if method == "qaft" else None, str(FSDP_TIER), model="meta-llama/Llama-2-7b-hf")
        assert config.options["sharding"] == "fsdp"
        assert {k: v for k, v in config.options.items() if k != "sharding"} == \
            make_config(method, 4 if method == "qaft" else None, "paper", model="meta-llama/Llama-2-7b-hf").options
    assert {k: v for k, v in fsdp.items() if k != "methods"} == {k: v for k, v in paper.items() if k != "methods"}
