"""One trainer per run folder. The main process holds OUT/run.lock while it trains; a second
trainer on the same folder (a job submitted twice, a requeue while the old attempt still runs)
stops at once, with one line naming the holder: its host, pid and start time.

Clusters' shared file systems differ, so the lock has two parts:
- flock, where the file system has it: the kernel drops it when the holder dies, even by SIGKILL;
- a heartbeat: the holder rewrites its record in the file every timeout/10 seconds. Where flock is
  unavailable, or works only within each node (some NFS and BeeGFS mounts), a holder on another
  host whose heartbeat is older than the timeout (DISTGAN_LOCK_TIMEOUT, 300 s) is taken to be
  dead and its lock is taken over, with a note.
A holder is also taken over at once when it is known dead (its process is gone from this host),
and when it is an earlier attempt of the same SLURM job (SLURM ends that attempt before it
requeues the job): a requeue is never blocked by itself. A takeover always puts a new file in
place. A holder finds its lock taken over at its next heartbeat (the file is no longer the one it
holds, or no longer names it), and before a checkpoint goes into place (`ensure_held`): it stops
there, without another checkpoint; what it wrote since its last heartbeat (samples, metrics) stays.

Imports no torch.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from distgan.errors import UserError, require_writable_dir

LOCK_FILE = "run.lock"
TIMEOUT_ENV = "DISTGAN_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
LOST_EXIT_STATUS = 2
BEAT_THREAD = "distgan-run-lock-heartbeat"
RECORD_BYTES = 512  # records are padded to one length: rewritten in place, never seen shrinking
# What flock raises where the file system does not have it.
NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


@dataclass(kw_only=True)
class Holder:
    """A trainer that holds (or held) a run folder's lock: the record it keeps in run.lock."""

    host: str
    pid: int
    started: float
    """When it took the lock (seconds since the epoch)."""

    process_started: float | None = None
    """Its process's start time: tells it apart from a later process given the same pid."""

    job: str | None = None
    """SLURM_JOB_ID, under SLURM."""

    attempt: int = 0
    """SLURM_RESTART_COUNT: 0 for the job's first run, n after its nth requeue."""

    heartbeat: float = 0.0
    """The last time it rewrote this record."""

    @classmethod
    def current(cls, environ=os.environ) -> Holder:
        now = time.time()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            process_started=psutil.Process().create_time(),
            job=environ.get("SLURM_JOB_ID") or None,
            attempt=int(environ.get("SLURM_RESTART_COUNT") or 0),
            heartbeat=now,
        )

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        slurm = f", SLURM job {self.job} (attempt {self.attempt + 1})" if self.job else ""
        return f"host {self.host}, pid {self.pid}, started {started}{slurm}"

    def earlier_attempt_of(self, other: Holder) -> bool:
        """Whether this holder is an earlier run of `other`'s SLURM job (requeued since)."""
        return self.job is not None and self.job == other.job and self.attempt < other.attempt

    def alive_here(self) -> bool | None:
        """Whether its process still runs, if it ran on this host; None for another host."""
        if self.host != socket.gethostname():
            return None
        try:
            process = psutil.Process(self.pid)
            same = (
                self.process_started is None
                or abs(process.create_time() - self.process_started) < 1
            )
            return same and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def to_bytes(self) -> bytes:
        data = json.dumps(dataclasses.asdict(self)).encode()
        return data.ljust(RECORD_BYTES)  # JSON allows the trailing spaces


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not replaced or removed since)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def read_holder(path: Path, wait: float = 2.0) -> Holder | None:
    """The record in `path`; None if there is no file (or, with `wait` 0, an empty one). A file
    still empty or unreadable after `wait` seconds (its writer was killed as it wrote) reads as
    a holder of unknown pid whose heartbeat is the file's last change."""
    known = {field.name for field in dataclasses.fields(Holder)}
    deadline = time.monotonic() + wait
    while True:
        try:
            text, changed = path.read_text(), path.stat().st_mtime
        except FileNotFoundError:
            return None
        if wait == 0 and not text.strip():
            return None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return Holder(**{k: v for k, v in json.loads(text).items() if k in known})
        if time.monotonic() >= deadline:
            return Holder(host="(unknown)", pid=0, started=changed, heartbeat=changed)
        time.sleep(0.05)  # its writer is between creating the file and writing it


class RunLock:
    """The lock of one run folder. Only the main process calls `acquire`; `release` (also run
    at exit) is a no-op where the lock is not held."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        timeout: float | None = None,
        use_flock=True,
        environ=os.environ,
        say=print,
    ) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.timeout = timeout if timeout is not None else _timeout_from(environ)
        self.use_flock = use_flock  # False: as on a file system without flock (tests)
        self.me = Holder.current(environ)
        self.say = say
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        self._made_folder = False

    def acquire(self) -> None:
        """Hold the lock, or raise UserError naming the trainer that holds it."""
        # A run refused before any work leaves no folder behind that it made only for the lock.
        self._made_folder = not self.path.parent.exists()
        require_writable_dir(self.path.parent, "out_dir")
        for _ in range(10):  # another trainer changed the file meanwhile: look again
            if self._try():
                self._beating = threading.Thread(target=self._beat, name=BEAT_THREAD, daemon=True)
                self._beating.start()
                atexit.register(self.release)
                return
        raise UserError(
            f"{self.path} keeps changing under other trainers: stop them, or pick another --out-dir"
        )

    def release(self) -> None:
        """Give the lock up: the file goes (if it is still this trainer's), then the flock."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        if self._owns():
            self.path.unlink(missing_ok=True)
            if self._made_folder:
                with contextlib.suppress(OSError):  # not empty: the run wrote something
                    self.path.parent.rmdir()
        os.close(self._fd)
        self._fd = None
        atexit.unregister(self.release)

    def _try(self) -> bool:
        """One look at the lock file: True once held, False to look again; UserError to give up."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return False  # released just now
            created = False
        locked = self._flock(fd)
        if created and locked is not False:  # a new file is this trainer's, flock or not
            return self._keep(fd)
        if locked and not _same_file(fd, self.path):  # released and replaced meanwhile
            os.close(fd)
            return False
        # With the flock, no live holder on a node that shares it is writing the file.
        holder = read_holder(self.path, wait=0 if locked else 2.0)
        if holder is None:
            if locked:
                return self._keep(fd)  # left empty by a trainer killed as it began
            os.close(fd)
            return False  # released just now
        try:
            why = self._takeover_reason(holder, locked)
        except UserError:
            os.close(fd)
            raise
        try:  # a new file: the old holder's fd no longer names the lock, whatever its node
            return self._replace(holder, why)
        finally:
            os.close(fd)  # its flock (if held) kept other takers on this node out meanwhile

    def _takeover_reason(self, holder: Holder, locked: bool | None) -> str:
        """Why `holder`'s lock may be taken over; UserError if it may not."""
        if holder.earlier_attempt_of(self.me):
            return (
                f"it is an earlier attempt of SLURM job {holder.job}, which SLURM ends on requeue"
            )
        age = time.time() - holder.heartbeat
        alive = holder.alive_here()
        if locked is not False and alive is False:
            return "it no longer runs"
        if locked is not False and alive is None and age > self.timeout:
            return f"its heartbeat stopped {age:.0f} s ago ({TIMEOUT_ENV}={self.timeout:g})"
        later = ""
        if alive is None and locked is not False:
            later = (
                f"; if it no longer runs, its lock is taken over once its heartbeat is "
                f"{self.timeout:g} s old ({TIMEOUT_ENV})"
            )
        raise UserError(
            f"another trainer is using {self.path.parent}: {holder.describe()} (last heartbeat "
            f"{max(age, 0):.0f} s ago){later}: let it finish or stop it, or pick another --out-dir"
        )

    def _replace(self, holder: Holder, why: str) -> bool:
        """Take the lock over by putting a new file in its place (the old holder may still hold
        the old one); then make sure no other trainer replaced it too."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.me.host}.{self.me.pid}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write(fd)
        if self._flock(fd) is False:  # another trainer opened this one's file: start again
            os.close(fd)
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, self.path)
        # Two takers at the same moment: the later replace wins, and the earlier taker sees that
        # below. A race left open: a taker that read the old record but replaces only after this
        # pause (stalled, as on a slow shared file system) is not seen, and both train until the
        # earlier one's next heartbeat or checkpoint finds its file replaced and stops (`_lost`).
        time.sleep(min(0.5, self.timeout / 10))
        if not _same_file(fd, self.path):
            os.close(fd)
            return False
        self.say(f"note: took over {self.path} from {holder.describe()}: {why}")
        self._fd = fd
        return True

    def _keep(self, fd: int) -> bool:
        self._write(fd)
        self._fd = fd
        return True

    def _flock(self, fd: int) -> bool | None:
        """True if this process now holds the flock, False if another does, None where the
        file system has no flock."""
        if not self.use_flock:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in NO_FLOCK:
                return None
            raise
        return True

    def _write(self, fd: int) -> None:
        self.me.heartbeat = time.time()
        record = self.me.to_bytes()
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
        os.fsync(fd)  # other nodes read it from the server

    def _owns(self) -> bool:
        """Whether the lock is still this trainer's: the file at its path is the one it holds,
        and names it (one stat and one read)."""
        if not _same_file(self._fd, self.path):
            return False
        record = read_holder(self.path, wait=0.5)
        me = (self.me.host, self.me.pid, self.me.started)
        return record is not None and (record.host, record.pid, record.started) == me

    def ensure_held(self) -> None:
        """Stop this trainer as `_lost` does if its lock was taken over (main process, before a
        checkpoint goes into place); a no-op where the lock is not held (other processes)."""
        if self._fd is None:
            return
        try:
            mine = self._owns()
        except OSError:
            return  # a slow or failing file system: the heartbeat decides, as it does there
        if not mine:
            self._lost()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 10):
            try:
                mine = self._owns()
                if mine:
                    self._write(self._fd)
            except OSError:
                continue  # a slow or failing file system: the next beat may pass
            if not mine:
                self._lost()

    def _lost(self) -> None:
        """Another trainer took the lock over (this one was taken for dead): stop now, before
        writing anything more into its folder."""
        holder = read_holder(self.path, wait=0.5)
        by = f"by {holder.describe()}" if holder else "(the file was removed)"
        print(
            f"error: the lock of {self.path.parent} was taken over {by}: this trainer stops "
            "now, writing nothing more",
            file=sys.stderr,
            flush=True,
        )
        os._exit(LOST_EXIT_STATUS)


def _timeout_from(environ) -> float:
    value = environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = 0.0
    if not timeout > 0:
        raise UserError(
            f"{TIMEOUT_ENV}={value!r} is not a number of seconds above 0: fix or unset it"
        )
    return timeout
