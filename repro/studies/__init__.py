"""The studies: one module per study, each owning its runs, its records, its tables and its figures.

A study module defines

- ``NOTEBOOKS``: its notebooks, each a ``Notebook`` (name, the runs it reads, per model or over
  all models, the tier section whose ``models`` list replaces the tier's for it);
- ``configs(tier, model, bits)``: its run list (``RunConfig``s; ``bits`` None: the tier's widths);
- ``sections(tier, outputs, model, command)``: ``{README marker: markdown}`` from cached records
  only (``model`` None: the tier's models; a study with nothing cached returns ``{}``);
- ``figures(tier, outputs, model)``: ``{file stem: draw()}``, the figures ``repro figures`` saves,
  from cached records only;
- its tables (records in, markdown out), which its notebook prints.

``STUDIES`` lists them in the order the README reads them; ``NOTEBOOKS`` maps each notebook to its
entry. To add a study: write its module, add it here, add its notebook (``docs/ARCHITECTURE.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from repro import store
from repro.config import load_tier, tier_name


@dataclass(frozen=True)
class Notebook:
    """One notebook: ``configs(tier, model, bits)`` are the runs it reads, computed before it
    executes (``repro.batch``); ``per_model``: executed once per model (else once over all of the
    tier's models); ``section``: the tier section whose ``models`` replace the tier's list;
    ``precompute``: its other cached work, shared by the batch's worker processes."""

    name: str
    configs: Callable[[str, str, list | None], list]
    per_model: bool = True
    section: str | None = None
    # what else the notebook computes beyond runs, done by `repro batch`'s worker processes before it executes:
    # ``precompute(tier, model, bits, outputs, take)``, ``take(path)`` a context manager that says whether this
    # process computes the result cached at ``path`` (``repro.batch.claim``)
    precompute: Callable | None = None


class NoRecordsError(LookupError):
    """A report or figure needs records that have not been computed; the message says how."""


def read_records(configs, outputs) -> list[dict]:
    """The cached records of ``configs`` (those not computed are left out)."""
    return [r for r in (store.read_record(c, outputs) for c in configs) if r is not None]


def tier_models(tier: str, model: str | None = None, section: str | None = None) -> list[str]:
    """``[model]`` when one is chosen; else the tier's default model, its ``models`` and, with
    ``section``, that tier section's ``models`` (each once, in that order)."""
    if model:
        return [model]
    params = load_tier(tier)
    extra = (params.get(section) or {}).get("models") or [] if section else []
    return list(dict.fromkeys([params["model"], *(params.get("models") or []), *extra]))


def suffix(tier: str, model: str, default: str) -> str:
    """A figure file's suffix: ``_<tier>`` for the default model, ``_<tier>_<model>`` for the others."""
    return f"_{tier_name(tier)}" + ("" if model == default else f"_{model.replace('/', '--')}")


from repro.studies import cross_block, datasets, granularity, landscape, pareto, premise, seeds, sweep  # noqa: E402

STUDIES = {"sweep": sweep, "pareto": pareto, "landscape": landscape, "cross_block": cross_block,
           "datasets": datasets, "seeds": seeds, "premise": premise, "granularity": granularity}
NOTEBOOKS = {nb.name: nb for nb in sorted((nb for study in STUDIES.values() for nb in study.NOTEBOOKS),
                                          key=lambda nb: nb.name)}
