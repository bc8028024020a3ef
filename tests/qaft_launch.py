"""QAFT on a tiny Llama, run by tests/test_qaft_ddp.py under `accelerate launch` (several processes).

Usage: qaft_launch.py OUT.json CHECKPOINT_DIR BATCH_SIZE [interrupt]. Rank 0 writes the result and
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

out, checkpoint, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if sys.argv[4:] == ["interrupt"]:
    save_state = qaft_mod.save_state

    def save_then_die(path, state):
        save_state(path, state)
        os._exit(3)  # the whole launch goes down with this process, as under a scheduler's kill

    qaft_mod.save_state = save_then_die
model = tiny_model("llama")
info = qaft_mod.qaft(model, tiny_data(), tiny_config(checkpoint, batch_size=batch_size, lr_grid=[1e-2]))
if int(os.environ.get("RANK", "0")) == 0:
    weights = {name: w.tolist() for name, w in stack_state(model).items()}
    Path(out).write_text(json.dumps({"info": info, "weights": weights}))
