"""QAFT: schedule, grid-exact result, resume, NaN handling, accumulation, and a real run; FPFT, its
loop with the quantizer off."""
import dataclasses
import importlib
import json
import logging
import math
import platform

import pytest
import torch

from repro import models, quant, runs, store
from repro.data import Data
from repro.methods.qaft import fpft, keep_freed_memory, lr_at, make_scheduler, qaft
from repro.config import RunConfig
from repro.config import make_config

from tiny_models import VOCAB, tiny_model

qaft_mod = importlib.import_module("repro.methods.qaft")  # the module (repro.methods.qaft is the function)
BITS = 3


def tiny_data(seed: int = 0, n: int = 8, seq_len: int = 16) -> Data:
    """Random token sequences; validation repeats half the training sequences, so fine-tuning
    on them measurably lowers the validation NLL (the test split stays unseen)."""
    g = torch.Generator().manual_seed(seed)
    calibration = torch.randint(0, VOCAB, (n, seq_len), generator=g)
    return Data(calibration=calibration, validation=calibration[: n // 2].clone(),
                test=torch.randint(0, VOCAB, (4, seq_len), generator=g), corpus="wiki", seq_len=seq_len)


def tiny_config(checkpoint_dir, **options) -> RunConfig:
    options = {"epochs": 2, "lr_grid": [1e-3, 1e-2], "checkpoint_dir": str(checkpoint_dir), **options}
    return RunConfig(method="qaft", bits=BITS, model="tiny", observer="minmax", batch_size=4, options=options)


def stack_state(model) -> dict:
    return {name: m.weight.detach().clone() for name, m in models.stack_linears(model).items()}


# --- learning-rate schedule -------------------------------------------------------------------

@pytest.mark.parametrize("total", [1, 2, 7, 1024])
def test_schedule_decays_linearly_from_lr0_to_lr0_over_10(total):
    lr0 = 1e-3
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=lr0, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, total)
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])  # the lr this step uses
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    assert used[0] == lr0
    assert used == [lr_at(k, total, lr0) for k in range(total)]
    final = optimizer.param_groups[0]["lr"]
    assert final == pytest.approx(lr0 / 10, rel=1e-12)  # after the run: lr0/10
    if total > 1:
        assert used[-1] == pytest.approx(lr0 / 10, rel=1e-12)  # the last step already uses lr0/10
        diffs = [b - a for a, b in zip(used, used[1:])]
        assert all(d == pytest.approx(-0.9 * lr0 / (total - 1), rel=1e-9) for d in diffs)


def test_lr_at_is_flat_after_the_run():
    assert lr_at(0, 10, 2.0) == 2.0
    assert lr_at(9, 10, 2.0) == pytest.approx(0.2, rel=1e-12)
    assert lr_at(50, 10, 2.0) == pytest.approx(0.2, rel=1e-12)


# --- the trained model ------------------------------------------------------------------------

def test_result_is_exactly_on_the_grid_and_only_stack_weights_change(tmp_path, caplog):
    model = tiny_model("llama")
    fp = models.fp_snapshot(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n.replace(".weight", "") not in
              models.stack_linears(model)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = tiny_config(tmp_path / "ck")
    with caplog.at_level(logging.INFO, logger="repro"):
        info = qaft(model, tiny_data(), config)

    assert info["best_epoch"] > 0  # trained weights were picked, not RTN
    # every optimizer step's training loss is kept; every epoch is logged with its NLLs
    assert all(len(r["losses"]) == r["steps"] > 0 and all(math.isfinite(x) for x in r["losses"]) for r in info["runs"])
    assert sum("QAFT int3 lr0=" in m and "validation NLL" in m for m in caplog.messages) == 2 * 2
    assert info["nll_validation"] < info["rtn"]["nll_validation"]
    q = quant.qmax(BITS)
    moved = 0
    for name, m in models.stack_linears(model).items():
        assert not quant.is_prepared(m)
        scale = quant.compute_scale(fp[name], BITS, "minmax")  # fixed scale from the FP weights
        w = m.weight.detach()
        code = quant.codes(w, scale, BITS)
        assert torch.equal(w, code.float() * scale), f"{name}: weight is not code * scale"
        assert code.abs().max() <= q
        assert (w / scale - code.float()).abs().max() < 1e-4  # no clamping hides an off-grid value
        moved += int((code != quant.codes(fp[name], scale, BITS)).sum())
    assert moved > 0  # fine-tuning moved some weights to other grid points than RTN
    for name, p in model.named_parameters():
        assert p.requires_grad == flags[name]
        if name in others:
            assert torch.equal(p.detach(), others[name]), f"{name} is outside the stack but changed"
    json.dumps(info)
    # the resume state outlives the sweep until the caller has the result safe (runs.run: after the record)
    assert (tmp_path / "ck" / "state.pt").exists()
    baked = stack_state(model)
    models.restore(model, fp)
    again = qaft(model, tiny_data(), config)  # a finished state: no training, the same result
    assert again["runs"] == info["runs"] and all(torch.equal(w, baked[n]) for n, w in stack_state(model).items())
    qaft_mod.discard_state(config)
    assert not (tmp_path / "ck").exists()


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    data = tiny_data()
    results = []
    for batch_size, accum in [(4, 1), (2, 2), (1, 4)]:
        model = tiny_model("llama")
        info = qaft(model, data, tiny_config(tmp_path / f"ck{accum}", batch_size=batch_size, grad_accum=accum,
                                             lr_grid=[1e-2]))
        assert info["steps_per_epoch"] == 2
        results.append((info, stack_state(model)))
    (ref, ref_w), *others = results
    for info, weights in others:
        for h_ref, h in zip(ref["runs"][0]["history"], info["runs"][0]["history"]):
            assert h["nll_validation"] == pytest.approx(h_ref["nll_validation"], abs=1e-4)
        differ = sum(int((weights[n] != ref_w[n]).sum()) for n in ref_w)
        assert differ <= 0.01 * sum(w.numel() for w in ref_w.values())  # float rounding may flip a few codes


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2 trains with dropout: its masks must be replayed
def test_gradient_checkpointing_gives_the_same_result(tmp_path, family):
    runs_ = []
    for checkpointing in (False, True):
        model = tiny_model(family)
        info = qaft(model, tiny_data(), tiny_config(tmp_path / f"ck{checkpointing}", lr_grid=[1e-2],
                                                    gradient_checkpointing=checkpointing))
        assert info["gradient_checkpointing"] is checkpointing and not model.is_activation_checkpointing
        runs_.append((info, stack_state(model)))
    (ref, ref_w), (info, weights) = runs_
    assert ref["best_epoch"] > 0
    for h_ref, h in zip(ref["runs"][0]["history"], info["runs"][0]["history"]):
        assert h["nll_validation"] == pytest.approx(h_ref["nll_validation"], abs=1e-5)
    differ = sum(int((weights[n] != ref_w[n]).sum()) for n in ref_w)
    assert differ <= 0.001 * sum(w.numel() for w in ref_w.values())


# --- resume -----------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


RESUME_OPTIONS = {"epochs": 3, "lr_grid": [1e-3, 1e-2], "batch_size": 2, "grad_accum": 2}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run: GPT-2 has dropout, so the result also depends on the RNG state."""
    model = tiny_model("gpt2")
    info = qaft(model, tiny_data(), tiny_config(tmp_path_factory.mktemp("ref") / "ck", **RESUME_OPTIONS))
    return info, stack_state(model)


# state saves with 3 epochs x 2 lr0: 1, 2 = first lr0 after epochs 1, 2; 3 = first lr0 done; 4 = second lr0 epoch 1
@pytest.mark.parametrize("interrupt_after", [1, 3, 4])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, interrupt_after):
    expected, expected_weights = uninterrupted
    data = tiny_data()
    model = tiny_model("gpt2")
    fp = models.fp_snapshot(model)
    config = tiny_config(tmp_path / "ck", **RESUME_OPTIONS)
    save_state = qaft_mod.save_state
    calls = []

    def save_then_die(path, state):
        save_state(path, state)
        calls.append(path)
        if len(calls) == interrupt_after:
            raise Interrupted

    monkeypatch.setattr(qaft_mod, "save_state", save_then_die)
    with pytest.raises(Interrupted):
        qaft(model, data, config)
    assert (tmp_path / "ck" / "state.pt").exists()
    monkeypatch.setattr(qaft_mod, "save_state", save_state)

    models.restore(model, fp)  # what runs.run does: the model comes back in full precision
    resumed = qaft(model, data, config)

    assert expected["best_epoch"] > 0  # the comparison covers trained weights, not just RTN
    assert resumed["resumed_from"] == {1: {"lr_index": 0, "epoch": 1}, 3: {"lr_index": 1, "epoch": 0},
                                       4: {"lr_index": 1, "epoch": 1}}[interrupt_after]
    assert [r["history"] for r in resumed["runs"]] == [r["history"] for r in expected["runs"]]
    assert (resumed["lr"], resumed["best_epoch"]) == (expected["lr"], expected["best_epoch"])
    for name, w in stack_state(model).items():
        assert torch.equal(w, expected_weights[name]), name


def test_a_state_of_another_run_is_refused(tmp_path, monkeypatch):
    data = tiny_data()
    save_state = qaft_mod.save_state

    def save_then_die(path, state):
        save_state(path, state)
        raise Interrupted

    monkeypatch.setattr(qaft_mod, "save_state", save_then_die)
    with pytest.raises(Interrupted):
        qaft(tiny_model("llama"), data, tiny_config(tmp_path / "ck"))
    monkeypatch.setattr(qaft_mod, "save_state", save_state)
    other = tiny_config(tmp_path / "ck", epochs=3)  # same directory, a different run
    with pytest.raises(ValueError, match="another run"):
        qaft(tiny_model("llama"), data, other)


# --- NaN ----------------------------------------------------------------------------------------

def test_nan_loss_stops_that_lr_and_the_sweep_goes_on(tmp_path, monkeypatch):
    model = tiny_model("llama")
    data = tiny_data()
    config = tiny_config(tmp_path / "ck")
    real = qaft_mod.sequence_nll
    calls = []

    def poisoned(m, batch):  # the 3rd training batch of the first lr0 gives a NaN loss
        loss, n = real(m, batch)
        calls.append(1)
        return (loss * float("nan"), n) if len(calls) == 3 else (loss, n)

    monkeypatch.setattr(qaft_mod, "sequence_nll", poisoned)
    fp = models.fp_snapshot(model)
    monkeypatch.setattr(runs, "workbench", lambda cfg: runs.Workbench(model, None, data, fp, ()))
    record = runs.run(config, outputs=tmp_path / "out")

    saved = json.loads(store.record_path(config, tmp_path / "out").read_text())
    first, second = saved["info"]["runs"]
    assert first["stop_reason"].startswith("non-finite training loss (nan) at epoch 1, step 3")
    assert [h["epoch"] for h in first["history"]] == [0]  # only RTN: no epoch finished
    assert first["best_epoch"] == 0
    assert second["stop_reason"] is None
    assert [h["epoch"] for h in second["history"]] == [0, 1, 2]
    assert saved["info"]["lr"] == 1e-2 and saved["info"]["best_epoch"] > 0
    assert math.isfinite(record["nll_validation"])
    assert all(torch.isfinite(m.weight).all() for m in models.stack_linears(model).values())


def test_select_final_keeps_the_last_epoch_of_the_lr_with_the_best_final_validation(tmp_path):
    """The paper's protocol (``select: final``): the learning rate is selected, not an epoch."""
    model = tiny_model("llama")
    fp = models.fp_snapshot(model)
    by_epoch = qaft(model, tiny_data(), tiny_config(tmp_path / "epoch", epochs=3, lr_grid=[1e-1, 1e-2]))
    models.restore(model, fp)
    config = tiny_config(tmp_path / "final", epochs=3, lr_grid=[1e-1, 1e-2], select="final")
    info = qaft(model, tiny_data(), config)

    assert info["select"] == "final" and by_epoch["select"] == "epoch"
    for run, same in zip(info["runs"], by_epoch["runs"]):  # the same training, another pick
        assert run["history"] == same["history"]
        assert run["best_epoch"] == 3 and run["best_nll_validation"] == run["history"][-1]["nll_validation"]
    finals = [run["history"][-1]["nll_validation"] for run in info["runs"]]
    assert info["lr"] == info["runs"][finals.index(min(finals))]["lr"] and info["best_epoch"] == 3
    assert info["nll_validation"] == min(finals)
    assert by_epoch["nll_validation"] <= info["nll_validation"]  # the best epoch is never worse on validation
    with pytest.raises(ValueError, match="select='best'.*'epoch'.*'final'"):
        qaft(model, tiny_data(), tiny_config(tmp_path / "bad", select="best"))


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown QAFT option"):
        qaft(tiny_model("llama"), tiny_data(), tiny_config(tmp_path, learning_rate=1e-3))
    with pytest.raises(ValueError, match=r"lr_grid=0\.001: a non-empty list of values > 0"):
        make_config("qaft", 4, "ci", options={"lr_grid": 0.001})
    with pytest.raises(ValueError, match="lr_grid=.*'abc' is not a finite number > 0"):
        make_config("qaft", 4, "ci", options={"lr_grid": [1e-3, "abc"]})
    assert make_config("qaft", 4, "ci", options={"lr_grid": ["1e-3"]}).options["lr_grid"] == ["1e-3"]


def test_sharding_needs_a_launch_of_several_processes(tmp_path):
    """FSDP splits over processes (tests/test_qaft_ddp.py launches 2); one process is told how to launch."""
    with pytest.raises(ValueError, match="sharding='zero3': 'none' or 'fsdp'"):
        qaft(tiny_model("llama"), tiny_data(), tiny_config(tmp_path, sharding="zero3"))
    with pytest.raises(ValueError, match="sharding='fsdp'.*this is one: launch it with `torchrun"):
        qaft(tiny_model("llama"), tiny_data(), tiny_config(tmp_path, sharding="fsdp"))


def test_sequences_longer_than_the_model_allows_are_refused_before_training(tmp_path):
    model = tiny_model("llama")
    data = tiny_data()
    data.validation = torch.zeros(2, models.max_length(model) + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="validation: .*seq_len=.* is outside what the model allows"):
        qaft(model, data, tiny_config(tmp_path, lr_grid=[1e-2]))


# --- the embedded model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_pair(tmp_path_factory, seed_records, ci_outputs):
    """The ci tier's QAFT int4 (one epoch at SmolLM2's lr0; its weights kept for the landscape) computed
    again in this process into fresh outputs, next to the session's record of it (computed in another
    process, ``tests/ci_records.py``, or here first): the config, the two outputs, the two records. The
    fresh outputs hold the session's RTN record, which QAFT reads its epoch 0 from (as in a sweep)."""
    config = make_config("qaft", 4, "ci")
    assert config.save_weights and config.options["epochs"] == 1
    fresh = tmp_path_factory.mktemp("again")
    seed_records(fresh, [runs.epoch0_config(config)])
    session = runs.run(config, outputs=ci_outputs)
    return config, [fresh, ci_outputs], [runs.run(config, outputs=fresh), session]


@pytest.mark.embedded
def test_qaft_beats_rtn_at_4_bits_on_the_embedded_model(embedded_pair):
    record = embedded_pair[2][0]
    info = record["info"]
    assert record["cached"] is False and record["nll_validation"] < info["rtn"]["nll_validation"] - 0.1
    # the baked model measures exactly what the loop measured at the chosen epoch
    assert record["nll_validation"] == pytest.approx(info["nll_validation"], abs=1e-5)
    assert info["best_epoch"] == 1 and info["runs"][0]["stop_reason"] is None
    assert info["runs"][0]["history"][-1]["lr"] == pytest.approx(1e-4, rel=1e-9)  # ended at lr0/10


def test_a_known_rtn_nll_replaces_the_epoch_zero_evaluation(tmp_path, monkeypatch):
    """repro.runs passes the RTN record's NLL: the same numbers, two evaluations fewer."""
    data = tiny_data()
    model = tiny_model("llama")
    fp = models.fp_snapshot(model)
    reference = qaft(model, data, tiny_config(tmp_path / "a", lr_grid=[1e-2]))
    models.restore(model, fp)
    calls = []
    real_nll = qaft_mod.nll
    monkeypatch.setattr(qaft_mod, "nll", lambda *a, **k: calls.append(1) or real_nll(*a, **k))
    again = qaft(model, data, tiny_config(tmp_path / "b", lr_grid=[1e-2]), start_nll=reference["rtn"])
    assert again["runs"][0]["history"] == reference["runs"][0]["history"]
    assert len(calls) == 2 * 2  # validation + test after each of the two epochs, none at epoch 0


@pytest.mark.embedded
def test_embedded_qaft_is_deterministic(embedded_pair):
    """Two computations of one config (the session's, under `make test` in another process, and one into
    fresh outputs here) give records identical to the bit apart from wall-clock times (``store.comparable``):
    same learning rate, epoch, history, NLLs and kept weights (whose files differ only in the ``created``
    stamp)."""
    config, outputs, (first, second) = embedded_pair
    assert store.comparable(first) == store.comparable(second)
    assert first["info"]["runs"][0]["history"]  # it trained
    from safetensors.torch import load_file

    a, b = (load_file(str(store.weights_path(config, out))) for out in outputs)  # stamps differ
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc  # mallopt accepted every setting
    monkeypatch.setenv("REPRO_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


# --- FPFT: QAFT's loop with the quantizer off -------------------------------------------------

def test_fpft_is_qaft_without_the_quantizer(tmp_path):
    """FPFT trains the FP weights themselves with QAFT's loop: epoch 0 is the FP model, the result is
    its best-validation epoch exactly (no grid), and its history differs from QAFT's only through the
    quantizer."""
    data = tiny_data()
    model = tiny_model("llama")
    fp = models.fp_snapshot(model)
    config = dataclasses.replace(tiny_config(tmp_path / "ck"), method="fpft", bits=None)
    fp_val = qaft_mod.nll(model, data.validation, 4)
    info = fpft(model, data, config)
    assert info["fp"]["nll_validation"] == pytest.approx(fp_val, abs=1e-6)  # epoch 0 = FP
    assert "scales" not in info and "rtn" not in info
    assert info["nll_validation"] <= info["fp"]["nll_validation"]  # the best-validation pick includes epoch 0
    # the model holds the chosen epoch's weights: measuring them again gives the loop's number
    assert qaft_mod.nll(model, data.validation, 4) == pytest.approx(info["nll_validation"], abs=1e-5)
    weights = {n: m.weight for n, m in models.stack_linears(model).items()}
    if info["best_epoch"] > 0:
        assert any(not torch.equal(w, fp[n]) for n, w in weights.items())
        # not on any 3-bit grid: a trained weight takes many more values than 2^3 per tensor
        assert max(w.unique().numel() for w in weights.values()) > 2 ** BITS
    assert (tmp_path / "ck" / qaft_mod.STATE_FILE).exists()  # the resume state stays until the record is written
    qaft_mod.discard_state(config)
    assert not (tmp_path / "ck").exists()


def test_fpft_takes_qaft_tier_options_and_no_bits():
    """The control runs at QAFT's budget: its options come from the tier's qaft entry (data, steps,
    lr0 grid), it has no grid, and its key differs from FP's and QAFT's."""
    fpft_config = make_config("fpft", None, "ci")
    assert fpft_config.options == make_config("qaft", 4, "ci").options
    assert fpft_config.grid is None and fpft_config.label() == "fpft"
    assert fpft_config.key() not in (make_config("fp", None, "ci").key(), make_config("qaft", 4, "ci").key())
    with pytest.raises(ValueError, match="quantizes nothing"):
        make_config("fpft", 4, "ci")


def test_a_method_started_from_fpft_quantizes_the_fine_tuned_weights(tmp_path, monkeypatch):
    """``start="fpft"``: FPFT runs first with its float weights kept, RTN then rounds those weights (not
    the checkpoint's), and the layer MSEs are measured against them; the FP start keeps its own key."""
    from repro.evaluate import gradient_norm

    data, model = tiny_data(), tiny_model("llama")
    fp = models.fp_snapshot(model)
    monkeypatch.setattr(runs, "workbench", lambda cfg: runs.Workbench(model, None, data, fp, ()))
    options = {"epochs": 2, "lr_grid": [1e-2]}
    config = make_config("rtn", BITS, "ci", model="tiny", observer="minmax", start="fpft")
    assert config.key() != dataclasses.replace(config, start="fp").key()
    assert "from FPFT" in config.label()
    fpft_config = dataclasses.replace(config.start_config(), options=options)
    monkeypatch.setattr(type(config), "start_config", lambda self: fpft_config)
    record = runs.run(config, tmp_path)
    longer = dataclasses.replace(fpft_config, options={**options, "epochs": 3})
    monkeypatch.setattr(type(config), "start_config", lambda self: longer)
    assert config.key() != record["key"]  # another FPFT budget: another start, another record
    monkeypatch.setattr(type(config), "start_config", lambda self: fpft_config)

    tuned = runs.load_weights(fpft_config, tmp_path)  # kept as floats beside the FPFT record
    assert any(not torch.equal(tuned[n], fp[n]) for n in fp)
    models.restore(model, tuned)
    expected = {n: quant.quantize(w, quant.compute_scale(w, BITS, "minmax"), BITS) for n, w in tuned.items()}
    models.restore(model, expected)
    assert record["nll_test"] == pytest.approx(qaft_mod.nll(model, data.test, 4), abs=1e-6)
    # the gradient of the training loss: smaller at the fine-tuned weights than at the checkpoint's
    models.restore(model, fp)
    at_fp = gradient_norm(model, data.calibration, 4, desc=None)
    models.restore(model, tuned)
    at_tuned = gradient_norm(model, data.calibration, 4, desc=None)
    assert at_tuned["norm"] < at_fp["norm"] and at_fp["relative"] == pytest.approx(at_fp["norm"] * at_fp["weight_norm"])
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="start='fpft': fp is a reference"):
        make_config("fp", None, "ci", start="fpft")


def test_training_memory_counts_what_one_training_step_holds():
    """``training_memory``'s trained terms equal the bytes of the latent weights, their gradients and
    AdamW's state after one step on a tiny model; the Llama-2-7B figures of the README follow from it."""
    from repro.methods.qaft import training_memory

    model = tiny_model("llama")
    weights = [m.weight for m in models.stack_linears(model).values()]
    optimizer = torch.optim.AdamW(weights, lr=1e-3)
    loss = sum(w.square().sum() for w in weights)
    loss.backward()
    optimizer.step()
    held = sum(w.numel() * w.element_size() + w.grad.numel() * w.grad.element_size() for w in weights)
    held += sum(t.numel() * t.element_size() for state in optimizer.state.values()
                for name, t in state.items() if name != "step")
    stack = sum(w.numel() for w in weights)
    predicted = training_memory(stack, 0)
    assert predicted["latent"] + predicted["gradients"] + predicted["adam"] == held
    llama_7b = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)
    one = training_memory(llama_7b, 2 * 32000 * 4096)
    eight = training_memory(llama_7b, 2 * 32000 * 4096, processes=8, sharded=True)
    assert one["total"] / 1e9 == pytest.approx(104.1, abs=0.1) and eight["total"] / 1e9 == pytest.approx(13.5, abs=0.1)
    assert training_memory(llama_7b, 0, processes=8)["total"] == training_memory(llama_7b, 0)["total"]  # DDP replicates
