"""ipywidgets front-end over cached records: pick the runs, see the paper's figures redraw at once.

``explorer()`` shows controls for tier, model, corpus, methods, bits, observer and granularity and a
figure chooser (NLL per width and the per-layer MSE; paper Fig. 1, 2, 3, 7; the locality spectrum).
Figures redraw from cached records only, so a change of control costs milliseconds. What the
selection needs and is not cached is listed; "compute missing" runs it in a background thread
(the kernel and the display stay free) with a progress bar, and "cancel" stops it after the run
in progress (a run is the unit of work and of caching).
"""
from __future__ import annotations

import threading
from pathlib import Path

from repro import runs, store
from repro.config import TIERS, RunConfig, load_tier, make_config, sweep_configs
from repro.data import CORPORA
from repro.methods import QUANTIZERS
from repro.quant import GRANULARITIES, OBSERVERS

FIGURES = ("NLL per width + layer MSE", "Fig. 1: GPTQ vs QAFT", "Fig. 2: Pareto front", "Fig. 3: landscape",
           "Fig. 7: QAFT epochs", "locality spectrum")


def selection_configs(tier: str, model: str, corpus: str, methods, bits, observer: str | None,
                      granularity: str, figure: str = FIGURES[0]) -> list[RunConfig]:
    """The runs a figure of the selection reads: FP and ``methods`` at ``bits`` (``observer``
    None: the tier's per width), Fig. 2 over every model of the tier, the spectrum adds the tier's
    block-wise variants."""
    grid = {"granularity": granularity, "observer": observer}  # (None: the tier's; see make_config)
    models = load_tier(tier).get("models", [model]) if figure == FIGURES[2] else [model]
    configs = [c for m in models for c in sweep_configs(("fp", *methods), list(bits), tier, model=m,
                                                             corpus=corpus, **grid)]
    if figure == FIGURES[5]:
        variants = (load_tier(tier).get("cross_block") or {}).get("variants", [])
        configs += [make_config("blockwise", b, tier, options=dict(v), model=model, corpus=corpus, **grid)
                    for b in bits for v in variants]
    return configs


def draw(figure: str, records: list[dict], tier: str, model: str, bits, outputs=None):
    """The matplotlib figure for ``figure`` from ``records`` (cached only), or None with nothing to draw."""
    import matplotlib.pyplot as plt

    from repro import plots
    from repro.studies import landscape

    mine = [r for r in records if r["config"]["model"] == model]
    if figure == FIGURES[0]:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [1, 2]})
        plots.nll_vs_bits(mine, metric="nll_test", ax=left)
        plots.layer_mse_profile([r for r in mine if r["config"]["bits"]], ax=right, title="layer MSE (test)")
        return fig
    if figure == FIGURES[1]:
        return plots.misalignment_scatter(mine)
    if figure == FIGURES[2]:
        return plots.pareto(records)
    if figure == FIGURES[3]:
        result = landscape.landscape(model, list(bits), tier, outputs, cached_only=True)
        return plots.landscape(result, max(bits)) if result else None
    if figure == FIGURES[4]:
        return plots.qaft_epochs(mine)
    return plots.spectrum(mine, max(bits), model)


def explorer(outputs: Path | str | None = None, tier: str = "ci"):
    """The explorer widget (see the module docstring); ``outputs``: the results directory."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    params = load_tier(tier)
    models = list(params.get("models") or [params["model"]])

    style = {"description_width": "initial"}
    controls = {
        "tier": w.Dropdown(options=list(dict.fromkeys([*TIERS, tier])), value=tier, description="tier"),
        "model": w.Dropdown(options=models, value=models[0], description="model"),
        "corpus": w.Dropdown(options=list(CORPORA), value=params.get("corpus", "wiki"), description="corpus"),
        "methods": w.SelectMultiple(options=list(QUANTIZERS), value=["rtn"], description="methods", rows=3),
        "bits": w.SelectMultiple(options=[8, 6, 4, 3, 2], value=[b for b in (8, 4, 3) if b in params["bits"]] or
                                 [params["bits"][0]], description="bits", rows=5),
        "observer": w.Dropdown(options=[("tier's per width", "tier"), *[(o, o) for o in OBSERVERS]], value="tier",
                               description="observer", style=style),
        "granularity": w.Dropdown(options=list(GRANULARITIES), value="tensor", description="granularity", style=style),
        "figure": w.Dropdown(options=list(FIGURES), value=FIGURES[0], description="figure",
                             layout=w.Layout(width="340px")),
    }
    status = w.HTML()
    out = w.Output(layout=w.Layout(min_height="320px"))
    bar = w.IntProgress(min=0, max=1, value=0, description="runs", layout=w.Layout(visibility="hidden"))
    compute, cancel = w.Button(description="compute missing", icon="play"), w.Button(description="cancel", icon="stop",
                                                                                     disabled=True)
    worker = {"thread": None, "stop": threading.Event()}
    drawing = threading.Lock()  # the worker thread redraws too: one redraw (pyplot, out.outputs) at a time

    def selection() -> list[RunConfig]:
        v = {k: c.value for k, c in controls.items()}
        return selection_configs(v["tier"], v["model"], v["corpus"], v["methods"], sorted(v["bits"], reverse=True),
                                 None if v["observer"] == "tier" else v["observer"], v["granularity"], v["figure"])

    def redraw(*_):
        with drawing:
            _redraw()

    def _redraw():
        try:
            if not controls["bits"].value or not controls["methods"].value:
                raise ValueError("pick at least one method and one bit-width")
            configs = selection()
        except ValueError as err:  # e.g. a width the tier has no observer for
            status.value = f"<b>not a valid selection</b>: {err}"
            compute.disabled = True
            out.outputs = ()
            return
        found = [(c, store.read_record(c, outputs)) for c in configs]
        records = [r for _, r in found if r is not None]
        missing = [c for c, r in found if r is None]
        status.value = (f"{len(records)} cached run(s)" + (f"; <b>{len(missing)} missing</b>: " +
                        ", ".join(f"{c.model} {c.label()}" for c in missing[:6]) + (" …" if len(missing) > 6 else "")
                        if missing else ""))
        compute.disabled = not missing or worker["thread"] is not None
        try:
            fig = draw(controls["figure"].value, records, controls["tier"].value, controls["model"].value,
                       sorted(controls["bits"].value), outputs) if records else None
        except Exception as err:  # noqa: BLE001 - a figure that cannot be drawn says why, the widget stays
            status.value += f" — <b>cannot draw</b>: {type(err).__name__}: {err}"
            fig = None
        # the output's state replaced (under the lock), not printed into with `with out:`, which
        # does not work from the worker thread; clear_output(wait=True) would wait for an output
        # message that never comes
        out.outputs = ()
        if fig is None:
            out.append_stdout("Nothing cached to draw for this selection: press 'compute missing'.\n")
        else:
            out.append_display_data(fig)
            plt.close(fig)

    def work(configs):
        try:
            for i, config in enumerate(configs):
                if worker["stop"].is_set():
                    break
                bar.description = f"{i + 1}/{len(configs)}"
                runs.run(config, outputs)
                bar.value = i + 1
        except Exception as err:  # noqa: BLE001 - shown in the widget, the kernel stays usable
            failed = f"<b>failed</b>: {type(err).__name__}: {err}"
        else:
            failed = None
        finally:
            worker["thread"] = None
            cancel.disabled = True
            bar.layout.visibility = "hidden"
        redraw()  # what was computed before a failure is drawn, and the button comes back
        if failed:
            status.value = failed + " — " + status.value

    def start(_):
        try:
            missing = [c for c in selection() if store.read_record(c, outputs) is None]
        except ValueError as err:
            status.value = f"<b>not a valid selection</b>: {err}"
            return
        if not missing or worker["thread"] is not None:
            return
        worker["stop"].clear()
        bar.max, bar.value, bar.layout.visibility = len(missing), 0, "visible"
        compute.disabled, cancel.disabled = True, False
        worker["thread"] = threading.Thread(target=work, args=(missing,), daemon=True)
        worker["thread"].start()

    def stop(_):
        worker["stop"].set()
        cancel.disabled = True
        status.value += " — cancelling after the run in progress"

    def retier(change):  # the tier's models and corpus
        p = load_tier(change["new"])
        controls["model"].options = list(p.get("models") or [p["model"]])
        controls["corpus"].value = p.get("corpus", "wiki")

    controls["tier"].observe(retier, names="value")
    for control in controls.values():
        control.observe(redraw, names="value")
    compute.on_click(start)
    cancel.on_click(stop)
    redraw()
    box = w.VBox([w.HBox([controls["tier"], controls["model"], controls["corpus"]]),
                  w.HBox([controls["methods"], controls["bits"],
                          w.VBox([controls["observer"], controls["granularity"], controls["figure"]])]),
                  w.HBox([compute, cancel, bar]), status, out])
    box.controls = controls  # for scripted use (and the tests)
    return box
