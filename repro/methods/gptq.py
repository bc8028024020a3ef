"""GPTQ (Frantar et al., 2023) with the low-precision PTQ paper's per-layer damping search.

For one linear layer with weight ``W`` [out, in] and calibration inputs ``x`` GPTQ minimises
the layer's output error ``||Q x - W x||^2`` over ``Q`` on the quantization grid, one input
column at a time: column ``j`` is rounded, and its rounding error is spread over the columns
not yet quantized through the inverse Hessian (optimal brain surgeon updates). The pieces,
as pure functions on tensors (usable without a model):

* ``accumulate_hessian(H, n, x)``  streamed ``H = 2/n sum_t x_t x_t^T`` over ``n`` input rows;
* ``hessian_factor(H, damping)``  upper ``A`` with ``A A^T = H + damping*mean(diag H) I`` (one Cholesky);
* ``gptq_quantize(W, H, scale, bits, damping, ...)`` one layer -> ``Q`` (lazy batched updates);
* ``layer_loss(dW, H)``            the layer's output MSE on the calibration inputs, from ``H``;
* ``damping_search(W, H, scale, bits, grid, H_held=...)`` the paper's change: solve at every
  damping value of ``grid`` with the same ``H``, keep the ``Q`` with the lowest ``layer_loss``;
  Cholesky failures are recorded and skipped, and if every value fails the layer falls back to
  RTN. The paper scores candidates on the ``H`` they were solved with; here, by default, they
  are scored out of sample: the driver holds out a fraction of the calibration sequences
  (option ``holdout``), solves the grid on the rest, picks the damping by the held-out
  ``layer_loss`` and solves once more at that damping with the Hessian of all sequences.

The grid is ``repro.quant``'s symmetric one. Per tensor (the paper's) and per channel its scales
come from the observer on the FP weight and stay fixed during the solve; per group
(``config.granularity == "group"``) each group's scales are set from its already-updated columns
when the sweep reaches it (``gptq_solve``), as the original GPTQ's ``groupsize`` option does. ``gptq(model, data, config)`` runs the whole
stack sequentially: block ``i`` is calibrated on the outputs of the already-quantized blocks
``0..i-1`` (IST-DASLab's driver: catch block 0's inputs, then Hessians -> solve -> propagate;
``repro.stack`` catches and replays each block's own arguments).

Memory, on top of the loaded model (``solve_memory`` gives each term; ``benchmarks/gptq_memory.py``
checks the sum against a measured peak): the calibration activations, ``tokens x hidden x 4 B``
(on CPU when the model is on an accelerator: ``repro.stack`` offloading), plus, for the block
being solved, its Hessians (``in^2 x 4 B`` per distinct input, for the fit and the held-out
tokens) and the largest layer's search: the whole grid's factors (``grid x in^2 x 4 B``, kept
for the other readers of the same input), and for the ``k`` = ``search_batch`` (default: the
whole grid) candidates solved at once their stacked and column-scaled factors (``2 k in^2 x 4 B``)
and four ``[k, in, out]`` sweep buffers (``4 k in out x 4 B``).
"""
from __future__ import annotations

import time
import warnings

import torch

from repro.evaluate import SharedInputs, check_sequences, forward_hooks
from repro.models import block_linears, block_path, blocks, weight_matrix
from repro.progress import progress
from repro.quant import Grid, compute_scale, is_int, is_real, positive_list, qmax, quantize, row_scales
from repro.stack import advance, capture, run_block

DAMPING_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
DEFAULTS = {"damping_grid": list(DAMPING_GRID), "block_size": 128, "act_order": False,
            "search_batch": None,  # grid points solved together (None: all; bounds memory)
            "holdout": 0.25}  # fraction of calibration sequences that score the damping candidates


# ----------------------------------------------------------------------------- pure functions
def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold the inputs ``x`` [..., in] of a layer into ``H`` (in place), a running mean over rows.

    ``H`` holds ``2/n * sum_t x_t x_t^T`` over the ``n`` input rows (tokens) seen so far; pass
    ``H=None, n=0`` to start. Returns ``(H, n)`` with ``n`` increased by the rows of ``x``.
    ``H`` is float32 (float64 if ``x`` is float64), on ``x``'s device.
    """
    x = x.reshape(-1, x.shape[-1])
    if H is None:
        H = torch.zeros(x.shape[-1], x.shape[-1], device=x.device,
                        dtype=torch.promote_types(x.dtype, torch.float32))
    m = x.shape[0]
    if m == 0:
        return H, n
    x = x.to(H.dtype)
    H.mul_(n / (n + m))
    n += m
    H.addmm_(x.t(), x, alpha=2 / n)
    return H, n


def layer_loss(delta_W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Output MSE of a weight change ``delta_W`` [..., out, in] on the inputs summarised by ``H``.

    With ``H = 2/n sum_t x_t x_t^T`` (``accumulate_hessian``, undamped):
    ``mean_{t, o} ((delta_W x_t)_o^2) = tr(delta_W H delta_W^T) / (2 * out)``, i.e. exactly
    the layer-wise MSE of ``repro.evaluate.layer_mse`` on the calibration inputs. Batched over
    leading dimensions; returns a tensor of the leading shape.
    """
    return ((delta_W @ H) * delta_W).sum(dim=(-2, -1)) / (2 * delta_W.shape[-2])


def hessian_factor(H: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper-triangular ``A`` [..., in, in] with ``A A^T = H + damping * mean(diag H) * I``.

    One Cholesky factorization of the index-reversed matrix (``J H J = L L^T`` gives
    ``A = J L J``) and no inverse: ``gptq_solve`` sweeps with ``A`` itself. IST-DASLab's
    reference needs the upper factor ``U`` of ``H^-1`` (``cholesky -> cholesky_inverse ->
    cholesky``), but ``U = A^-1``, and the sweep can be written with ``A`` (see
    ``gptq_solve``), which saves the O(in^3) inverse, the larger half of the factor's cost
    at in = 1536. Raises ``torch.linalg.LinAlgError`` when the damped ``H`` is not positive
    definite (or the factor is not finite).
    """
    ridge = damping * H.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)  # summed in H's own order
    H = H.flip(-2, -1)  # a copy, damped in place (reversing both indices keeps the diagonal's set)
    H.diagonal(dim1=-2, dim2=-1).add_(ridge)
    L, info = torch.linalg.cholesky_ex(H)
    if (info > 0).any():
        raise torch.linalg.LinAlgError(f"the damped Hessian is not positive-definite (its trailing "
                                       f"{int(info.max())} x {int(info.max())} block is not)")
    # a non-finite entry anywhere in L reaches a later diagonal entry (L_ii^2 = H_ii - sum_k L_ik^2)
    if not torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all():
        raise torch.linalg.LinAlgError(f"non-finite Cholesky factor at damping {damping:g}")
    return L.flip(-2, -1)


def _prepare(W: torch.Tensor, H: torch.Tensor, act_order: bool):
    """Working copies: dead inputs (diag H = 0) get H_jj = 1 and W[:, j] = 0; optional
    act-order permutes columns by decreasing diag H. Returns ``(W, H, perm or None)``."""
    work = torch.promote_types(W.dtype, torch.float32)
    W, H = W.to(work, copy=True), H.to(work, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[..., dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[..., perm], H[perm][:, perm]
    return W, H, perm


def _unpermute(Q: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return Q if perm is None else Q[..., torch.argsort(perm)]


def gptq_solve(W: torch.Tensor, A: torch.Tensor, scale, bits: int, block_size: int = 128,
               group_size: int | None = None, observer: str = "minmax") -> torch.Tensor:
    """The GPTQ column sweep given ``A = hessian_factor(H, damping)``; returns ``Q``.

    ``scale``: 0-d (per tensor) or [out, 1] (per channel), fixed. With ``group_size``, ``scale``
    is an output [k, out, ceil(in / group_size)]: as the sweep reaches the first column of a
    group it sets the group's scales by ``observer`` from the group's *current* (already
    updated) columns, as the original GPTQ's ``groupsize`` option does (``_group_now``). Lazy
    blocks then hold whole groups (``block_size`` becomes ``group_size`` unless a multiple of
    it), so those columns carry every update of the columns before them.

    Batched: ``W`` [k, out, in] with ``A`` [k, in, in] (k candidates, e.g. damping values).
    GPTQ rounds column ``j`` at its current value ``c_j`` and spreads the rounding error over
    the later columns through ``U = A^-1``. Unrolling that recursion gives ``W - Q = E U``,
    i.e. ``E = (W - Q) A``, and so ``c_j = w_j + sum_{i<j} (w_i - q_i) A_ij / A_jj``: each
    column's value is the original plus the *original* residuals of the earlier columns
    weighted by the column-normalised factor. The sweep accumulates that sum like the
    reference: at once (rank-1) inside a block of ``block_size`` columns, lazily (one matmul)
    for the columns after it. It runs on the transpose, where a column is a contiguous row,
    with each column's row views taken once (``unbind``), the rounding written into ``Q``
    in place and the rank-1 update as one ``baddbmm_``: 6 tensor ops per column.
    """
    q_max = qmax(bits)
    if group_size is not None and block_size % group_size:
        block_size = group_size
    column_scale = scale.reshape(-1) if torch.is_tensor(scale) and scale.dim() else scale  # [out] on a row
    A_unit = A / A.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)  # column j scaled by 1 / A_jj
    Wt = W.transpose(-1, -2).contiguous()  # [k, in, out]
    Ct, Qt, Rt = Wt.clone(), torch.empty_like(Wt), torch.empty_like(Wt)  # current, rounded, residual
    w_rows, q_rows, r_rows, c_rows = Wt.unbind(-2), Qt.unbind(-2), Rt.unbind(-2), Ct.unbind(-2)
    columns = Wt.shape[-2]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        for i in range(i1, i2):
            if group_size is not None and i % group_size == 0:  # a group starts: its scales, [k, out]
                column_scale = row_scales(_group_now(Wt, Ct, A, i, i + group_size).transpose(-1, -2), bits, observer)
                scale[..., i // group_size] = column_scale
            q = torch.div(c_rows[i], column_scale, out=q_rows[i]).round_().clamp_(-q_max, q_max).mul_(column_scale)
            r = torch.sub(w_rows[i], q, out=r_rows[i])
            if i + 1 < i2:
                Ct[..., i + 1:i2, :].baddbmm_(A_unit[..., i, i + 1:i2, None], r.unsqueeze(-2))
        if i2 < columns:
            Ct[..., i2:, :].baddbmm_(A_unit[..., i1:i2, i2:].transpose(-1, -2), Rt[..., i1:i2, :])
    return Qt.transpose(-1, -2)


def _group_now(Wt: torch.Tensor, Ct: torch.Tensor, A: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The columns ``start:stop`` (rows of the transposed ``Wt``/``Ct`` [k, in, out]) as the
    reference sweep holds them once the columns before ``start`` are quantized: the OBS-optimal
    adjustment to those roundings, ``W_G + R_F H_FG H_GG^-1`` restricted to the group (for the
    leading block of the not-yet-quantized columns). With ``H = A A^T`` that is
    ``W_G + (R_F A_FG) A_GG^-1``, and the sweep's ``C_G - W_G`` is ``R_F A_FG`` column-scaled by
    ``1 / A_jj``: one triangular solve of the group's size. (``C_G`` itself is that only at a
    group's first column: the A-form sweep adds each residual's final share at once.)"""
    A_group = A[..., start:stop, start:stop]
    shared = (Ct[..., start:stop, :] - Wt[..., start:stop, :]) * A_group.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    return Wt[..., start:stop, :] + torch.linalg.solve_triangular(A_group.transpose(-1, -2), shared, upper=False)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scale, bits: int, damping: float,
                  block_size: int = 128, act_order: bool = False, factor: torch.Tensor | None = None,
                  group_size: int | None = None, observer: str = "minmax") -> torch.Tensor:
    """GPTQ of one layer: ``W`` [out, in] and its Hessian ``H`` [in, in] -> ``Q`` on the grid
    ``scale * {-q..q}`` (same shape/dtype as ``W``; computed in float32, or float64 if ``W``
    is float64). ``scale``: 0-d or [out, 1]; with ``group_size``, an output [out, n_groups]
    that receives the group scales (``gptq_solve``). ``factor``: ``hessian_factor`` of the
    prepared ``H`` at ``damping`` when the caller already has it (linears that share their
    input share it). Raises ``torch.linalg.LinAlgError`` if the damped ``H`` cannot be factored."""
    _check_grouping(group_size, act_order)
    Wp, Hp, perm = _prepare(W, H, act_order)
    A = hessian_factor(Hp, damping) if factor is None else factor
    found = _group_scales(scale, 1) if group_size else scale
    Q = gptq_solve(Wp[None], A[None], found, bits, block_size, group_size, observer)[0]
    if group_size:
        scale.copy_(found[0])
    return _unpermute(Q, perm).to(W.dtype)


def _check_grouping(group_size: int | None, act_order: bool) -> None:
    if group_size is not None and act_order:
        raise ValueError("GPTQ with group scales takes act_order=False: groups are runs of consecutive input "
                         "columns, which act-order's permutation would scatter")


def _group_scales(scale: torch.Tensor, k: int) -> torch.Tensor:
    """A [k, out, n_groups] buffer for ``k`` candidates' group scales, shaped like ``scale``."""
    return scale.new_zeros(k, *scale.shape)


def damping_search(W: torch.Tensor, H: torch.Tensor, scale, bits: int, grid=DAMPING_GRID,
                   block_size: int = 128, act_order: bool = False, batch: int | None = None,
                   H_held: torch.Tensor | None = None, factors: dict | None = None,
                   group_size: int | None = None, observer: str = "minmax"):
    """GPTQ at every damping value of ``grid``, one ``H`` for all; keep the best candidate.

    Every candidate is solved with ``H`` and scored by ``layer_loss`` on ``H`` (in sample) and,
    when given, on ``H_held`` (a Hessian of held-out calibration tokens, same layer). The pick
    is by the held-out loss when ``H_held`` is given, else by the in-sample one (the paper's
    App. C, which nearly always favours the smallest damping: a weaker regulariser always fits
    its own data better). No pass over the data. Up to ``batch`` grid points (default: all) are
    solved together as one batched sweep. ``factors``: a dict shared by the linears that read
    the same input (same ``H``): ``{damping: hessian_factor or error message}``, filled here
    on first use. Returns ``(Q, chosen, losses, held_losses, failures)``:
    the best ``Q``; its damping (``None`` on fallback); ``{damping: loss or None}`` in sample
    and held out (all ``None`` without ``H_held``); a list of messages, one per grid point whose
    Cholesky failed, plus a ``"fallback: ..."`` warning when all failed and ``Q`` is plain RTN
    (``repro.quant.quantize``). Never raises for a bad ``H``. With ``group_size``, ``scale`` is
    an output [out, n_groups] that receives the best candidate's group scales (``gptq_solve``;
    on fallback, the ``observer``'s on ``W``).
    """
    _check_grouping(group_size, act_order)
    grid = list(grid)
    Wp, Hp, perm = _prepare(W, H, act_order)
    W0, H0 = W.to(Wp.dtype), H.to(Wp.dtype)
    factors = {} if factors is None else factors
    losses, held_losses, failures = dict.fromkeys(grid), dict.fromkeys(grid), []
    score = losses if H_held is None else held_losses
    best_Q, best_scale, chosen = None, None, None
    batch = batch or len(grid)
    for start in range(0, len(grid), batch):
        solvable = {}
        for damping in grid[start: start + batch]:
            if damping not in factors:
                try:
                    factors[damping] = hessian_factor(Hp, damping)
                except torch.linalg.LinAlgError as err:
                    factors[damping] = f"damping {damping:g}: {str(err).splitlines()[0]}"
            if isinstance(factors[damping], str):
                failures.append(factors[damping])
            else:
                solvable[damping] = factors[damping]
        if not solvable:
            continue
        found = _group_scales(scale, len(solvable)) if group_size else scale
        Qs = gptq_solve(Wp.expand(len(solvable), -1, -1), torch.stack(list(solvable.values())),
                        found, bits, block_size, group_size, observer)
        Qs = _unpermute(Qs, perm)
        losses.update(zip(solvable, layer_loss(Qs - W0, H0).tolist()))
        if H_held is not None:
            held_losses.update(zip(solvable, layer_loss(Qs - W0, H_held.to(Wp.dtype)).tolist()))
        for i, (damping, Q) in enumerate(zip(solvable, Qs)):
            if chosen is None or score[damping] < score[chosen]:
                best_Q, chosen = Q, damping
                best_scale = found[i] if group_size else None
    if chosen is None:
        failures.append(f"fallback: Cholesky failed at all {len(grid)} damping values; "
                        f"the layer is quantized by RTN")
        if group_size:
            scale.copy_(compute_scale(W, Grid(bits, "group", group_size), observer))
        return quantize(W, scale, bits, group_size), None, losses, held_losses, failures
    if group_size:
        scale.copy_(best_scale)
    return best_Q.to(W.dtype), chosen, losses, held_losses, failures


def merge_hessians(H_a: torch.Tensor, n_a: int, H_b: torch.Tensor, n_b: int) -> torch.Tensor:
    """The ``accumulate_hessian`` mean over both token sets: ``(n_a H_a + n_b H_b) / (n_a + n_b)``."""
    return H_a * (n_a / (n_a + n_b)) + H_b * (n_b / (n_a + n_b))


# ----------------------------------------------------------------------------- model driver
def solve_on_all_tokens(W, fit, held, scale, bits: int, damping: float, opts: dict, factors: dict,
                        group_size: int | None = None, observer: str = "minmax"):
    """GPTQ at the picked ``damping`` with the Hessian of the fit and held-out tokens together
    (``fit``/``held``: ``(H, n)``); ``factors`` caches ``{damping: factor}`` of that merged
    Hessian for the other readers of the same input."""
    H = merge_hessians(*fit, *held)
    if damping not in factors:
        factors[damping] = hessian_factor(_prepare(W, H, opts["act_order"])[1], damping)
    return gptq_quantize(W, H, scale, bits, damping, opts["block_size"], opts["act_order"], factors[damping],
                         group_size, observer)


def split_calibration(calibration: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, held)``: the last ``round(holdout * n)`` (at least one) calibration sequences are
    held out (to score candidates or pick a best state), the rest fit; ``holdout == 0`` holds
    out nothing."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout={holdout!r}: a fraction of the calibration sequences in [0, 1)")
    if holdout == 0:
        return calibration, calibration[:0]
    n_held = max(1, round(holdout * len(calibration)))
    if n_held >= len(calibration):
        raise ValueError(f"holdout={holdout}: {len(calibration)} calibration sequence(s) leave none to fit on; "
                         f"use more sequences or a smaller holdout")
    return calibration[:-n_held], calibration[-n_held:]


def solve_memory(shapes: dict, readers: dict, tokens: int, hidden_size: int, k: int, grid_size: int | None = None,
                 bytes_per: int = 4) -> dict:
    """GPTQ's working memory in bytes beside the model, for one block: the terms of the module's
    memory note.

    ``shapes``: linear name -> ``(out, in)`` of the block's weights; ``readers``: name -> the
    linear whose Hessian it uses (``hessian_from`` in a record; itself when alone); ``tokens``:
    calibration tokens, fit and held out together; ``k``: candidates solved at once
    (``search_batch``, default the grid's length); ``grid_size``: the grid's length (default
    ``k``). Returns ``activations`` (the calibration hidden states), ``hessians`` (fit + held
    out, one per distinct input; the fit alone for a one-point grid), ``search`` (the largest
    layer's: the factors of the whole grid, kept for the other readers of its input, the
    batch's stacked copy and column-scaled form, ``(grid_size + 2 k) in^2``, the sweep's four
    ``[k, in, out]`` buffers and the prepared copies of ``W`` and ``H``) and ``total``.
    """
    grid_size = grid_size or k
    leaders = {readers.get(name, name) for name in shapes}
    hessians = (2 if grid_size > 1 else 1) * sum(shapes[name][1] ** 2 for name in leaders)
    search = max((grid_size + 2 * k + 1) * n_in ** 2 + (4 * k + 1) * n_in * n_out for n_out, n_in in shapes.values())
    terms = {"activations": tokens * hidden_size, "hessians": hessians, "search": search}
    terms = {key: value * bytes_per for key, value in terms.items()}
    return {**terms, "total": sum(terms.values())}


def gptq_options(config) -> dict:
    """``DEFAULTS`` updated with ``config.options``, checked."""
    opts = {**DEFAULTS, **(config.options or {})}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown GPTQ option(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    if not (is_real(opts["holdout"]) and 0 <= opts["holdout"] < 1):
        raise ValueError(f"GPTQ option holdout={opts['holdout']!r}: a fraction of the calibration sequences in [0, 1)")
    if not is_int(opts["block_size"], 1):
        raise ValueError(f"GPTQ option block_size={opts['block_size']!r}: an integer >= 1 (the paper: 128)")
    if not isinstance(opts["act_order"], bool):
        raise ValueError(f"GPTQ option act_order={opts['act_order']!r}: true or false")
    if opts["act_order"] and config.grid is not None:
        _check_grouping(config.grid.groups, True)
    if opts["search_batch"] is not None and not is_int(opts["search_batch"], 1):
        raise ValueError(f"GPTQ option search_batch={opts['search_batch']!r}: an integer >= 1, or None (all at once)")
    opts["damping_grid"] = positive_list(opts["damping_grid"], "GPTQ option damping_grid", list(DAMPING_GRID))
    return opts


@torch.no_grad()
def gptq(model, data, config) -> dict:
    """Quantize the stack by GPTQ, block by block, with the per-layer damping search.

    Options (``config.options``, defaults in ``DEFAULTS``): ``damping_grid`` (one value = plain
    GPTQ), ``holdout`` (fraction of calibration sequences that score the candidates; 0 = score
    in sample, as the paper), ``block_size`` (lazy-update width), ``act_order``,
    ``search_batch``. Returns, per layer, the scale, chosen damping, layer MSE per damping value
    in sample and held out, failures and solve time; per block and in total, the wall time of
    the Hessian pass, the solves and the propagation.
    """
    opts = gptq_options(config)
    check_sequences(model, data.calibration, "calibration")
    dampings = opts["damping_grid"]
    prefix = block_path(model)
    was_training = model.training
    model.eval()
    layers, block_times, fallbacks, grid_scales = {}, [], [], {}
    grid = config.grid
    grouping = {"group_size": grid.groups, "observer": config.observer}
    start = time.perf_counter()
    try:
        # nothing to choose with one damping value: every sequence fits
        holdout = opts["holdout"] if len(dampings) > 1 else 0
        parts = dict(zip(("fit", "held"), split_calibration(data.calibration, holdout)))
        # the calibration activations wait on CPU (see the memory note above; on CPU nothing moves)
        inputs = {part: capture(model, seqs, config.batch_size, store="cpu") for part, seqs in parts.items()}
        wall = {"capture": time.perf_counter() - start, "hessian": 0.0, "solve": 0.0, "propagate": 0.0}
        for b, block in enumerate(progress(blocks(model), desc="GPTQ blocks")):
            linears = block_linears(block)
            t0 = time.perf_counter()
            hessians = {part: dict.fromkeys(linears, (None, 0)) for part in inputs}
            current = []  # the part whose inputs are flowing through the block
            # linears fed the very same tensor (q/k/v, gate/up) share one Hessian and its
            # factors: the first of them (in call order) accumulates it for all
            leader, sharing = {}, SharedInputs()  # name -> first reader

            def hook(name):
                def accumulate(module, args, output):
                    x = args[0]
                    first = sharing.first_reader(name, x)
                    if leader.setdefault(name, first) != first:
                        raise RuntimeError(f"GPTQ: {name} shared its input inconsistently across calls")
                    if first == name:
                        hessians[current[0]][name] = accumulate_hessian(*hessians[current[0]][name], x.detach())
                return accumulate

            with forward_hooks((m, hook(name)) for name, m in linears.items()):
                for part, items in inputs.items():
                    current[:] = [part]
                    for item in items:
                        run_block(block, b, item)
            sharing.reset()
            t1 = time.perf_counter()
            factors = {}  # (reader, "fit" | "all") -> {damping: factor}: shared by the readers of one input
            readers_left = {}  # first reader -> readers still to solve: its factors go after the last one
            for name in linears:
                first = leader.get(name, name)
                readers_left[first] = readers_left.get(first, 0) + 1
            for name, m in linears.items():
                s = time.perf_counter()
                W = weight_matrix(m)  # a view: writing into it writes the weight (Conv1D too)
                if grid.groups:  # found by the sweep (an output, see gptq_solve)
                    scale = W.new_zeros(grid.scale_shape(*W.shape), dtype=torch.float32)
                else:  # (the stored weight: per tensor, the layout does not matter)
                    scale = compute_scale(W if grid.granularity == "channel" else m.weight, grid, config.observer)
                first = leader.get(name, name)
                (H, n), (H_held, n_held) = hessians["fit"][first], hessians["held"][first]
                if H is None:  # no calibration input reached this layer
                    if grid.groups:
                        scale = compute_scale(W, grid, config.observer)
                    Q, chosen = quantize(W.detach(), scale, grid.bits, grid.groups), None
                    losses = held_losses = dict.fromkeys(dampings)
                    failures = ["fallback: the layer received no calibration inputs; quantized by RTN"]
                else:
                    Q, chosen, losses, held_losses, failures = damping_search(
                        W.detach(), H, scale, config.bits, dampings, opts["block_size"], opts["act_order"],
                        opts["search_batch"], H_held=H_held, factors=factors.setdefault((first, "fit"), {}),
                        **grouping)
                    if H_held is not None and chosen is not None:  # the chosen damping, all tokens
                        try:
                            Q = solve_on_all_tokens(W.detach(), (H, n), (H_held, n_held), scale, config.bits,
                                                    chosen, opts, factors.setdefault((first, "all"), {}), **grouping)
                        except torch.linalg.LinAlgError as err:
                            failures.append(f"damping {chosen:g} on all tokens: {str(err).splitlines()[0]}; "
                                            f"kept the solve on the fit tokens")
                W.copy_(Q)
                readers_left[first] -= 1
                if not readers_left[first]:  # in x in per damping: freed once no reader needs them
                    factors.pop((first, "fit"), None), factors.pop((first, "all"), None)
                full = f"{prefix}.{b}.{name}"
                if chosen is None:
                    fallbacks.append(full)
                layers[full] = {"damping": chosen, "losses": {f"{d:g}": v for d, v in losses.items()},
                                "held_out_losses": {f"{d:g}": v for d, v in held_losses.items()},
                                # per channel / group: the mean of the layer's scales (all in grid_scales)
                                "failures": failures, "scale": float(scale.mean()), "tokens": n,
                                "hessian_from": f"{prefix}.{b}.{first}",
                                "held_out_tokens": n_held, "solve_s": time.perf_counter() - s}
                if scale.dim():  # per channel / group
                    grid_scales[full] = scale.detach().cpu()
            del hessians
            t2 = time.perf_counter()
            for items in inputs.values():
                advance(block, b, items)
            t3 = time.perf_counter()
            block_times.append({"hessian_s": t1 - t0, "solve_s": t2 - t1, "propagate_s": t3 - t2})
            for key, dt in zip(("hessian", "solve", "propagate"), (t1 - t0, t2 - t1, t3 - t2)):
                wall[key] += dt
    finally:
        model.train(was_training)
    if fallbacks:
        warnings.warn(f"GPTQ: {len(fallbacks)} layer(s) fell back to RTN (Cholesky failed at every damping): "
                      f"{', '.join(fallbacks)}", stacklevel=2)
    return {"options": opts, "layers": layers, "blocks": block_times, "wall_s": wall,
            **({"grid_scales": grid_scales} if grid_scales else {}),
            "fallbacks": fallbacks,
            "warning": (f"{len(fallbacks)} layer(s) fell back to RTN (Cholesky failed at every "
                        f"damping): {', '.join(fallbacks)}") if fallbacks else None}
