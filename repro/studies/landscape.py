"""The loss landscape around the pretrained weights (paper §IV-C, Fig. 3 and 5), and its basin radius.

``w`` is the transformer stack's linear weights, flattened and concatenated (D = 106M for
SmolLM2-135M), in the modules' own storage layout: every quantity here (distances, directions,
interpolations) is a sum or an elementwise map over entries, so GPT-2's transposed Conv1D needs
no special case. A *point* is a set of stack weights:

* ``radial``: ``w + lam * e`` along a unit direction ``e``, uniform on the sphere (a normalised
  Gaussian drawn from a seed, layer by layer in the stack's order), at ``lam = r * ||w||`` for
  the relative radii ``r`` of the settings; each seed is swept along ``+e`` and ``-e``;
* ``run``: a method's quantized weights (``w_RTN``, ``w_GPTQ``, ``w_QAFT``), read from the codes
  the run kept beside its record (``repro.runs.load_weights``), so a landscape never re-runs a
  method that kept them;
* ``segment``: ``(1 - a) w_A + a w_B`` between two of ``{w, w_RTN, w_GPTQ, w_QAFT}``.

Each point costs one NLL pass over the first ``n_train`` calibration sequences (the data GPTQ
and QAFT fit) and one over the first ``n_validation`` validation sequences, and nothing else:
its weights are written into the model in place (float32) and the FP weights are copied back
from the workbench's snapshot afterwards (exact); a direction is regenerated from its seed,
one at a time. Every point is cached as a small JSON record (``outputs/records/landscape/``)
keyed by what determines it, so more directions, radii or bit-widths compute only what is new.

Beyond the paper, ``basin_radius`` measures the basin radius ``R(w)`` that the paper's
explanation invokes, and ``misalignment_vs_radius`` tests it against the records.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from repro import evaluate, models, plots, runs, store
from repro.config import SHARED_VERSIONS, RunConfig, bit_widths, load_tier, make_config
from repro.methods import QUANTIZERS
from repro.progress import progress
from repro.quant import is_int, quantize
from repro.report import DASH, markdown_table, nll_cell
from repro.studies import Notebook, suffix, sweep, tier_models

VERSION = 1  # bump when what a point's record holds changes
DEFAULTS = {"bits": [4], "directions": 2, "radii": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 3.0],
            "alphas": [0.25, 0.5, 0.75], "n_train": 8, "n_validation": 8, "methods": list(QUANTIZERS),
            "tau": 0.1, "basin_directions": None}
SPLITS = ("train", "validation")


NOTEBOOKS = (Notebook("03_landscape", lambda tier, model, bits: sweep.configs(tier, model, bits),
                      section="landscape",
                      precompute=lambda tier, model, bits, outputs, take: landscape(model, bits, tier, outputs,
                                                                                    take=take)),)


def settings(tier: str = "cpu", **overrides) -> dict:
    """The landscape settings: ``DEFAULTS``, the tier's ``landscape`` section, then ``overrides``
    (``None`` values ignored): ``directions`` (random seeds, each swept at +e and -e), ``radii``
    (``lam / ||w||``), ``alphas`` (interior points of a segment), ``n_train``/``n_validation``
    (sequences per point), ``methods``, ``bits`` (widths with segments), ``tau`` (nats, for R_tau),
    ``basin_directions`` (on request: R(w) over this many directions where their points are cached, a
    section of its own; None: none)."""
    section = load_tier(tier).get("landscape") or {}
    out = {**DEFAULTS, **{k: v for k, v in section.items() if k != "models"},
           **{k: v for k, v in overrides.items() if v is not None}}
    if not (is_int(out["directions"]) and out["directions"] >= 1):
        raise ValueError(f"directions={out['directions']!r}: an integer >= 1")
    if out["basin_directions"] is not None and not (is_int(out["basin_directions"]) and out["basin_directions"] >= 1):
        raise ValueError(f"basin_directions={out['basin_directions']!r}: an integer >= 1, or null")
    if not out["radii"] or not all(r > 0 for r in out["radii"]):
        raise ValueError(f"radii={out['radii']!r}: one or more values > 0 (lambda / ||w||)")
    if not all(0 < a < 1 for a in out["alphas"]):
        raise ValueError(f"alphas={out['alphas']!r}: interior points of a segment, each in (0, 1)")
    return out


# ----------------------------------------------------------------------------- weights of a point
def stack_norm(fp_weights: dict[str, torch.Tensor]) -> float:
    """``||w||``: the L2 norm of the concatenated stack weights."""
    return math.sqrt(sum(float(w.double().pow(2).sum()) for w in fp_weights.values()))


def direction(fp_weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A unit direction (norm 1 over the whole stack), uniform on the sphere: standard Gaussian
    entries drawn layer by layer in the stack's order from ``seed``, divided by their norm."""
    generator = torch.Generator().manual_seed(seed)
    e = {name: torch.randn(w.shape, generator=generator) for name, w in fp_weights.items()}
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in e.values()))
    return {name: v.div_(norm) for name, v in e.items()}


@contextmanager
def weights_set(model, fp_weights: dict[str, torch.Tensor]):
    """Yield ``put(layer)``: writes ``layer(name, w)`` (the point's weight of the linear ``name``,
    whose FP weight is ``w``) into every stack linear in place, one layer at a time (no copy of
    the stack), and returns the point's distance ``||weights - w||``; on exit the FP weights are
    copied back (exactly) from ``fp_weights``."""
    linears = models.stack_linears(model)

    @torch.no_grad()
    def put(layer) -> float:
        squares = 0.0
        for name, m in linears.items():
            weight = layer(name, fp_weights[name])
            squares += float((weight.double() - fp_weights[name].double()).pow(2).sum())
            m.weight.copy_(weight)
        return math.sqrt(squares)

    try:
        yield put
    finally:
        models.restore(model, fp_weights)


# ----------------------------------------------------------------------------- cached points
def _point_key(base: RunConfig, spec: dict, opts: dict) -> str:
    content = {"model": base.model, "corpus": base.corpus, "seq_len": base.seq_len, "n_calibration": base.n_calibration,
               "n_eval": base.n_eval, "seed": base.seed, "n_train": opts["n_train"],
               "n_validation": opts["n_validation"], "spec": spec, "version": VERSION, **SHARED_VERSIONS,
               **({} if base.eval_windows == "consecutive" else {"eval_windows": base.eval_windows})}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _point_path(base: RunConfig, key: str, outputs: Path | None) -> Path:
    root = Path(outputs) if outputs is not None else store.outputs_dir()
    return root / "records" / "landscape" / base.model.replace("/", "--") / f"{key}.json"


def _measure(model, data, opts: dict, batch_size: int) -> dict:
    return {"train": evaluate.nll(model, data.calibration[: opts["n_train"]], batch_size, desc=None),
            "validation": evaluate.nll(model, data.validation[: opts["n_validation"]], batch_size, desc=None)}


def landscape(model: str | None = None, bits=None, tier: str = "cpu", outputs: Path | None = None,
              cached_only: bool = False, corpus: str | None = None, take=None, **overrides) -> dict | None:
    """Every point of the Fig. 3 picture for ``model`` at each width in ``bits``, computed or read.

    ``bits``: int or list, ``None``: the settings' (tier's) ``bits``; ``corpus``: ``None`` the
    tier's. Runs the method's configs of the tier (``make_config``), reading their kept weights.
    Returns ``{"model", "tier", "norm", "settings", "points": [...]}`` where every point is
    ``{"spec", "distance", "train", "validation"}``; ``spec["kind"]`` is ``fp``, ``radial``
    (``seed``, ``sign``, ``radius`` = lam/||w||), ``run`` (``method``, ``bits``) or ``segment``
    (``a``, ``b`` as ``fp`` / ``method@bits``, ``alpha``). Also ``rtn`` points at every width of
    the tier (for ``rtn_vs_random``). NLL in nats/token. ``cached_only``: compute nothing, and
    return ``None`` unless every point is cached (``repro report`` / ``repro figures``). ``take``:
    ``path -> context manager yielding bool`` (``repro.batch.claim``): compute only the missing points
    this process takes, so several processes share the points, and return ``None``.
    """
    opts = settings(tier, **overrides)
    bits = bit_widths(bits, opts["bits"])
    base = make_config("fp", None, tier, model=model, corpus=corpus)
    for key, available in (("n_train", base.n_calibration), ("n_validation", base.n_eval)):
        if available is not None and opts[key] > available:
            raise ValueError(f"{key}={opts[key]}: the tier has only {available} such sequences; use at most {available}")
    outputs = Path(outputs) if outputs is not None else store.outputs_dir()
    if not cached_only:
        store.check_writable(outputs / "records" / "landscape")
    tier_bits = load_tier(tier)["bits"]
    run_configs = {f"{m}@{b}": make_config(m, b, tier, model=base.model, corpus=base.corpus)
                   for b in bits for m in opts["methods"]}
    run_configs.update({f"rtn@{b}": make_config("rtn", b, tier, model=base.model, corpus=base.corpus)
                        for b in tier_bits})
    specs = [{"kind": "fp"}]
    specs += [{"kind": "radial", "seed": seed, "sign": sign, "radius": r}
              for seed in range(opts["directions"]) for sign in (1, -1) for r in opts["radii"]]
    specs += [{"kind": "run", "method": label.split("@")[0], "bits": int(label.split("@")[1])} for label in run_configs]
    for b in bits:
        ends = ["fp", *(f"{m}@{b}" for m in opts["methods"])]
        specs += [{"kind": "segment", "a": a, "b": c, "alpha": alpha}
                  for i, a in enumerate(ends) for c in ends[i + 1:] for alpha in opts["alphas"]]
    keyed = [(spec, _point_path(base, _point_key(base, _identity(spec, run_configs), opts), outputs)) for spec in specs]
    stamps = {label: _stamp(config, outputs) for label, config in run_configs.items()}

    def current(point, spec) -> bool:  # computed from the run records as they are now
        sources = {label: stamps[label] for label in _labels(spec)}
        return point is not None and None not in sources.values() and point.get("sources", {}) == sources

    missing = [(spec, path) for spec, path in keyed if not current(store.read_json(path, discard=not cached_only), spec)]
    if missing and cached_only:
        return None
    if missing:
        with runs.pinned_threads(base.threads):  # bit-identical points on any machine (as records)
            _compute_points(base, missing, run_configs, opts, outputs, take,
                            lambda spec, path: not current(store.read_json(path), spec))
    if take is not None:
        return None
    points = [store.read_json(path) for _, path in keyed]
    return {"model": base.model, "corpus": base.corpus, "tier": tier, "bits": bits, "norm": points[0]["norm"],
            "settings": opts, "points": points}


def _labels(spec: dict) -> list[str]:
    """The runs (``method@bits``) whose weights a point is made of."""
    if spec["kind"] == "run":
        return [f"{spec['method']}@{spec['bits']}"]
    return [label for label in (spec["a"], spec["b"]) if label != "fp"] if spec["kind"] == "segment" else []


def _stamp(config: RunConfig, outputs: Path | None) -> str | None:
    """Which computation of a run a point used: the ``created`` stamp of the RTN record (its weights
    follow from the record's scales) or of the computation that kept the weights."""
    if config.method == "rtn" and config.grid.per_tensor:
        record = store.read_record(config, outputs)
        return record.get("created") if record else None
    return store.weights_stamp(config, outputs)


def _identity(spec: dict, run_configs: dict) -> dict:
    """What determines a point's weights: run points and segment ends by their run's record key."""
    def end(label):
        return "fp" if label == "fp" else run_configs[label].key()
    if spec["kind"] == "run":
        return {"kind": "run", "run": end(f"{spec['method']}@{spec['bits']}")}
    if spec["kind"] == "segment":
        return {"kind": "segment", "a": end(spec["a"]), "b": end(spec["b"]), "alpha": spec["alpha"]}
    return spec


def run_weights(config: RunConfig, fp: dict, outputs: Path | None) -> dict[str, torch.Tensor]:
    """A run's quantized stack weights: per-tensor RTN's from its record's scales (``quantize`` of
    the FP weights: nothing kept on disk), the others' from the codes kept beside their record."""
    if config.method == "rtn" and config.grid.per_tensor:
        scales = runs.run(config, outputs)["info"]["scales"]
        return {name: quantize(w, torch.tensor(scales[name]), config.bits) for name, w in fp.items()}
    return runs.load_weights(config, outputs)


def _group(spec: dict):
    """Evaluation order: radial points by seed (one direction in memory), then the points of one
    width together (that width's run weights in memory)."""
    if spec["kind"] == "radial":
        return (0, spec["seed"])
    if spec["kind"] == "fp":
        return (1, 0)
    return (2, -(spec["bits"] if spec["kind"] == "run" else int(spec["b"].split("@")[1])))


def _compute_points(base, missing, run_configs, opts, outputs, take=None, still_missing=None) -> None:
    """Measure the ``missing`` points; with ``take`` (``landscape``), only those this process takes
    that are ``still_missing(spec, path)`` once taken (another process may have just written one)."""
    bench = runs.workbench(base)
    fp = bench.fp_weights
    norm = stack_norm(fp)
    loaded, group, e = {"fp": fp}, None, None

    def weights_of(label):
        if label not in loaded:
            loaded[label] = run_weights(run_configs[label], fp, outputs)
            models.restore(bench.model, fp)  # a run that had to compute left its weights in the model
        return loaded[label]

    with weights_set(bench.model, fp) as put:
        for spec, path in progress(sorted(missing, key=lambda item: _group(item[0])),
                                   desc=f"landscape {base.model}", unit="point"):
            with take(path) if take else nullcontext(True) as mine:
                if not mine or (take is not None and not still_missing(spec, path)):
                    continue  # another process measures it, or just did
                if _group(spec) != group:  # free the previous direction / width's weights
                    group, e = _group(spec), None
                    loaded = {"fp": fp}
                if spec["kind"] == "fp":
                    layer = lambda name, w: w  # noqa: E731
                elif spec["kind"] == "radial":
                    e = e or direction(fp, spec["seed"])
                    lam = spec["sign"] * spec["radius"] * norm
                    layer = lambda name, w, lam=lam, e=e: torch.add(w, e[name], alpha=lam)  # noqa: E731
                elif spec["kind"] == "run":
                    run = weights_of(f"{spec['method']}@{spec['bits']}")
                    layer = lambda name, w, run=run: run[name]  # noqa: E731
                else:
                    a, b, alpha = weights_of(spec["a"]), weights_of(spec["b"]), spec["alpha"]
                    layer = lambda name, w, a=a, b=b, alpha=alpha: torch.lerp(a[name], b[name], alpha)  # noqa: E731
                point = {"spec": spec, "distance": put(layer), "norm": norm,
                         "sources": {label: _stamp(run_configs[label], outputs) for label in _labels(spec)},
                         **_measure(bench.model, bench.data, opts, base.batch_size), "code": runs.code_hash(base.tier)}
                store.write_json_atomic(path, point)


# ----------------------------------------------------------------------------- basin radius
def fit_bowl(lams, rise) -> dict:
    """Least-squares fit of ``rise(lam) = A lam^n / (lam^n + R^n)`` (the saturating bowl).

    ``lams``: distances (> 0); ``rise``: the loss above ``L(w)`` there (nats). A grid over ``n``
    (0.5..5) and ``log R`` with ``A`` solved in closed form at each grid point. ``R`` is where the
    loss has risen half-way to its plateau ``A``; for ``n = 2`` the curvature at ``w`` is
    ``kappa = 2A/R^2``. ``accepted``: ``n`` in [1.6, 2.4] and the plateau reached (the largest
    measured rise is at least 80% of ``A``). ``R_lower``: the last distance before the measured
    rise first reaches half its largest value, a lower bound on ``R`` for a rising profile (the
    plateau is at least that largest rise, so the half-way point lies beyond); ``None`` when the
    first distance already rises that far. Returns ``A, R, n, kappa, accepted, plateau, R_lower, rmse``.
    """
    lam = torch.tensor(lams, dtype=torch.float64)
    y = torch.tensor(rise, dtype=torch.float64)
    finite = torch.isfinite(y)  # a diverged NLL far out says nothing about the bowl's shape
    lam, y = lam[finite], y[finite]
    ns = torch.arange(0.5, 5.0001, 0.02, dtype=torch.float64)
    Rs = torch.logspace(math.log10(float(lam.min()) / 10), math.log10(float(lam.max()) * 10), 400, dtype=torch.float64)
    u = lam[None, None, :] ** ns[:, None, None]
    f = u / (u + Rs[None, :, None] ** ns[:, None, None])  # [n, R, points]
    A = (f * y).sum(-1) / (f * f).sum(-1).clamp_min(1e-300)
    err = ((A[..., None] * f - y) ** 2).sum(-1)
    i, j = divmod(int(err.argmin()), len(Rs))
    A_fit, R_fit, n_fit = float(A[i, j]), float(Rs[j]), float(ns[i])
    plateau = bool(float(y.max()) >= 0.8 * A_fit)
    accepted = plateau and 1.6 <= n_fit <= 2.4 and A_fit > 0
    first_above = next((i for i, v in enumerate(y.tolist()) if v >= float(y.max()) / 2), 0)
    return {"A": A_fit, "R": R_fit, "n": n_fit, "kappa": 2 * A_fit / R_fit ** 2, "accepted": accepted,
            "plateau": plateau, "R_lower": float(lam[first_above - 1]) if first_above > 0 else None,
            "rmse": math.sqrt(float(err[i, j]) / len(lams))}


def radial_profiles(result: dict, split: str = "train") -> dict[int, tuple[list, list]]:
    """Per seed: the distances ``lam`` and the rise above ``L(w)`` averaged over ``+e`` and ``-e``
    at each radius (the average cancels the gradient term of the Taylor expansion; the two
    distances agree to float32 rounding and are averaged too)."""
    fp = next(p for p in result["points"] if p["spec"]["kind"] == "fp")[split]
    by = {}
    for p in result["points"]:
        s = p["spec"]
        if s["kind"] == "radial":
            by.setdefault(s["seed"], {}).setdefault(s["radius"], []).append((p["distance"], p[split] - fp))
    out = {}
    for seed, radii in by.items():
        rows = [radii[r] for r in sorted(radii)]
        out[seed] = ([sum(d for d, _ in row) / len(row) for row in rows], [sum(v for _, v in row) / len(row) for row in rows])
    return out


def _median(values):
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2 if v else float("nan")


def _quantile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    x = q * (len(v) - 1)
    lo, hi = math.floor(x), math.ceil(x)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def basin_radius(result: dict, split: str = "train", tau: float | None = None, seed: int = 0) -> dict:
    """``R(w)`` per direction (``fit_bowl`` on ``radial_profiles``) and across directions: median,
    IQR and a bootstrap 95% CI of the median (2000 resamples, ``seed``), each over the directions
    whose fit was accepted, else over the lower bounds (``bound: True``); and ``R_tau`` =
    ``sqrt(2 tau / kappa)``, the distance at which the fitted quadratic bowl rises by ``tau`` nats."""
    tau = result["settings"]["tau"] if tau is None else tau
    fits = {s: fit_bowl(lams, rise) for s, (lams, rise) in radial_profiles(result, split).items()}
    good = [f for f in fits.values() if f["accepted"]]
    bound = not good
    values = [f["R"] for f in good] if good else [f["R_lower"] for f in fits.values() if f["R_lower"]]
    rng = random.Random(seed)
    boots = sorted(_median([rng.choice(values) for _ in values]) for _ in range(2000)) if values else []
    kappas = [f["kappa"] for f in good]  # a curvature only where the bowl is quadratic (accepted)
    return {"split": split, "fits": fits, "bound": bound, "directions": len(fits), "accepted": len(good),
            "R": _median(values), "R_iqr": (_quantile(values, 0.25), _quantile(values, 0.75)),
            "R_ci95": (boots[50], boots[1949]) if boots else (float("nan"),) * 2,
            "R_tau": math.sqrt(2 * tau / _median(kappas)) if kappas else None, "tau": tau,
            "R_over_norm": _median(values) / result["norm"]}


# ----------------------------------------------------------------------------- the paper's claim
def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs."""
    if len(x) < 3:
        return float("nan")

    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def misalignment_vs_radius(results: list[dict], outputs: Path | None = None, gap: float = 0.05,
                           compute: bool = True, bits=None) -> dict:
    """Per (model, width of the tier): ``rho = ||w_RTN - w|| / R(w)`` (train-split R) and the
    misalignment ``eta = NLL_GPTQ - NLL_QAFT`` on the test split, from the run records (computed
    if missing, or skipped with ``compute=False``), at ``bits`` (None: every width of the tier);
    Spearman's correlation of ``eta`` with ``rho`` over all rows; and whether misalignment
    (``eta > gap`` nats) appears exactly where ``rho > 1``."""
    rows = []
    for result in results:
        basin = basin_radius(result)
        for b in load_tier(result["tier"])["bits"] if bits is None else bits:
            configs = {m: make_config(m, b, result["tier"], model=result["model"], corpus=result.get("corpus"))
                       for m in QUANTIZERS}
            rec = {m: runs.run(c, outputs) if compute else store.read_record(c, outputs) for m, c in configs.items()}
            if None in rec.values() or not math.isfinite(basin["R"]) or not basin["R"]:
                continue
            rows.append({"model": result["model"], "corpus": result.get("corpus"), "bits": b, "distance_rtn": rec["rtn"]["weight_distance"],
                         "R": basin["R"], "R_is_bound": basin["bound"],
                         "rho": rec["rtn"]["weight_distance"] / basin["R"],
                         "eta": rec["gptq"]["nll_test"] - rec["qaft"]["nll_test"],
                         "nll_test": {m: r["nll_test"] for m, r in rec.items()}})
    agree = [(r["rho"] > 1) == (r["eta"] > gap) for r in rows]
    return {"rows": rows, "spearman": spearman([r["rho"] for r in rows], [r["eta"] for r in rows]),
            "gap": gap, "threshold_agrees": sum(agree), "n": len(rows),
            "misaligned_rho": sorted(r["rho"] for r in rows if r["eta"] > gap),
            "aligned_rho": sorted(r["rho"] for r in rows if r["eta"] <= gap)}


def rtn_vs_random(result: dict, split: str = "validation") -> list[dict]:
    """Per width: the NLL of ``w_RTN`` against the random-direction profile at the same distance
    (median over directions of the +/- averaged profile, linearly interpolated in distance; None
    beyond the sweep). ``excess`` > 0: quantization noise costs more than a random step as long."""
    fp = next(p for p in result["points"] if p["spec"]["kind"] == "fp")[split]
    profiles = radial_profiles(result, split)
    rows = []
    for p in result["points"]:
        s = p["spec"]
        if s["kind"] != "run" or s["method"] != "rtn":
            continue
        at = []
        for lams, rise in profiles.values():
            for (x0, y0), (x1, y1) in zip(zip(lams, rise), zip(lams[1:], rise[1:])):
                if x0 <= p["distance"] <= x1:
                    at.append(y0 + (y1 - y0) * (p["distance"] - x0) / (x1 - x0))
        random_nll = fp + _median(at) if at else None
        rows.append({"bits": s["bits"], "distance": p["distance"], "nll_rtn": p[split], "nll_random": random_nll,
                     "excess": p[split] - random_nll if random_nll is not None else None})
    return sorted(rows, key=lambda r: -r["bits"])


def segment_barriers(result: dict, bits: int, split: str = "train") -> list[dict]:
    """Per segment at ``bits``: the barrier ``max_a [L(a) - ((1 - a) L(0) + a L(1))]`` over its
    measured points (nats): how far the loss on the straight path rises above the straight line
    between its ends; > 0 means the path climbs over a ridge (0 at the ends themselves)."""
    ends = {"fp": next(p for p in result["points"] if p["spec"]["kind"] == "fp")[split]}
    for p in result["points"]:
        s = p["spec"]
        if s["kind"] == "run" and s["bits"] == bits:
            ends[f"{s['method']}@{bits}"] = p[split]
    segs = {}
    for p in result["points"]:
        s = p["spec"]
        if s["kind"] == "segment" and s["b"].endswith(f"@{bits}"):
            segs.setdefault((s["a"], s["b"]), []).append((s["alpha"], p[split]))
    return [{"a": a, "b": b, "nll_a": ends[a], "nll_b": ends[b],
             "barrier": max([0.0] + [v - ((1 - al) * ends[a] + al * ends[b]) for al, v in vals])}
            for (a, b), vals in segs.items()]


# ----------------------------------------------------------------------------- tables, README, figures
def basin_table(result: dict) -> str:
    """Markdown: the basin radius R(w) per split (median over directions, IQR, bootstrap 95% CI,
    R / ‖w‖, R_tau, directions whose bowl fit was accepted)."""
    rows = []
    for split in ("train", "validation"):
        b = basin_radius(result, split)
        bound = " (lower bound)" if b["bound"] else ""
        rows.append([split, f"{b['R']:.4g}{bound}", f"{b['R_iqr'][0]:.4g} – {b['R_iqr'][1]:.4g}",
                     f"{b['R_ci95'][0]:.4g} – {b['R_ci95'][1]:.4g}", f"{b['R_over_norm']:.3f}",
                     f"{b['R_tau']:.4g}" if b['R_tau'] is not None else "— (no quadratic fit)", f"{b['accepted']} of {b['directions']}"])
    return (f"‖w‖ = {result['norm']:.4g} ({result['model']}, stack weights; corpus {result.get('corpus', DASH)})\n\n"
            + markdown_table(["split", "R(w)", "IQR", "95% CI (median)", "R / ‖w‖",
                         f"R_tau (tau = {result['settings']['tau']} nats)", "fits accepted"], rows))


def rtn_vs_random_table(result: dict) -> str:
    """Markdown: NLL of w_RTN per width against a random step of the same length from w."""
    rows = []
    for split in ("train", "validation"):
        for r in rtn_vs_random(result, split):
            rows.append([split, f"int{r['bits']}", f"{r['distance']:.4g}", nll_cell(r["nll_rtn"]),
                         nll_cell(r["nll_random"]) if r["nll_random"] is not None else "beyond the sweep",
                         f"{r['excess']:+.3f}" if r["excess"] is not None else DASH])
    return markdown_table(["split", "RTN", "‖w_RTN − w‖", "NLL w_RTN", "NLL random step, same length",
                      "RTN − random"], rows)


def barrier_table(result: dict, bits: int) -> str:
    """Markdown: per segment at ``bits``, the barrier max_a L(a) - (L(0) + L(1)) / 2, both splits."""
    train, val = (segment_barriers(result, bits, s) for s in ("train", "validation"))
    rows = [[f"{t['a']} → {t['b']}", nll_cell(t["nll_a"]), nll_cell(t["nll_b"]), f"{t['barrier']:+.3f}", f"{v['barrier']:+.3f}"]
            for t, v in zip(train, val)]
    return markdown_table(["segment", "train NLL start", "train NLL end", "barrier train", "barrier validation"], rows)


def radius_summary(analysis: dict) -> str:
    """Markdown, computed: does misalignment (eta = GPTQ - QAFT test NLL) start where rho =
    ‖w_RTN − w‖ / R(w) passes 1, as the paper's explanation says?"""
    rows = [[r["model"], r.get("corpus") or DASH, f"int{r['bits']}", f"{r['distance_rtn']:.4g}",
             f"{r['R']:.4g}" + (" (≥)" if r["R_is_bound"] else ""), f"{r['rho']:.2f}", f"{r['eta']:+.3f}"]
            for r in analysis["rows"]]
    table = markdown_table(["model", "corpus", "bits", "‖w_RTN − w‖", "R(w)", "rho", "eta (test)"], rows)
    gap, mis, ok = analysis["gap"], analysis["misaligned_rho"], analysis["aligned_rho"]
    lines = [f"Spearman correlation of eta with rho: {analysis['spearman']:.2f} over {analysis['n']} (model, width)."]
    if mis:
        lines.append(f"Misaligned (eta > {gap} nats) at rho = {', '.join(f'{x:.2f}' for x in mis)}; "
                     f"aligned at rho = {', '.join(f'{x:.2f}' for x in ok) or 'none'}.")
    below = [x for x in mis if x <= 1]
    above_ok = [x for x in ok if x > 1]
    bound = any(r["R_is_bound"] for r in analysis["rows"])
    if not mis:
        lines.append(f"No misalignment (eta > {gap} nats) at any width: nothing for rho to explain.")
    elif bound:  # R a lower bound: every rho an upper bound, so only rho <= 1 with misalignment is conclusive
        lines.append("R(w) is only a lower bound here (no bowl fit accepted), so every rho is an upper bound: "
                     + (f"misalignment already at rho ≤ {max(below):.2f} — **the threshold of the paper's "
                        f"explanation does not hold here**." if below else
                        "the threshold rho = 1 cannot be tested with these points (more radii or directions)."))
    elif not below and not above_ok:
        lines.append("rho = 1 separates them exactly: **the paper's explanation holds** on these records.")
    else:
        lines.append(f"rho = 1 separates them in {analysis['threshold_agrees']} of {analysis['n']} cases: "
                     + (f"misalignment already at rho ≤ 1 ({', '.join(f'{x:.2f}' for x in below)})" if below else "")
                     + ("; " if below and above_ok else "")
                     + (f"no misalignment at rho > 1 ({', '.join(f'{x:.2f}' for x in above_ok)})" if above_ok else "")
                     + " — **the threshold of the paper's explanation does not hold here**.")
    return table + "\n\n" + " ".join(lines)


def cached(tier: str, outputs) -> dict:
    """``{model: landscape}`` of the tier's ``landscape`` models whose every point is cached."""
    section = load_tier(tier).get("landscape") or {}
    found = {m: landscape(m, section.get("bits", [4]), tier, outputs, cached_only=True)
             for m in section.get("models") or []}
    return {m: result for m, result in found.items() if result is not None}


def more_directions(found: dict, outputs) -> dict | None:
    """``found`` (a cached landscape) over its settings' ``basin_directions``, when every point of that
    sweep is cached (computed on request: `repro batch --tier TIER --set landscape.directions=N
    03_landscape`), else None."""
    n = found["settings"].get("basin_directions")
    if not n or n <= found["settings"]["directions"]:
        return None
    return landscape(found["model"], found["bits"], found["tier"], outputs, cached_only=True,
                     corpus=found.get("corpus"), directions=n)


def _provenance(found: dict, command: str) -> str:
    codes = ", ".join(sorted({p.get("code", "unknown") for p in found["points"]}))
    return (f"*Generated from {len(found['points'])} cached landscape points by `{command}`: tier {found['tier']}, "
            f"model {found['model']}, code {codes}.*")


def sections(tier: str, outputs, model: str | None = None, command: str = "") -> dict:
    """``landscape-MODEL`` per model of the tier's ``landscape`` section whose points are all cached:
    the segments' barriers per width, the basin radius, its test against the misalignment, RTN
    against a random step of the same length; ``basin-MODEL``: the basin radius and its test over the
    tier's ``basin_directions``, where those points are cached (``more_directions``)."""
    result = {}
    for m, found in cached(tier, outputs).items():
        analysis = misalignment_vs_radius([found], outputs, compute=False)
        result[f"landscape-{m}"] = "\n\n".join(
            [f"int{b} segments:\n\n{barrier_table(found, b)}" for b in found["bits"]]
            + [f"Basin radius:\n\n{basin_table(found)}", radius_summary(analysis),
               f"RTN against a random step of the same length:\n\n{rtn_vs_random_table(found)}",
               _provenance(found, command)])
        more = more_directions(found, outputs)
        if more is not None:
            result[f"basin-{m}"] = "\n\n".join(
                [f"Basin radius over {more['settings']['directions']} directions:\n\n{basin_table(more)}",
                 radius_summary(misalignment_vs_radius([more], outputs, compute=False)), _provenance(more, command)])
    return result


def figures(tier: str, outputs, model: str | None = None) -> dict:
    """Per cached landscape: Fig. 3 at each width, the basin fits, and eta against rho where measured."""
    default = tier_models(tier, model)[0]
    drawn = {}
    for m, found in cached(tier, outputs).items():
        end = suffix(tier, m, default)
        drawn.update({f"landscape_int{b}{end}": (lambda found=found, b=b: plots.landscape(found, b))
                      for b in found["bits"]})
        drawn[f"basin{end}"] = lambda found=found: plots.basin_fits(found)
        more = more_directions(found, outputs)
        if more is not None:
            drawn[f"basin_directions{more['settings']['directions']}{end}"] = lambda more=more: plots.basin_fits(more)
        analysis = misalignment_vs_radius([found], outputs, compute=False)
        if analysis["rows"]:
            drawn[f"eta_vs_rho{end}"] = lambda analysis=analysis: plots.eta_vs_rho(analysis)
    return drawn
