"""Time one QAFT training step with fake-quant against the same step without it.

Both modes run the step of ``repro.methods.qaft`` on the same batch: forward (optionally under
bf16 autocast), next-token NLL, backward, AdamW step on the stack's linear weights only (all
other parameters frozen). "plain" is ordinary fine-tuning of those weights; "fake-quant" has them
behind ``repro.quant.prepare``'s parametrization (quantize in the forward pass, STE backward).
The modes alternate in rounds and the median step time of each is reported (wall clock and
process CPU time), with the ratio fake-quant / plain (target: <= 1.10), and each mode's peak memory
above the step's start (``torch.cuda.max_memory_allocated`` on a GPU; on CPU the resident set sampled
by ``blockwise_memory.PeakRSS``). ``--gradient-checkpointing`` turns on QAFT's option of that name
in both modes.

    python benchmarks/qaft_bench.py                         # embedded SmolLM2-135M, CPU
    python benchmarks/qaft_bench.py --arch gpt2-xl --seq-len 1024 --device cuda   # paper sizes
    python benchmarks/qaft_bench.py --seq-len 512 --gradient-checkpointing        # activations recomputed

``--arch`` other than the embedded model builds a randomly initialised model of that shape from
its config (no download; step time does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn.utils import parametrize

from blockwise_memory import measure_peak
from repro import data as data_mod
from repro import models
from repro.evaluate import sequence_nll
from repro.methods.qaft import keep_freed_memory
from repro.quant import fp_weight, prepare

# (n_embd, n_layer, n_head) of the GPT-2 family, for random-weight models of the paper's sizes.
GPT2_SHAPES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
               "gpt2-xl": (1600, 48, 25)}


def build(arch: str, device: str, seq_len: int, batch_size: int, seed: int):
    """The model and one batch ``[batch_size, seq_len]`` of token ids."""
    if arch in models.EMBEDDED:
        model, tokenizer = models.load_model(arch, device=device)
        data = data_mod.make_data(tokenizer, seq_len=seq_len, n_calibration=batch_size, n_eval=1, seed=seed,
                                  model_max=models.max_length(model))
        return model, data.calibration
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, n_head = GPT2_SHAPES[arch]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)).to(device)
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    return model, batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(model, batch, optimizer, steps: int, autocast, device: str) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of ``steps`` training steps (the QAFT loop body).

    CPU time is what the step costs this process; on a shared machine it is the steadier of the
    two (other processes inflate wall time, not CPU time, especially with ``--threads 1``).
    """
    times = []
    for _ in range(steps):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            loss_sum, n_tokens = sequence_nll(model, batch)
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=models.DEFAULT_MODEL,
                        choices=sorted(models.EMBEDDED) + sorted(GPT2_SHAPES),
                        help="embedded model (real weights) or a GPT-2 shape with random weights")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (paper: 1)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--observer", default="minmax")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations plain / fake-quant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block's activations in backward (QAFT option gradient_checkpointing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc as it is (QAFT on CPU calls keep_freed_memory, as this does)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = torch.device(args.device).type == "cpu" and not args.malloc_default and keep_freed_memory()

    model, batch = build(args.arch, args.device, args.seq_len, args.batch_size, args.seed)
    model.train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = batch.to(args.device)
    linears = models.stack_linears(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    # The latent weights are the same Parameter objects in both modes (the parametrization keeps
    # the original), so one optimizer serves both and neither mode pays for a cold optimizer.
    params = [m.weight for m in linears.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    scales = prepare(models.stack_linears(model), args.bits, args.observer)
    assert all(fp_weight(m) is p for m, p in zip(linears.values(), params))
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.mixed_precision == "bf16")

    def set_mode(fake_quant: bool) -> None:
        if fake_quant:
            prepare(models.stack_linears(model), args.bits, args.observer, scales=scales)  # same fixed scales every time
        else:
            for m in linears.values():
                if parametrize.is_parametrized(m, "weight"):
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)

    times = {"plain": [], "fake-quant": []}
    for mode in times:
        set_mode(mode == "fake-quant")
        time_steps(model, batch, optimizer, args.warmup, autocast, args.device)
    for _ in range(args.rounds):
        for mode in times:
            set_mode(mode == "fake-quant")
            times[mode] += time_steps(model, batch, optimizer, args.steps, autocast, args.device)

    peak_mb = {}
    for mode in times:  # one more step per mode, its peak memory above the memory at its start
        set_mode(mode == "fake-quant")
        _, extra = measure_peak(lambda: time_steps(model, batch, optimizer, 1, autocast, args.device), args.device)
        peak_mb[mode] = extra / 2**20

    wall = {mode: statistics.median(w for w, _ in t) for mode, t in times.items()}
    cpu = {mode: statistics.median(c for _, c in t) for mode, t in times.items()}
    result = {
        "arch": args.arch, "device": args.device, "threads": torch.get_num_threads(),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "bits": args.bits,
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "keep_freed_memory": bool(kept),
        "plain_peak_mb": peak_mb["plain"], "fake_quant_peak_mb": peak_mb["fake-quant"], "steps_per_mode": len(times["plain"]),
        "stack_params": models.stack_param_count(model),
        "plain_step_s": wall["plain"], "fake_quant_step_s": wall["fake-quant"],
        "ratio": wall["fake-quant"] / wall["plain"],
        "plain_step_cpu_s": cpu["plain"], "fake_quant_step_cpu_s": cpu["fake-quant"],
        "ratio_cpu_time": cpu["fake-quant"] / cpu["plain"],
    }
    print(f"{args.arch} on {args.device} ({result['threads']} threads), batch {args.batch_size} x "
          f"{args.seq_len} tokens, int{args.bits}, mixed precision {args.mixed_precision}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, malloc {'keeps freed memory' if kept else 'default'}, "
          f"{result['steps_per_mode']} timed steps per mode (median):")
    print("                     wall s/step   process CPU s/step   step peak MB")
    print(f"  plain fine-tuning  {wall['plain']:11.4f}   {cpu['plain']:18.4f}   {peak_mb['plain']:12.0f}")
    print(f"  fake-quant (QAFT)  {wall['fake-quant']:11.4f}   {cpu['fake-quant']:18.4f}   {peak_mb['fake-quant']:12.0f}")
    print(f"  ratio              {result['ratio']:10.3f}x   {result['ratio_cpu_time']:17.3f}x   (target <= 1.10x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
