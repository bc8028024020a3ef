"""Do two results directories hold the same records? ``python scripts/compare_records.py A B``

For every run record (``records/<method>/*.json``) present in both, compares everything but what a
recomputation may change without changing a result (``repro.store.comparable``): wall-clock times, the
code version and the machine's name. Prints one line per record, ``same`` or the first differing path,
and exits 1 when any differs (0 when all of at least one shared record agree). Use it to show that a new code version reproduces an older one's records:
compute a few of them again into an empty directory (``repro run --outputs NEW ...``), then compare.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from repro.store import comparable


def first_difference(a, b, path="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k} (only in {'B' if k not in a else 'A'})"
            found = first_difference(a[k], b[k], f"{path}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b else f"{path}: {str(a)[:60]} != {str(b)[:60]}"


def main(a: Path, b: Path) -> int:
    shared = sorted(p.relative_to(b) for p in (b / "records").glob("*/*.json") if (a / p.relative_to(b)).is_file())
    differing = 0
    for rel in shared:
        left, right = (comparable(json.loads((root / rel).read_text())) for root in (a, b))
        found = first_difference(left, right)
        differing += found is not None
        print(f"{rel}: {'same' if found is None else 'differs at ' + found}")
    print(f"{len(shared) - differing} of {len(shared)} shared records the same")
    return 1 if differing or not shared else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or not all(Path(d, "records").is_dir() for d in sys.argv[1:]):
        sys.exit("usage: python scripts/compare_records.py A B  (two results directories, each with records/)")
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
