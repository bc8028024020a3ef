"""The record store under ``outputs/``: where records and kept weights live, atomic writes, locks.

Everything written here is written whole or not at all (a temporary file in the same directory,
then a rename: ``atomic_path``), so a process killed at any point leaves either the old file or
the complete new one. A file that cannot be read back (torn, hand-edited) is never trusted.
Records, landscape points, kept weights and QAFT's resume state all go through this module.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from repro.quant import expand_scale


def outputs_dir() -> Path:
    """Results root: ``$REPRO_OUTPUTS``; else ``outputs/`` of the repository checkout that holds
    the working directory (found upwards: a directory with ``pyproject.toml`` and ``notebooks/``),
    so a notebook run from the root or from ``notebooks/`` writes to the same place; else
    ``./outputs``."""
    if "REPRO_OUTPUTS" in os.environ:
        return Path(os.environ["REPRO_OUTPUTS"])
    here = Path.cwd().resolve()
    for root in (here, *here.parents):
        if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
            return root / "outputs"
    return Path("outputs")



# flock's errno where the filesystem has no flock (NFS without a lock daemon, some FUSE and SMB mounts)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
LOCK_NOTICE_S = 60.0  # a wait this long on a pid lock says whose it is and how to clear it (once)


@contextmanager
def file_lock(path: Path, timeout: float | None = None):
    """Hold an exclusive lock on ``path`` (created if missing) for the block: another process (or
    thread) taking the same lock waits until it is released. POSIX ``flock`` on ``path``; on a
    filesystem without ``flock`` (it fails with ENOLCK, EOPNOTSUPP, ENOSYS or EINVAL) a lock file
    beside it, ``<path>.pid``, created with O_CREAT|O_EXCL and holding its owner's pid, host and boot
    id: a waiter polls it and takes over a stale one (its process gone) at once. ``timeout``
    (seconds; None: wait while the owner lives, as ``flock`` does) bounds that wait with a
    TimeoutError that names the file. Not POSIX: the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
        else:
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            return
    with _pid_lock(path.with_name(path.name + ".pid"), timeout):
        yield


def _boot_id() -> str:
    try:  # Linux: a pid from before a reboot names no process of this boot
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or "-"
    except OSError:
        return "-"


def _lock_owner(pid: int | None = None) -> str:
    """What a pid lock file holds: ``"<pid> <host> <boot id>\\n"``."""
    return f"{os.getpid() if pid is None else pid} {socket.gethostname()} {_boot_id()}\n"


def _read_lock(lock: Path) -> str | None:
    try:
        return lock.read_text()
    except FileNotFoundError:
        return None


def _owner_alive(lock: Path, owner: str) -> bool | None:
    """True/False where it can be told, None where not (another host; a file being written)."""
    fields = owner.split()
    if len(fields) != 3 or not fields[0].isdigit():  # created, not yet written (or cut by a crash)
        try:
            return None if time.time() - lock.stat().st_mtime < 10 else False
        except FileNotFoundError:
            return False
    pid, host, boot = fields
    if host != socket.gethostname():
        return None
    if "-" not in (boot, _boot_id()) and boot != _boot_id():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _break_stale(lock: Path, seen: str) -> None:
    """Remove a stale lock file. Breakers take turns through an O_EXCL ``<lock>.break`` file: while the
    stale file stands nobody can take the lock, so if it still reads ``seen`` it is the stale one."""
    breaker = lock.with_name(f"{lock.name}.break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another waiter is breaking it (one that died doing so leaves an old file)
        with suppress(FileNotFoundError):
            if time.time() - breaker.stat().st_mtime > 10:
                breaker.unlink(missing_ok=True)
        return
    try:
        os.close(fd)
        if _read_lock(lock) == seen:
            lock.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


@contextmanager
def _pid_lock(lock: Path, timeout: float | None):
    me, start, delay, told = _lock_owner(), time.monotonic(), 0.005, False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, me.encode())
            finally:
                os.close(fd)
            break
        seen = _read_lock(lock)
        if seen is None:
            continue
        alive = _owner_alive(lock, seen)
        if alive is False:
            _break_stale(lock, seen)
            continue
        waited = time.monotonic() - start
        fields = seen.split()
        who = f"pid {fields[0]} on host {fields[1]}" if len(fields) == 3 else "a process that is starting"
        why = (f"the lock file {lock} is held by {who} (this filesystem has no flock, so repro locks with "
               f"that file); if no repro process of yours is running there any more, delete {lock} and run again")
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"waited {waited:.1f} s: {why}")
        if not told and waited >= LOCK_NOTICE_S:
            warnings.warn(f"still waiting after {waited:.0f} s: {why}", stacklevel=3)
            told = True
        time.sleep(delay)
        delay = min(2 * delay, 0.25)
    try:
        yield
    finally:
        if _read_lock(lock) == me:  # ours (not broken meanwhile as stale by someone who erred)
            lock.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path):
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an exception, removed when it raises (``path`` is then untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old or the complete new file (fsynced; an
    existing file's mode is kept)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as JSON, written atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def read_json(path: Path, check=None, discard: bool = True, what: str = "file") -> dict | None:
    """The JSON object in ``path``, or ``None`` when there is none.

    A file that is not valid JSON, or that ``check(obj)`` rejects (by raising ``ValueError``), is
    never trusted: with ``discard`` it is moved aside to ``<name>.corrupt`` with a warning naming
    it (so it is computed again; ``what`` names it: "record"); without, it is left alone. Either way
    ``None`` is returned."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"it holds a {type(obj).__name__}, not an object")
        if check is not None:
            check(obj)
        return obj
    except (FileNotFoundError, NotADirectoryError):  # not there, or another process moved it aside a moment ago
        return None
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        if not discard:
            return None
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
            where = f"moved to {aside}"
        except FileNotFoundError:
            return None
        except OSError as move_err:  # a read-only results directory: leave it, never trust it
            where = f"left in place ({type(move_err).__name__})"
        warnings.warn(f"{what} {path} is unreadable ({str(err).splitlines()[0][:120]}); {where}, and it is "
                      f"computed again", stacklevel=3)
        return None


def check_writable(directory: Path) -> None:
    """Raise a clear error, before any long work, when results cannot be written to ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as err:
        raise RuntimeError(f"cannot write results to {directory} ({type(err).__name__}: {err.strerror or err}); "
                           f"choose a writable directory with --outputs or REPRO_OUTPUTS") from None


def record_path(config, outputs: Path | None = None) -> Path:
    outputs = Path(outputs) if outputs is not None else outputs_dir()
    bits = "fp" if config.bits is None else f"int{config.bits}"
    model = config.model.replace("/", "--")
    from repro.data import corpus_slug

    return outputs / "records" / config.method / f"{model}-{corpus_slug(config.corpus)}-{bits}-{config.key()}.json"


def weights_path(config, outputs: Path | None = None) -> Path:
    """Where a run's quantized weights are kept: beside its record, ``<record>.safetensors``."""
    return record_path(config, outputs).with_suffix(".safetensors")


def read_record(config, outputs: Path | None = None) -> dict | None:
    """The cached record of ``config`` (marked ``cached``), or ``None`` if it has not run (a torn
    record, or one holding another config's key, is moved aside: ``read_json``)."""
    def own_key(record):
        if record.get("key", config.key()) != config.key():
            raise ValueError(f"it holds key {record.get('key')!r}, not {config.key()!r}")

    record = read_json(record_path(config, outputs), check=own_key, what="record")
    return None if record is None else {**record, "cached": True}


def comparable(record, path=()):
    """``record`` without what a recomputation changes when the result does not: wall-clock times
    (``*_s``), ``created``, ``cached``, the code version (``versions.code``) and the machine's name fields
    under ``environment`` (torch, threads and CPU kernels stay: they change float rounding). Two records
    of one config are the same computation when their ``comparable`` forms are equal."""
    if isinstance(record, dict):
        return {k: comparable(v, (*path, k)) for k, v in record.items()
                if not (k.endswith("_s") or k in ("created", "cached") or path == ("versions",) and k == "code"
                        or path == ("environment",) and k not in ("torch", "threads", "cpu_kernels"))}
    if isinstance(record, list):
        return [comparable(v, path) for v in record]
    return record


def save_weights(model, config, info: dict, path: Path, fp_weights: dict | None = None,
                 created: str = "", grid_scales: dict | None = None) -> None:
    """The stack's quantized weights as int8 codes (the weight's stored layout) and their float32
    scales (``<name>`` and ``<name>.scale``: 0-d, or [out, 1] / [out, n_groups] of the [out, in]
    matrix), written atomically, with the record's ``created`` stamp, the group size and the
    transposed (Conv1D) layers in the file's metadata (so a landscape point can tell which
    computation of the run it used). A weight that is not ``code * scale``
    (in the weight's own dtype) raises. Scales come from ``grid_scales`` (per channel / group, as
    the method returned them), else the method's record (per tensor: RTN/QAFT ``scales``, GPTQ per
    layer), else from the observer on the FP weight in ``fp_weights`` (every method's grid)."""
    from safetensors.torch import save_file

    from repro import models
    from repro.quant import codes, compute_scale

    if config.grid is None:  # a method that quantizes nothing (FPFT): the float weights as they are
        tensors = {name: m.weight.detach().cpu().float().contiguous() for name, m in models.stack_linears(model).items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": config.key(), "bits": "", "created": created,
                                                   "group_size": "", "transposed": ""})
        return
    known = {}
    if config.grid.per_tensor:
        known = {name: torch.tensor(s) for name, s in (info.get("scales") or {}).items()}
        known.update({name: torch.tensor(layer["scale"]) for name, layer in (info.get("layers") or {}).items()
                      if "scale" in layer})
    known.update(grid_scales or {})
    grid = config.grid
    group_size = grid.groups
    tensors, transposed = {}, []
    for name, m in models.stack_linears(model).items():
        w = models.weight_matrix(m).detach().cpu()
        scale = known[name] if name in known else \
            compute_scale(models.weight_matrix(m, fp_weights[name]), grid, config.observer).cpu()
        c = codes(w.float(), scale, grid.bits, group_size)
        if not torch.equal((c.float() * expand_scale(scale, w.shape[-1], group_size)).to(w.dtype), w):
            raise RuntimeError(f"{config.label()}: {name} is not on its int{config.bits} grid; weights not saved")
        if models.is_conv1d(m):
            c = c.t()
            transposed.append(name)
        tensors[name], tensors[f"{name}.scale"] = c.contiguous(), scale.float().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": config.key(), "bits": str(config.bits), "created": created,
                                               "group_size": str(group_size or ""), "transposed": ",".join(transposed)})


def weights_stamp(config, outputs: Path | None = None) -> str | None:
    """The ``created`` stamp of the record whose computation wrote the kept weights (None: none kept)."""
    from safetensors import safe_open

    path = weights_path(config, outputs)
    try:
        with safe_open(str(path), "pt") as f:
            created = (f.metadata() or {}).get("created")
        return created or f"mtime:{path.stat().st_mtime_ns}"  # a file kept before the stamp existed
    except Exception:  # noqa: BLE001 - missing or torn (safetensors raises its own error type): not kept
        return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Kept weights written by ``save_weights``: name -> float32 tensor (the weight's stored layout;
    ``code * scale``, or the float weights of a method that quantizes nothing)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    group_size = int(metadata.get("group_size") or 0) or None
    transposed = set(filter(None, metadata.get("transposed", "").split(",")))
    stored, weights = load_file(str(path)), {}
    for name, c in stored.items():
        if f"{name}.scale" not in stored and not name.endswith(".scale"):  # float weights (FPFT)
            weights[name] = c.float()
        elif not name.endswith(".scale"):
            matrix = c.t() if name in transposed else c
            weight = matrix.float() * expand_scale(stored[f"{name}.scale"], matrix.shape[-1], group_size)
            weights[name] = weight.t() if name in transposed else weight
    return weights
