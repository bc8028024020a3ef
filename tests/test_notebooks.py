"""The committed notebooks are the source (edited in JupyterLab, executed by `make notebooks`): each
has one ``parameters`` cell that papermill can replace, and nothing a parameterised run injects."""
import json
from pathlib import Path

import pytest

from repro import studies

FILES = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_every_batch_notebook_is_committed():
    assert {f"{name}.ipynb" for name in studies.NOTEBOOKS} <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_notebook_has_one_parameters_cell_and_no_injected_one(path):
    cells = json.loads(path.read_text())["cells"]
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert sum("parameters" in t for t in tags) == 1 and "parameters" in code[0]["metadata"].get("tags", [])
    assert not any("injected-parameters" in t for t in tags)  # executed without -p: nothing injected
    assert 'tier = "ci"' in "".join(code[0]["source"])  # what CI and nbval execute
    ids = [c.get("id") for c in cells]
    assert None not in ids and len(set(ids)) == len(ids)


@pytest.mark.parametrize("path", [p for p in FILES if p.stem != "explore"], ids=lambda p: p.stem)
def test_a_study_notebook_is_executed_and_has_checked_cells(path):
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    checked = [c for c in code if "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    assert checked and all(c["outputs"] for c in checked)  # nbval compares what `make notebooks` wrote
    assert all(c.get("execution_count") for c in code)  # executed top to bottom, none skipped
