"""QAFT on a tiny Llama, run by tests/test_qaft_ddp.py under `accelerate launch` or `torchrun` (several
processes).

Usage: qaft_launch.py OUT.json CHECKPOINT_DIR BATCH_SIZE SHARDING [interrupt]. SHARDING is the QAFT
option (none: DDP; fsdp: FSDP2); QAFT_LAUNCH_DEVICE=cuda puts each process on its own GPU (default CPU;
benchmarks/gpu_check.py). Rank 0 writes the result and
the trained stack weights to OUT.json; with ``interrupt`` the launch dies right after the first
resume state is saved (as a killed job would), so the next launch resumes from it.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_qaft import qaft_mod, stack_state, tiny_config, tiny_data  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

out, checkpoint, batch_size, sharding = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if sys.argv[5:] == ["interrupt"]:
    save_state = qaft_mod.save_state

    def save_then_die(path, state):
        save_state(path, state)
        os._exit(3)  # the whole launch goes down with this process, as under a scheduler's kill

    qaft_mod.save_state = save_then_die
held = {}  # the share of the stack's parameters this process holds while training
shard_linears = qaft_mod.shard_linears


def shard_and_measure(linears, device):
    shard_linears(linears, device)
    params = [p for m in linears.values() for p in m.parameters()]
    held["share"] = sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)


qaft_mod.shard_linears = shard_and_measure
model = tiny_model("llama")
if os.environ.get("QAFT_LAUNCH_DEVICE") == "cuda":
    model.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
info = qaft_mod.qaft(model, tiny_data(), tiny_config(checkpoint, batch_size=batch_size, lr_grid=[1e-2],
                                                                  sharding=sharding))
if int(os.environ.get("RANK", "0")) == 0:
    weights = {name: w.tolist() for name, w in stack_state(model).items()}
    plain = not any(hasattr(p, "device_mesh") for p in model.parameters())  # the model left unsharded
    Path(out).write_text(json.dumps({"info": info, "weights": weights, "plain": plain, **held}))
