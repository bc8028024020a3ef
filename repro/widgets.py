"""ipywidgets front-end over cached records: pick model, method, bits; plots update."""
from __future__ import annotations

import json
from pathlib import Path

from repro.runs import outputs_dir


def load_records(outputs: Path | str | None = None) -> list[dict]:
    """Every record under ``outputs/records`` (no computation)."""
    root = Path(outputs) if outputs is not None else outputs_dir()
    return [json.loads(p.read_text()) for p in sorted((root / "records").glob("*/*.json"))]


def explorer(outputs: Path | str | None = None):
    """Interactive view of cached runs: NLL per bits and the per-layer MSE of the chosen run."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from repro import plots

    records = load_records(outputs)
    if not records:
        return w.HTML("No records yet: run a notebook or <code>repro run</code> first.")
    model = w.Dropdown(options=sorted({r["config"]["model"] for r in records}), description="model")
    method = w.Dropdown(options=sorted({r["config"]["method"] for r in records if r["config"]["bits"]}),
                        description="method")
    bits = w.Dropdown(options=sorted({r["config"]["bits"] for r in records if r["config"]["bits"]}, reverse=True),
                      description="bits")
    out = w.Output()

    def draw(*_):
        chosen = [r for r in records if r["config"]["model"] == model.value]
        run = [r for r in chosen if r["config"]["method"] == method.value and r["config"]["bits"] == bits.value]
        with out:
            out.clear_output(wait=True)
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [1, 2]})
            plots.nll_vs_bits(chosen, ax=ax1)
            if run:
                plots.layer_mse_profile(run[:1], ax=ax2, title=f"{method.value} int{bits.value}")
            else:
                ax2.set_title(f"no cached {method.value} int{bits.value} run")
            display(fig)
            plt.close(fig)

    for control in (model, method, bits):
        control.observe(draw, names="value")
    draw()
    return w.VBox([w.HBox([model, method, bits]), out])
