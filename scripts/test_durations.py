"""The slowest tests and notebook cells of a pytest run, and the time per group, as markdown.

    python -m pytest ... --junitxml=run.xml tests notebooks
    python scripts/test_durations.py run.xml [N]

Groups: the nbval notebooks together, then each test file.
"""
import sys
import xml.etree.ElementTree as ET
from collections import Counter


def durations(path: str) -> list[tuple[float, str]]:
    cases = ET.parse(path).getroot().iter("testcase")
    return sorted(((float(c.get("time") or 0), f"{c.get('classname')}::{c.get('name')}") for c in cases), reverse=True)


def table(path: str, n: int = 25) -> str:
    rows = durations(path)
    total = sum(s for s, _ in rows)
    groups = Counter()
    for s, name in rows:
        groups["notebooks (nbval)" if ".ipynb" in name else f"tests/{name.split('::')[0].split('.')[-1]}.py"] += s
    lines = [f"{len(rows)} items, {total:.0f} s of test time", "", "| seconds | test or notebook cell |", "| ---: | --- |"]
    lines += [f"| {s:.1f} | `{name}` |" for s, name in rows[:n]]
    lines += ["", "| group | seconds | share |", "| --- | ---: | ---: |"]
    lines += [f"| {g} | {s:.0f} | {100 * s / total:.1f}% |" for g, s in groups.most_common()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
