import copy
import dataclasses
import json

import pytest
import torch

from repro import cli, evaluate, runs, store
from repro import config as config_mod
from repro.config import RunConfig, load_tier, make_config, sweep_configs
from repro.methods import METHODS


def test_config_hash_covers_what_determines_a_run():
    a = make_config("rtn", 4, tier="ci")
    assert a.key() == make_config("rtn", 4, tier="ci").key()
    assert a.key() == make_config("rtn", 4, tier="ci", device="cpu").key()  # placement only
    assert a.threads == 1 and a.key() == make_config("rtn", 4, tier="ci", threads=2).key()  # rounding only
    for other in (make_config("rtn", 3, tier="ci"), make_config("rtn", 4, tier="ci", seed=1),
                  make_config("rtn", 4, tier="ci", observer="mse"), make_config("rtn", 4, tier="cpu")):
        assert other.key() != a.key()


def test_bad_config_values_fail_early(capsys):
    def cli_error(argv):
        """The CLI's exit status 2 and its one-line message."""
        assert cli.main(argv) == 2
        return capsys.readouterr().err

    with pytest.raises(ValueError, match="2..8"):
        make_config("rtn", 1, tier="ci")
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        make_config("awq", 4, tier="ci")
    with pytest.raises(ValueError, match="unknown tier"):
        make_config("rtn", 4, tier="huge")
    assert "bits=9 is not supported" in cli_error(["run", "--bits", "9", "--tier", "ci"])
    with pytest.raises(ValueError, match="method 'fp' quantizes nothing"):
        make_config("fp", 4, tier="ci")
    assert "--method fp quantizes nothing" in cli_error(["run", "--method", "fp", "--bits", "4", "--tier", "ci"])
    assert "put notebook names before --models" in cli_error(["batch", "--tier", "ci", "--models", "smollm2-135m",
                                                             "00_quickstart"])
    with pytest.raises(ValueError, match="seed='a': an integer >= 0"):
        make_config("rtn", 4, tier="ci", seed="a")
    with pytest.raises(ValueError, match="is not a torch device"):
        make_config("rtn", 4, tier="ci", device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            make_config("rtn", 4, tier="ci", device="cuda")
        assert "CUDA is not available here" in cli_error(["run", "--bits", "4", "--tier", "ci", "--device", "cuda"])


def test_bit_widths_as_notebooks_and_papermill_pass_them():
    """None, an int, a list, or text of either (papermill's -p passes unparsable values as text); a typo is
    named as typed, not read character by character."""
    from repro.config import bit_widths

    assert bit_widths(None, [8, 4]) == [8, 4] and bit_widths(3) == [3] and bit_widths([4, 2]) == [4, 2]
    assert bit_widths("4") == [4] and bit_widths("[4, 3]") == [4, 3]
    for bad in ("five", "", [], ["4"], 4.0, True, "[4, x]"):
        with pytest.raises(ValueError, match=r"bits=.*give a width as an integer"):
            bit_widths(bad)
    with pytest.raises(ValueError, match="bits=9 is not supported"):
        bit_widths(9)
    assert [c.bits for c in sweep_configs(("rtn",), 4, "ci")] == [4]


def test_tier_settings_per_model(monkeypatch):
    smol, gemma = (make_config("rtn", 8, tier="cpu", model=m) for m in load_tier("cpu")["models"])
    settings = load_tier("cpu")["model_settings"]["gemma3-270m"]
    assert gemma.observer == settings["observer"][8] and smol.observer == load_tier("cpu")["observer"][8]
    assert gemma.seq_len == smol.seq_len  # what a model does not set is the tier's
    # a model's method options are merged into the tier's per option, not replaced
    tier = load_tier("cpu")
    tier["model_settings"]["gemma3-270m"]["methods"] = {"qaft": {"mixed_precision": "no"}}
    monkeypatch.setattr(config_mod, "load_tier", lambda name: copy.deepcopy(tier))
    smol_qaft, gemma_qaft = (make_config("qaft", 4, tier="cpu", model=m) for m in ("smollm2-135m", "gemma3-270m"))
    assert (smol_qaft.options["mixed_precision"], gemma_qaft.options["mixed_precision"]) == ("bf16", "no")
    assert gemma_qaft.options["lr_grid"] == smol_qaft.options["lr_grid"]


def test_outputs_dir_is_the_checkouts_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("REPRO_OUTPUTS", raising=False)
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    for cwd in (root, root / "notebooks"):
        monkeypatch.chdir(cwd)
        assert store.outputs_dir() == root.resolve() / "outputs"
    monkeypatch.setenv("REPRO_OUTPUTS", str(tmp_path / "elsewhere"))
    assert store.outputs_dir() == tmp_path / "elsewhere"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    store.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        store.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.embedded
def test_interrupted_sweep_resumes_from_records(tmp_path, monkeypatch, embedded):
    fn = METHODS["rtn"].run
    calls = []

    def flaky(model, data, config):
        calls.append(config.bits)
        if config.bits == 4 and len(calls) < 3:
            raise KeyboardInterrupt  # killed mid-batch
        return fn(model, data, config)

    monkeypatch.setitem(METHODS, "rtn", dataclasses.replace(METHODS["rtn"], run=flaky))
    with pytest.raises(KeyboardInterrupt):
        runs.sweep(methods=("rtn",), bits=(8, 4), tier="ci", outputs=tmp_path)
    assert len(list(tmp_path.glob("records/rtn/*.json"))) == 1
    records = runs.sweep(methods=("rtn",), bits=(8, 4), tier="ci", outputs=tmp_path)
    assert [r["cached"] for r in records] == [True, False]
    assert calls == [8, 4, 4]


@pytest.mark.embedded
def test_cli_run_writes_record_and_summary(tmp_path, capsys, embedded):
    argv = ["run", "--method", "rtn", "--bits", "6", "--tier", "ci", "--outputs", str(tmp_path)]
    assert cli.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("rtn smollm2-135m int6 (minmax, wiki): NLL val ")
    (path,) = tmp_path.glob("records/rtn/*.json")
    record = json.loads(path.read_text())
    assert record["config"]["bits"] == 6 and record["nll_validation"] > 0
    assert len(record["layer_mse"]) == 210
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip().endswith("[cached]")


def test_figures_draw_the_tiers_records_only(tmp_path, capsys):
    """`repro figures` picks the tier's configs, not every record on disk (e.g. other observers)."""
    tier_config = make_config("rtn", 4, tier="ci")
    other_observer = make_config("rtn", 4, tier="ci", observer="minmax")  # the tier's: histogram
    for config, nll in ((tier_config, 14.9), (other_observer, 10.4)):
        store.write_json_atomic(store.record_path(config, tmp_path),
                               {"config": dataclasses.asdict(config), "nll_validation": nll, "nll_test": nll - 0.5})
    configs = sweep_configs(("fp", "rtn"), tier="ci")
    records = [r for r in (store.read_record(c, tmp_path) for c in configs) if r is not None]
    assert [(r["config"]["observer"], r["nll_validation"], r["cached"]) for r in records] == [("histogram", 14.9, True)]
    assert cli.main(["figures", "--tier", "ci", "--outputs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "figures" / "nll_vs_bits_ci.png")]
    assert (tmp_path / "figures" / "nll_vs_bits_ci.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no records for tier cpu"):
        cli.main(["figures", "--tier", "cpu", "--outputs", str(tmp_path)])


def test_method_options_are_checked_when_the_config_is_made():
    from repro.config import RunConfig

    with pytest.raises(ValueError, match="takes no options"):
        RunConfig(method="rtn", options={"window": 2})
    with pytest.raises(ValueError, match="unknown block-wise option"):
        RunConfig(method="blockwise", options={"windw": 2})
    with pytest.raises(ValueError, match="unknown QAFT option"):
        RunConfig(method="qaft", options={"epoch": 2})


def test_cli_options_are_read_as_yaml():
    from repro.config import parse_values

    assert parse_values(["window=2", "lr=1e-3", "mixed_precision=bf16"]) == {"window": 2, "lr": 1e-3,
                                                                          "mixed_precision": "bf16"}
    assert parse_values(["mixed_precision=no", "act_order=true", "stride=null"]) == {
        "mixed_precision": "no", "act_order": True, "stride": None}  # YAML 1.1's no/yes stay words
    assert parse_values(["lr_grid=[1e-4, 1.0e-3]"]) == {"lr_grid": [1e-4, 1e-3]}  # (1e-4 is a string to YAML)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_values(["window"])


def test_a_corrupt_record_is_moved_aside_and_recomputed(tmp_path):
    config = make_config("rtn", 4, tier="ci")
    path = store.record_path(config, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"key": "')  # a write cut short
    with pytest.warns(UserWarning, match=f"record {path} is unreadable"):
        assert store.read_record(config, tmp_path) is None
    assert not path.exists() and path.with_name(path.name + ".corrupt").read_text() == '{"key": "'
    path.write_text(json.dumps({"key": "another"}))  # valid JSON, but not this config's
    with pytest.warns(UserWarning, match="not '" + config.key()):
        assert store.read_record(config, tmp_path) is None


def test_unwritable_outputs_fail_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RuntimeError, match="cannot write results to .*a-file.*--outputs or REPRO_OUTPUTS"):
        runs.run(make_config("rtn", 4, tier="ci"), outputs=blocker)  # outputs/records under a file


def test_two_runs_of_one_config_at_once_compute_it_once(tmp_path, monkeypatch):
    """Two `repro batch` on one outputs/ at the same time: the record's lock makes the second wait
    and read what the first wrote (threads here; flock locks between open files alike)."""
    import threading
    import time
    import types

    import torch

    calls = []

    def slow_rtn(model, data, config):
        calls.append(config.key())
        time.sleep(0.3)  # long enough for the other thread to arrive while this one computes
        return {}

    config = make_config("rtn", 4, tier="ci")
    bench = types.SimpleNamespace(model=torch.nn.Linear(1, 1), data=None, fp_weights={}, fp_test_grams={},
                                  fp_test_hidden=(config.batch_size, []))
    monkeypatch.setattr(runs, "workbench", lambda config: bench)
    monkeypatch.setattr(evaluate, "record_metrics", lambda *args, **kwargs: {"nll_validation": 1.0, "nll_test": 1.0})
    monkeypatch.setitem(runs.METHODS, "rtn", dataclasses.replace(runs.METHODS["rtn"], run=slow_rtn))
    results = []
    threads = [threading.Thread(target=lambda: results.append(runs.run(config, tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [config.key()]
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["key"] == results[1]["key"] == config.key()


def test_an_embedded_model_is_built_once_by_concurrent_loaders(tmp_path, monkeypatch):
    import threading
    import time

    from repro import models

    builds = []

    def fake_build(name, target):
        builds.append(name)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_build_embedded", fake_build)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(models.ensure_embedded("smollm2-135m"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["smollm2-135m"] and paths == [tmp_path / "models" / "smollm2-135m"] * 2


@pytest.mark.parametrize("field, value", [("n_eval", 0), ("n_calibration", 0), ("seq_len", 1), ("batch_size", 0),
                                          ("n_eval", 2.5), ("threads", 0)])
def test_bad_sizes_are_refused_when_the_config_is_made(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}: an integer"):
        RunConfig(method="rtn", **{field: value})


def test_pinned_threads_set_the_count_inside_and_restore_it():
    import torch

    before = torch.get_num_threads()
    with runs.pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with runs.pinned_threads(None):  # torch's default: left alone
        assert torch.get_num_threads() == before


def test_cli_bench_refuses_an_unknown_benchmark(capsys):
    assert cli.main(["bench", "gptqq"]) == 2
    assert "unknown benchmark(s) gptqq" in capsys.readouterr().err


def test_a_tier_file_with_a_base_and_set_overrides_enter_the_key(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: ci\nseq_len: 64\nmethods:\n  qaft:\n    epochs: 3\n")
    tier = load_tier(str(mine))
    ci = load_tier("ci")
    assert tier["seq_len"] == 64 and tier["methods"]["qaft"]["epochs"] == 3
    assert tier["methods"]["qaft"]["lr_grid"] == ci["methods"]["qaft"]["lr_grid"]  # merged dict by dict
    assert config_mod.tier_name(str(mine)) == "mine"
    own = make_config("qaft", 4, str(mine))
    assert own.seq_len == 64 and own.options["epochs"] == 3 and own.key() != make_config("qaft", 4, "ci").key()

    derived = config_mod.derive_tier("ci", config_mod.parse_settings(["seq_len=64", "methods.qaft.epochs=3"]), tmp_path)
    per_width = config_mod.derive_tier("ci", config_mod.parse_settings(["observer.4=mse"]), tmp_path)
    assert make_config("rtn", 4, per_width).observer == "mse" and make_config("rtn", 3, per_width).observer == "mse"
    assert make_config("rtn", 4, "ci").observer == "histogram"  # the width's own key, not a string '4' beside it
    assert derived == config_mod.derive_tier("ci", {"seq_len": 64, "methods": {"qaft": {"epochs": 3}}}, tmp_path)
    assert make_config("qaft", 4, derived).key() == own.key()  # the same settings, the same record
    with pytest.raises(ValueError, match="--set seq_lenn: not a setting of tier ci"):
        config_mod.derive_tier("ci", {"seq_lenn": 64}, tmp_path)
    with pytest.raises(ValueError, match="unknown tier 'laptop'.*ci, cpu, paper or the path of a YAML file"):
        load_tier("laptop")
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ValueError, match="comes back to a file it started from"):
        load_tier(str(loop))
    relative = tmp_path / "sub" / "child.yaml"  # base: a path relative to the file that names it
    relative.parent.mkdir()
    relative.write_text("base: ../mine.yaml\nseed: 3\n")
    assert load_tier(str(relative))["seq_len"] == 64 and load_tier(str(relative))["seed"] == 3


def test_a_users_tier_file_is_checked_with_the_file_and_the_fix_named(tmp_path):
    broken, bare, short = tmp_path / "broken.yaml", tmp_path / "bare.yaml", tmp_path / "short.yaml"
    broken.write_text("base: cpu\nseq_len: [64\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML"):
        load_tier(str(broken))
    bare.write_text("seq_len: 64\n")
    with pytest.raises(ValueError, match=r"bare.yaml: a tier sets model, corpus, bits; missing model, corpus, bits\. "
                                         r"Start from a shipped tier with `base: cpu`"):
        load_tier(str(bare))
    short.write_text("base: ci\nmethods:\n  blockwise:\n    lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as text
    assert make_config("blockwise", 4, str(short)).options["lr"] == 1e-4


def test_cli_set_runs_on_a_derived_tier(tmp_path, capsys):
    code = cli.main(["run", "--tier", "ci", "--method", "fp", "--set", "seq_lenn=64", "--outputs", str(tmp_path)])
    assert code == 2 and "--set seq_lenn: not a setting of tier ci" in capsys.readouterr().err
    code = cli.main(["run", "--tier", "ci", "--method", "fp", "--corpus", str(tmp_path / "missing.txt"),
                     "--outputs", str(tmp_path)])
    assert code == 2 and "unknown corpus" in capsys.readouterr().err


def test_a_missing_extra_is_named():
    from repro import require

    with pytest.raises(ImportError, match=r"no_such_module is not installed; .*pip install 'repro-lowbit-quant\[notebooks\]'"):
        require("no_such_module", "notebooks")
    assert require("yaml", "core").safe_load("a: 1") == {"a": 1}


def test_a_records_code_version_covers_the_code_and_its_own_tier_settings_only(tmp_path):
    """``runs.code_hash(tier)``: the compute sources and the tier's settings as ``load_tier`` reads them
    (its ``base:`` chain merged), so that editing another tier's file (the ``ci`` tier, say) or a comment
    leaves the version of this tier's records as it was, and a changed setting, here or in a base, does not."""
    mine, other, base = tmp_path / "mine.yaml", tmp_path / "other.yaml", tmp_path / "base.yaml"
    base.write_text("base: cpu\n")
    mine.write_text("base: base.yaml\nn_eval: 2\n")
    other.write_text("base: ci\nn_eval: 2\n")
    before = runs.code_hash(str(mine))
    assert len({before, runs.code_hash("cpu"), runs.code_hash("ci"), runs.code_hash(str(other))}) == 4
    assert runs.code_hash(str(base)) == runs.code_hash("cpu")  # the same settings under another name

    def version_after(path, text):
        path.write_text(text)
        runs.code_hash.cache_clear()
        return runs.code_hash(str(mine))

    assert version_after(other, "base: ci\nn_eval: 3\n") == before  # not in its chain
    assert version_after(mine, "# a comment\nbase: base.yaml   # from cpu\nn_eval: 2\n") == before
    assert version_after(mine, "base: base.yaml\nn_eval: 2\npaper_deviations: {n_eval: why}\n") == before
    assert version_after(base, "base: cpu\nseq_len: 64\n") != before  # a setting of its base
    assert version_after(mine, "base: base.yaml\nn_eval: 3\n") != version_after(mine, "base: base.yaml\nn_eval: 2\n")
