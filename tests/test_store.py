"""repro.store.file_lock: flock, and the pid lock file it falls back to where the filesystem has no flock."""
import errno
import fcntl
import subprocess
import threading
import time

import pytest

from repro import store


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock, as NFS without a lock daemon answers."""
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def _exclusive(lock, n_threads=3, rounds=4, hold=0.01):
    """Threads take the lock in turns; returns the most that were ever inside it at once."""
    inside, most, guard, errors = [0], [0], threading.Lock(), []

    def work():
        try:
            for _ in range(rounds):
                with store.file_lock(lock):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(hold)
                    with guard:
                        inside[0] -= 1
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors
    return most[0]


def test_flock_excludes(tmp_path):
    assert _exclusive(tmp_path / ".x.lock") == 1
    assert not (tmp_path / ".x.lock.pid").exists()


def test_pid_lock_excludes_without_flock(tmp_path, no_flock):
    lock = tmp_path / "sub" / ".x.lock"
    with store.file_lock(lock):
        assert (tmp_path / "sub" / ".x.lock.pid").read_text() == store._lock_owner()
    assert _exclusive(lock) == 1
    assert not (tmp_path / "sub" / ".x.lock.pid").exists()  # released: removed


def test_stale_pid_lock_is_taken_over(tmp_path, no_flock):
    dead = subprocess.Popen(["true"])
    dead.wait()  # exited and reaped: its pid names no process
    pid_file = tmp_path / ".x.lock.pid"
    pid_file.write_text(store._lock_owner(dead.pid))
    start = time.monotonic()
    with store.file_lock(tmp_path / ".x.lock", timeout=5):
        assert pid_file.read_text() == store._lock_owner()
    assert time.monotonic() - start < 1
    assert not pid_file.exists() and not list(tmp_path.glob("*.stale.*"))


def test_live_pid_lock_times_out_naming_the_file(tmp_path, no_flock):
    pid_file = tmp_path / ".x.lock.pid"
    pid_file.write_text(store._lock_owner())  # this (live) process holds it
    with pytest.raises(TimeoutError, match=r"\.x\.lock\.pid.*delete"):
        with store.file_lock(tmp_path / ".x.lock", timeout=0.1):
            pass
    assert pid_file.exists()  # a live owner's lock is left alone


def test_other_flock_errors_are_raised(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with store.file_lock(tmp_path / ".x.lock"):
            pass
