"""scripts/compare_records.py: whether a recomputation reproduced a results directory's records."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import compare_records  # noqa: E402


def test_compare_records_ignores_times_and_code_version_only(tmp_path, capsys):
    """scripts/compare_records.py: a recomputation at another code version on another day is "same";
    any result that moved is named with its path."""
    record = {"key": "k", "nll_test": 3.1, "wall_s": {"method": 1.0}, "created": "day 1", "info": {"solve_s": 2.0},
              "versions": {"code": "aaa", "method": 2}, "environment": {"torch": "2.13", "threads": 1, "hostname": "a"}}
    again = {**record, "wall_s": {"method": 9.0}, "created": "day 2", "info": {"solve_s": 3.0},
             "versions": {"code": "bbb", "method": 2}, "environment": {"torch": "2.13", "threads": 1, "hostname": "b"}}
    for root, content in (("a", record), ("b", again)):
        (tmp_path / root / "records" / "rtn").mkdir(parents=True)
        (tmp_path / root / "records" / "rtn" / "r.json").write_text(json.dumps(content))
    assert compare_records.main(tmp_path / "a", tmp_path / "b") == 0
    (tmp_path / "b" / "records" / "rtn" / "r.json").write_text(json.dumps({**again, "nll_test": 3.2}))
    assert compare_records.main(tmp_path / "a", tmp_path / "b") == 1
    assert "differs at .nll_test: 3.1 != 3.2" in capsys.readouterr().out
