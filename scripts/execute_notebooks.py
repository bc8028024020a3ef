"""Execute the notebooks in place at the ci tier: the outputs nbval compares (`make notebooks`).

The ``.ipynb`` files are the notebooks' source: edit them in JupyterLab, then run this before
committing. ``python scripts/execute_notebooks.py [--outputs DIR] [NAME ...]``: each notebook (default:
all but the explorer, in order) is executed with its own parameters (papermill adds no parameters cell)
over one results directory, by default a fresh one, so no record of older code is read; pass
``--outputs`` with a directory of this code's ci records (e.g. one `python tests/ci_records.py`
filled) to read them instead of computing.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import papermill

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names without .ipynb (default: all but explore)")
    parser.add_argument("--outputs", help="results directory (default: a fresh temporary one)")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb"))
    os.environ["REPRO_OUTPUTS"] = args.outputs or tempfile.mkdtemp(prefix="repro-notebooks-")
    os.environ["REPRO_PROGRESS"] = "0"
    for name in names:
        path = NOTEBOOKS / f"{name}.ipynb"
        start = time.perf_counter()
        papermill.execute_notebook(str(path), str(path), cwd=str(NOTEBOOKS), progress_bar=False)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"records in {os.environ['REPRO_OUTPUTS']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
