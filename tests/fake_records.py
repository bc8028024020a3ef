"""Fake run records for the report, Pareto, plot and cross-block tests, and a markdown-table parser.

A fake record has the shape ``repro.runs`` writes, cut to what the readers under test look at:
``config`` {method, bits (None for FP), model, corpus, observer, granularity "tensor", group_size,
options}, ``nll_test``, ``nll_validation``, ``mean_block_output_mse`` (None unless given),
``wall_s`` {method, evaluate}, ``info`` and, when asked for, per-linear ``layer_mse`` and
``layer_mse_fp_inputs`` (half of own inputs) with their means, and ``versions`` {package, code}.
Any other field (``ppl_validation``, ``stack_params``, ``weight_size_gb``, ...) is passed through
and overrides what the factory computed. Each test module keeps its own numbers (NLL, MSE per
method and bits) in a small ``record`` wrapper that looks them up and calls ``fake_record``."""

LAYERS = ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj",
          "model.layers.1.mlp.down_proj")  # per-linear values are given in this order, as many as needed


def fake_record(method="rtn", bits=4, nll=4.0, *, val=None, model="m", corpus="wiki", observer="mse", options=None,
                layer_mse=None, block_mse=None, seconds=10.0, info=None, code=None, **fields):
    """A record of ``method`` at ``bits``: test NLL ``nll``, validation NLL ``val`` (default ``nll`` + 0.5),
    ``seconds`` of method wall time; ``layer_mse``: own-input MSE of the first linears of ``LAYERS``
    (None: no per-linear fields); ``block_mse``: ``mean_block_output_mse``; ``code``: ``versions`` (None: none)."""
    r = {"config": {"method": method, "bits": None if method in ("fp", "fpft") else bits, "model": model, "corpus": corpus,
                    "observer": observer, "granularity": "tensor", "group_size": 128, "batch_size": 4,
                    "options": dict(options or {})},
         "nll_test": nll, "nll_validation": nll + 0.5 if val is None else val,
         "mean_block_output_mse": block_mse, "wall_s": {"method": seconds, "evaluate": 1.0},
         "info": {} if info is None else info}
    if layer_mse is not None:
        assert len(layer_mse) <= len(LAYERS)
        for key, scale in (("layer_mse", 1.0), ("layer_mse_fp_inputs", 0.5)):
            r[key] = {name: scale * v for name, v in zip(LAYERS, layer_mse)}
            r[f"mean_{key}"] = sum(r[key].values()) / len(layer_mse) if len(layer_mse) else None
    if code is not None:
        r["versions"] = {"package": "0.1.0", "code": code}
    r.update(fields)
    return r


def sweep_records(make=fake_record, bits=(8, 4), methods=("rtn", "gptq", "qaft"), **kw):
    """FP, then each of ``methods`` at each of ``bits``: ``make(method, bits, **kw)`` (FP with bits None)."""
    return [make("fp", None, **kw)] + [make(m, b, **kw) for m in methods for b in bits]


def gptq_info(chosen, grid, losses, held_out=None, **info):
    """A GPTQ record's ``info``: ``layers`` {linear of ``LAYERS``, as many as ``chosen``: {damping it chose,
    ``losses`` {grid label g: losses(i, g)} and, unless ``held_out`` is None, ``held_out_losses``}};
    ``info`` adds other keys (e.g. ``options``)."""
    layers = {}
    for i, (name, damping) in enumerate(zip(LAYERS, chosen)):
        layers[name] = {"damping": damping, "losses": {g: losses(i, g) for g in grid}}
        if held_out is not None:
            layers[name]["held_out_losses"] = {g: held_out(i, g) for g in grid}
    return {**info, "layers": layers}


def qaft_info(rtn_val, runs, lr=1e-4, **info):
    """A QAFT record's ``info``: the chosen lr0 ``lr``, the RTN start's validation NLL and ``runs``
    {lr0: (best validation NLL, [test NLL at epoch 0, 1, ...])} as ``runs`` [{lr, best_nll_validation, history}]."""
    return {"lr": lr, **info, "rtn": {"nll_validation": rtn_val},
            "runs": [{"lr": lr0, "best_nll_validation": best,
                      "history": [{"epoch": e, "nll_test": t} for e, t in enumerate(tests)]}
                     for lr0, (best, tests) in runs.items()]}


def table_rows(markdown):
    """``(body, header)`` of the markdown table in ``markdown``: each row a list of its stripped cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[2:], cells[0]


def table_dict(markdown, key=1, named=False):
    """``(rows, header)`` of a markdown table keyed by its first cell (``key`` > 1: a tuple of the first
    ``key`` cells): each row its other cells, as a list or (``named``) {column: cell}; ``header``: the
    other columns' names."""
    body, header = table_rows(markdown)
    header = header[key:]
    return {(row[0] if key == 1 else tuple(row[:key])): dict(zip(header, row[key:])) if named else row[key:]
            for row in body}, header
