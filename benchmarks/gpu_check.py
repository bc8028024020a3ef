"""The GPU check: does the paper tier work on this GPU, and how fast? One command, no hub access,
about 8 minutes on one H100/H200 (`repro bench gpu --device cuda`; `--tiny` runs every section at
toy widths, on CPU too, which is what tests/test_gpu_check.py does):

1. matmul: the bf16 TFLOP/s of a large square matmul (the achievable peak here), next to the card's
   nominal dense bf16 peak where this script knows it.
2. GPTQ at 7B widths: random Llama-2-7B blocks (hidden 4096, MLP 11008, 32 heads; `--blocks` of them),
   `--n-calibration` sequences of `--seq-len` tokens; the peak GPU memory above the model and data
   (`torch.cuda.max_memory_allocated`) against `repro.methods.gptq.solve_memory`'s prediction for the
   largest block (the calibration activations wait on CPU, so the prediction leaves them out).
3. Evaluation tokens/s of the same stack loaded in bf16, and its model FLOP/s (2 x weights x tokens,
   attention left out) as a fraction of section 1's measured peak.
4. QAFT tokens/s (fp32 latent weights, bf16 autocast, gradient checkpointing, batch 1), model FLOP/s
   counted as 8 x weights x tokens (forward, backward, the recomputed forward).
5. The paper tier's protocol on the tiny stand-ins of `tests/paper_standins.py` (offline Hugging Face
   caches): FP, RTN, GPTQ and QAFT (one epoch, one lr0: `--set`) at int4 on GPT-2 and Llama, on this
   device and on CPU; each record's test NLL on both, and the difference.
6. FSDP: QAFT with ``sharding: fsdp`` on a tiny Llama under ``torchrun`` over the GPUs present (one per
   process, NCCL), against the single-process run on the same global batch: validation NLL per epoch
   and the fraction of codes that differ. With fewer than 2 GPUs: 2 CPU processes (gloo), the same
   check tests/test_qaft_ddp.py makes.

Writes the report (markdown) to stdout; `repro bench` keeps it under OUTPUTS/bench/.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from gptq_memory import predicted  # noqa: E402

from repro import evaluate, models  # noqa: E402
from repro.config import RunConfig  # noqa: E402
from repro.methods.gptq import gptq, gptq_options  # noqa: E402
from repro.methods.qaft import discard_state, qaft  # noqa: E402

# dense bf16, data sheets; the first name contained in the device's name counts (PCIe/NVL before SXM)
NOMINAL_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 32000}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 512}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, repeats: int = 20) -> float:
    """Measured bf16 TFLOP/s of an n x n matmul."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def llama_stack(widths: dict, blocks: int, seq_len: int, dtype, device: str):
    """A random Llama of ``blocks`` decoder blocks at ``widths``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**widths, num_hidden_layers=blocks, num_key_value_heads=widths["num_attention_heads"],
                         max_position_embeddings=max(seq_len, 64))
    config.use_cache = False
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def sequences(n: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def gptq_section(args, widths) -> list[str]:
    model = llama_stack(widths, args.blocks, args.seq_len, torch.float32, args.device)
    calibration = sequences(args.n_calibration, args.seq_len, widths["vocab_size"])
    config = RunConfig(method="gptq", bits=4, observer="minmax", batch_size=4, device=args.device,
                       options={"damping_grid": [1e-2, 1e-1, 1.0], "holdout": 0.25})
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    info = gptq(model, types.SimpleNamespace(calibration=calibration), config)
    wall = time.perf_counter() - start
    opts = gptq_options(config)
    k = opts["search_batch"] or len(opts["damping_grid"])
    guess = predicted(model, info, calibration.numel(), k, len(opts["damping_grid"]), offloaded=cuda)
    lines = [f"{args.blocks} block(s) at hidden {widths['hidden_size']}, {calibration.numel()} calibration tokens, "
             f"{len(opts['damping_grid'])} dampings: {wall:.1f} s; predicted (solve_memory, largest block) "
             f"{guess['total'] / 2**20:.0f} MiB"]
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        lines.append(f"measured peak above model and data {peak / 2**20:.0f} MiB, measured / predicted "
                     f"{peak / guess['total']:.2f}")
    else:
        lines.append("measured peak: a GPU number only (torch.cuda.max_memory_allocated)")
    return lines


def throughput_section(args, widths, peak_tflops: float) -> list[str]:
    lines = []
    model = llama_stack(widths, args.blocks, args.seq_len, torch.bfloat16, args.device)
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    seqs = sequences(args.n_eval, args.seq_len, widths["vocab_size"], seed=1)
    evaluate.nll(model, seqs[:2], 2, desc=None)  # warm-up
    sync(args.device)
    start = time.perf_counter()
    evaluate.nll(model, seqs, args.batch_size, desc=None)
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = seqs.numel()
    flops = 2 * weights * tokens / seconds / 1e12
    lines.append(f"evaluation (bf16 weights, batch {args.batch_size}): {tokens / seconds:,.0f} tokens/s, "
                 f"{flops:.1f} model TFLOP/s = {flops / peak_tflops:.0%} of the measured matmul peak")
    del model
    model = llama_stack(widths, args.blocks, args.seq_len, torch.float32, args.device)
    warm = sequences(1, args.seq_len, widths["vocab_size"], 3).to(args.device)  # kernels and autocast, untimed
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
        evaluate.sequence_nll(model, warm)[0].backward()
    model.zero_grad(set_to_none=True)
    data = types.SimpleNamespace(calibration=sequences(args.qaft_steps, args.seq_len, widths["vocab_size"], 2),
                                 validation=seqs[:2], test=seqs[2:4])
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(method="qaft", bits=4, observer="minmax", batch_size=args.batch_size, device=args.device,
                           options={"epochs": 1, "lr_grid": [1e-5], "batch_size": 1, "mixed_precision": "bf16",
                                    "gradient_checkpointing": True, "checkpoint_dir": tmp})
        info = qaft(model, data, config, start_nll={"nll_validation": 0.0, "nll_test": 0.0})
        discard_state(config)
    step_tokens = args.seq_len
    flops = 8 * weights * step_tokens / info["step_s"] / 1e12
    lines.append(f"QAFT step (fp32 latent, bf16 autocast, checkpointing, batch 1 x {args.seq_len}): "
                 f"{step_tokens / info['step_s']:,.0f} tokens/s, {info['step_s']:.3f} s/step, {flops:.1f} model "
                 f"TFLOP/s = {flops / peak_tflops:.0%} of the measured matmul peak")
    return lines


def dry_run_section(args) -> list[str]:
    """The paper tier on the stand-ins, on this device and on CPU; test NLL per record on both."""
    sys.path.insert(0, str(ROOT / "tests"))
    import paper_standins

    methods = ["fp", "rtn", "gptq"] if args.tiny else ["fp", "rtn", "gptq", "qaft"]
    names = ["gpt2"] if args.tiny else ["gpt2", "meta-llama/Llama-2-7b-hf"]
    found = {}
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the subprocesses below share the GPU with this one
    with tempfile.TemporaryDirectory() as tmp:
        home = paper_standins.fill(Path(tmp) / "hf")
        for where in dict.fromkeys([args.device, "cpu"]):
            outputs = Path(tmp) / where.replace(":", "-")
            env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "REPRO_PROGRESS": "0"}
            for name in names:
                for method in methods:
                    bits = [] if method == "fp" else ["--bits", "4"]
                    command = [sys.executable, "-m", "repro.cli", "run", "--tier", "paper", "--model", name,
                               "--method", method, *bits, "--device", where, "--outputs", str(outputs),
                               "--set", "methods.qaft.epochs=1", "--set", "methods.qaft.lr_grid=[1.0e-4]"]
                    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
                    if done.returncode:
                        return [f"FAILED on {where}: {' '.join(command[2:])}\n{done.stderr[-1500:]}"]
            for path in sorted((outputs / "records").rglob("*.json")):
                record = json.loads(path.read_text())
                c = record["config"]
                label = f"{c['model']} {c['method']}" + (f" int{c['bits']}" if c["bits"] else "")
                found.setdefault(label, {})[where] = record["nll_test"]
    places = list(dict.fromkeys([args.device, "cpu"]))
    lines = ["| run | " + " | ".join(f"test NLL, {w}" for w in places) + " | difference |",
             "| --- " * (len(places) + 2) + "|"]
    for label, by in sorted(found.items()):
        values = [by.get(w) for w in places]
        diff = f"{values[0] - values[-1]:+.2e}" if None not in values else "—"
        lines.append(f"| {label} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in values) + f" | {diff} |")
    return lines


def fsdp_section(args) -> list[str]:
    """Sharded QAFT (2..8 processes) against one process on the same global batch (tests/qaft_launch.py)."""
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    processes, place = (min(gpus, 8), "cuda") if gpus >= 2 else (2, "cpu")
    helper = ROOT / "tests" / "qaft_launch.py"
    env = {**os.environ, "QAFT_LAUNCH_DEVICE": place, "OMP_NUM_THREADS": "1"}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher, batch, sharding in (
                ("one process", [], processes, "none"),
                (f"FSDP x {processes}", ["-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                                         "--master-port", str(port)], 1, "fsdp")):
            out = Path(tmp) / f"{sharding}.json"
            done = subprocess.run([sys.executable, *launcher, str(helper), str(out), str(Path(tmp) / sharding),
                                   str(batch), sharding], env=env, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                return [f"FAILED ({name} on {place}):\n{done.stderr[-1500:]}"]
            results[name] = json.loads(out.read_text())
    (one, ref), (many, sharded) = results.items()
    val = max(abs(a["nll_validation"] - b["nll_validation"])
              for a, b in zip(sharded["info"]["runs"][0]["history"], ref["info"]["runs"][0]["history"]))
    codes = [torch.tensor(w) for w in sharded["weights"].values()]
    differ = sum(int((c != torch.tensor(ref["weights"][n])).sum()) for n, c in zip(sharded["weights"], codes))
    return [f"tiny Llama on {place}: {many} vs {one}, global batch {processes}: largest validation-NLL "
            f"difference over the epochs {val:.1e} nats; {differ / sum(c.numel() for c in codes):.2%} of the "
            f"trained weights differ; each process held {sharded.get('share', float('nan')):.0%} of the stack "
            f"while training; the final model unsharded: {sharded['plain']}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy widths and sizes: checks the script, on any device")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--n-calibration", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--qaft-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    widths = TINY if args.tiny else LLAMA_7B
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))  # synchronize, memory stats and the name follow it
    if args.tiny:
        args.seq_len, args.n_calibration, args.n_eval, args.qaft_steps = 32, 8, 4, 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# GPU check: {name}, torch {torch.__version__}, {'tiny' if args.tiny else 'Llama-2-7B'} widths\n")
    started = time.perf_counter()
    peak = matmul_peak(args.device, 512 if args.tiny else 8192)
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    print(f"## 1. bf16 matmul\n\nmeasured {peak:.1f} TFLOP/s" +
          (f" = {peak / nominal:.0%} of the nominal {nominal:.0f} (dense)" if nominal else "") + "\n")
    for title, section in (("2. GPTQ memory", lambda: gptq_section(args, widths)),
                           ("3-4. Evaluation and QAFT throughput", lambda: throughput_section(args, widths, peak)),
                           ("5. The paper tier's protocol on the stand-ins, here and on CPU", lambda: dry_run_section(args))):
        section_start = time.perf_counter()
        print(f"## {title}\n\n" + "\n".join(section()) + f"\n\n({time.perf_counter() - section_start:.0f} s)\n", flush=True)
    section_start = time.perf_counter()
    print("## 6. FSDP\n\n" + "\n".join(fsdp_section(args)) + f"\n\n({time.perf_counter() - section_start:.0f} s)\n")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
