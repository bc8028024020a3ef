"""GPTQ memory: ``repro.methods.gptq.solve_memory``'s prediction against a measured peak.

    .venv/bin/python benchmarks/gptq_memory.py                                   # SmolLM2, 32 and 128 x 256 tokens
    .venv/bin/python benchmarks/gptq_memory.py --n-calibration 32 64 128 --seq-len 512

Runs ``repro.methods.gptq.gptq`` on the whole model once per calibration size and measures its
peak memory above the loaded model and data: on a GPU ``torch.cuda.max_memory_allocated``
(the activations then wait on CPU, so the prediction leaves them out); on CPU the bytes malloc
has handed out (``PeakMalloc`` of ``blockwise_memory.py``, glibc's ``mallinfo2``: allocated,
not cached) and, for reference, the resident set (``PeakRSS``), which also holds freed memory
glibc keeps. The prediction is the largest block's ``solve_memory`` from the record's own
layer shapes and shared Hessians. Growing the calibration set should move both by the
activations term alone.
"""
from __future__ import annotations

import torch
from blockwise_memory import PeakMalloc, PeakRSS, measure_peak, memory_parser

from repro import data as data_mod
from repro import models
from repro.methods.gptq import gptq, gptq_options, solve_memory
from repro.config import make_config


def predicted(model, info: dict, tokens: int, k: int, grid_size: int, offloaded: bool) -> dict:
    """The largest block's ``solve_memory`` terms (bytes)."""
    prefix = models.block_path(model)
    readers = {}  # block index -> {in-block name: the in-block name whose Hessian it used}
    for name, layer in info["layers"].items():
        index, own = name[len(prefix) + 1:].split(".", 1)
        readers.setdefault(index, {})[own] = layer["hessian_from"][len(prefix) + 1:].split(".", 1)[1]
    best = None
    for index, block in enumerate(models.blocks(model)):
        shapes = {name: tuple(models.weight_matrix(m).shape) for name, m in models.block_linears(block).items()}
        terms = solve_memory(shapes, readers[str(index)], 0 if offloaded else tokens, model.config.hidden_size, k,
                             grid_size)
        best = terms if best is None or terms["total"] > best["total"] else best
    return best


def main() -> None:
    parser = memory_parser(__doc__)
    parser.add_argument("--n-calibration", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    model, tokenizer = models.load_model(args.model, device=args.device)
    snapshot = models.fp_snapshot(model)
    cuda = args.device.startswith("cuda")
    print(f"{args.model} int{args.bits}, GPTQ ({args.tier} tier options), {args.device}, torch {torch.__version__}")
    print(f"{'tokens':>7} {'activations':>12} {'hessians':>9} {'search':>7} {'predicted MB':>13} "
          f"{'measured MB':>12} {'ratio':>6} {'RSS MB':>7} {'wall s':>7}")
    for n in args.n_calibration:
        models.restore(model, snapshot)
        config = make_config("gptq", args.bits, args.tier, model=args.model, n_calibration=n, seq_len=args.seq_len)
        data = data_mod.make_data(tokenizer, config.corpus, config.seq_len, n, 1, config.seed,
                                  model_max=models.max_length(model))
        opts = gptq_options(config)
        with PeakRSS() as rss:  # for reference; measured by malloc's own count on CPU
            info, measured = measure_peak(lambda: gptq(model, data, config), args.device, PeakMalloc)
        tokens = n * args.seq_len
        grid_size = len(opts["damping_grid"])
        terms = predicted(model, info, tokens, opts["search_batch"] or grid_size, grid_size, offloaded=cuda)
        print(f"{tokens:>7} {terms['activations'] / 1e6:>12.1f} {terms['hessians'] / 1e6:>9.1f} "
              f"{terms['search'] / 1e6:>7.1f} {terms['total'] / 1e6:>13.1f} {measured / 1e6:>12.1f} "
              f"{measured / terms['total']:>6.2f} {rss.extra / 1e6 if not cuda else float('nan'):>7.1f} "
              f"{sum(info['wall_s'].values()):>7.1f}", flush=True)
    # the same terms at paper scale: Llama-2-7B's block (its config: hidden 4096, MLP 11008), 128 x 4096
    # calibration tokens, the 8-point grid solved at once
    hidden, mlp = 4096, 11008
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden),
              "down_proj": (hidden, mlp)}
    readers = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    terms = solve_memory(shapes, readers, 128 * 4096, hidden, 8)
    print("Llama-2-7B, 128 x 4096 tokens, 8 dampings at once: "
          + ", ".join(f"{key} {value / 1e9:.1f} GB" for key, value in terms.items()))
    pairs = solve_memory(shapes, readers, 128 * 4096, hidden, 2, grid_size=8)
    print(f"  with search_batch 2: search {pairs['search'] / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
