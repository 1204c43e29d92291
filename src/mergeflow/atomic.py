"""Atomic writes: every output appears whole or not at all, and nothing is left behind for long.

A stage killed halfway (Ctrl-C, OOM, SIGKILL, a failed check) must not leave a half-written model
or file where DVC or the next stage would take it for a finished one. Everything is written to a
hidden temporary sibling and published by one rename at the end (a directory that already exists
is swapped with it in one `renameat2(RENAME_EXCHANGE)` on Linux, so there is no instant without
an output); on any error the temporary is removed and an existing previous output is left as it
was.

Temporaries are named `.<name>.tmp-<pid>-<start>-<boot>-<random>`: the owner's PID, its start time
(centiseconds since the epoch, from psutil) and this boot's id. git and DVC ignore that pattern
(`.gitignore`, `.dvcignore`: `.*.tmp-*`), and the next write of the same output removes the ones
whose owner is dead, which the name proves without guessing: a PID that no longer runs, or that
now belongs to a process started at another time, or a boot id of an earlier boot. Directories
that must outlive their process to be resumed (`.<name>.partial/`) record the same three facts in
an `owner.json` inside (`record_owner`, `owner_status`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shutil
import socket
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import psutil

from .faults import fault_point

log = logging.getLogger(__name__)
OWNER_FILE = "owner.json"
_TMP = re.compile(r"\.tmp-(?P<pid>\d+)-(?P<start>\d+)-(?P<boot>[0-9a-f]{8})-")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- who owns a temporary, and is it dead -------------------------------------------------------

@lru_cache(maxsize=1)
def boot_id() -> str:
    """This boot's id (8 hex digits): a PID recorded under another boot id belongs to a dead process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:  # not Linux: the boot time stands in for it
        return f"{int(psutil.boot_time()) & 0xFFFFFFFF:08x}"


def start_time(pid: int) -> Optional[int]:
    """When process `pid` started, in centiseconds since the epoch; None if no such process."""
    try:
        return round(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's live process
        return -1


def owner_stamp() -> str:
    """`<pid>-<start>-<boot>` of this process, as written into temporary names."""
    pid = os.getpid()
    return f"{pid}-{start_time(pid)}-{boot_id()}"


def owner_alive(pid: int, start: int, boot: str) -> tuple[bool, str]:
    """(alive, why): whether the process that recorded (pid, start, boot) still runs, and how we know."""
    if boot != boot_id():
        return False, f"PID {pid} ran under boot {boot}, this machine has booted since (boot {boot_id()})"
    now = start_time(pid)
    if now is None:
        return False, f"no process has PID {pid} any more"
    if now == -1:
        return True, f"PID {pid} runs (as another user)"
    if abs(now - start) > 1:
        return False, f"PID {pid} now belongs to another process (started at {now / 100:.2f}, the owner at {start / 100:.2f})"
    return True, f"PID {pid} still runs (started at {start / 100:.2f})"


def record_owner(directory: str | os.PathLike) -> None:
    """Write `owner.json` (pid, start time, boot id, host) into a directory meant to outlive a kill."""
    pid = os.getpid()
    write_json(Path(directory) / OWNER_FILE, {"pid": pid, "start": start_time(pid), "boot": boot_id(), "host": socket.gethostname()})


def read_owner(directory: str | os.PathLike) -> Optional[tuple[int, int, str, Optional[str]]]:
    """(pid, start, boot, host) from `directory`'s owner.json; None when missing or unreadable."""
    try:
        owner = json.loads((Path(directory) / OWNER_FILE).read_text())
        return int(owner["pid"]), int(owner["start"]), str(owner["boot"]), owner.get("host")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owner_status(directory: str | os.PathLike) -> tuple[bool, str]:
    """(alive, why) for the process recorded by `record_owner`; a directory without a readable
    record is treated as alive (nothing proves it dead), and so is one made on another host."""
    owner = read_owner(directory)
    if owner is None:
        return True, f"{Path(directory) / OWNER_FILE} is missing or unreadable, so its owner cannot be proved dead"
    pid, start, boot, host = owner
    if host and host != socket.gethostname():
        return True, f"made on host {host}, whose processes this machine cannot see"
    return owner_alive(pid, start, boot)


def claim_dir(directory: str | os.PathLike, what: str = "a run's working directory") -> Optional[str]:
    """Make this process the recorded owner of `directory` (created if missing), e.g. a resumable
    `.<out>.partial/`. Refuses (naming `what` it is) while another live process owns it, and when
    it holds files but no readable owner record (nothing proves its writer dead); returns how the
    previous owner is known to be dead (for the log), or None when it was new or already ours."""
    directory = Path(directory)
    previous = None
    if directory.is_dir() and any(directory.iterdir()):
        alive, why = owner_status(directory)
        owner = read_owner(directory)
        mine = alive and owner is not None and owner[0] == os.getpid() and owner[3] in (None, socket.gethostname())
        if alive and not mine:
            raise BlockingIOError(f"{directory}: {what} that may still be in use ({why}); wait for its run to finish or stop it, "
                                  f"then rerun (if none runs any more, remove it: rm -rf '{directory}')")
        previous = None if mine else why
    directory.mkdir(parents=True, exist_ok=True)
    record_owner(directory)
    return previous


def stale_temporaries(out: str | os.PathLike) -> list[tuple[Path, str]]:
    """`.<out>.tmp-*` siblings of `out` left by dead processes, each with how we know it is dead."""
    out = Path(out)
    found = []
    prefix = f".{out.name}.tmp-"
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(out.parent.iterdir()):
            if not path.name.startswith(prefix):
                continue
            match = _TMP.match(path.name, len(out.name) + 1)
            if not match:
                log.warning("%s: a temporary of an older mergeflow (no owner recorded); remove it by hand once no mergeflow command runs: rm -rf '%s'", path, path)
                continue
            alive, why = owner_alive(int(match["pid"]), int(match["start"]), match["boot"])
            if not alive:
                found.append((path, why))
    return found


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `out` whose owner is dead, logging each and why it was safe."""
    removed = []
    for path, why in stale_temporaries(out):
        remove_path(path)
        log.info("removed %s, left by an interrupted run: its owner is dead (%s)", path, why)
        removed.append(path)
    return removed


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_name(out: Path, suffix: str = "") -> Path:
    """A fresh `.<name>.tmp-<pid>-<start>-<boot>-<random><suffix>` sibling name of `out` (not created)."""
    return out.parent / f".{out.name}.tmp-{owner_stamp()}-{os.urandom(4).hex()}{suffix}"


# --- publishing ----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _renameat2():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2() if os.name == "posix" else None
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Put `tmp` in the place of `out`; the replaced `out`, if any, is deleted afterwards."""
    fault_point("publish:before")
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
    elif exchange(tmp, out):
        fault_point("publish:exchanged")  # out is the new one, tmp holds the old one
        remove_path(tmp)
    else:  # no atomic swap on this system: one short window without `out`
        old = temporary_name(out, "-old")
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    fault_point("publish:after")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out` (whether it may is
    the caller's `check_replaceable`). Stale temporaries of `out` from dead processes are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temporary_name(out)
    tmp.mkdir(mode=0o777 & ~umask())
    try:
        yield tmp
        publish(tmp, out)
    finally:
        remove_path(tmp)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `out`; on success it is renamed to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temporary_name(out)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~umask())
    os.close(fd)
    try:
        yield tmp
        fault_point("atomic_file:before-rename")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: object) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# --- a full disk, in one line -----------------------------------------------------------------------

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def full_disk_reported(message: Callable[[], str]) -> Iterator[None]:
    """Turn a full disk or quota inside the block (OSError ENOSPC/EDQUOT, or safetensors' Rust
    writer's `SafetensorError: ... StorageFull`) into one OSError line, `message()`, which names
    the path and the fix; the errno is kept. Any other error passes through unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise _disk_full(message(), err.errno) from None
    except SafetensorError as err:
        if not any(sign in str(err) for sign in ("StorageFull", "No space left", "os error 28", "QuotaExceeded", "os error 122")):
            raise
        raise _disk_full(message(), errno.ENOSPC) from None


def _disk_full(message: str, code: int) -> OSError:
    full = OSError(message)
    full.errno = code
    return full


# --- what --force may replace --------------------------------------------------------------------

def check_replaceable(
    out: str | os.PathLike,
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike] = (),
    owned_files: Callable[[Path], Optional[set[str]]],
    what: str = "output",
    option: str = "--out",
) -> None:
    """Refuse to write `out` over anything but an earlier output of this same kind of command.

    `out` may never be an input of the command or a directory holding one. An existing `out` is
    replaced only with `force`, and only when it is a directory whose every entry is one that
    `owned_files(out)` says mergeflow wrote there (None: not mergeflow's output at all).
    """
    out = Path(out)
    target = out.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if src == target or target in src.parents:
            relation = "is" if src == target else "contains"
            raise ValueError(f"{out}: {option} {relation} the input {item}; writing there would destroy it: choose another {option}")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise FileExistsError(f"{out}: {option} is {kind}, not a {what} directory mergeflow wrote; mergeflow never replaces it: choose another {option} or remove it yourself")
    owned = owned_files(out)
    if owned is None:
        raise FileExistsError(f"{out}: {option} exists and is not a {what} mergeflow wrote; mergeflow never replaces it: choose another {option} or remove it yourself")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in owned or p.is_dir())
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out}: {option} holds files mergeflow did not write ({shown}); mergeflow never replaces them: move them away or choose another {option}")
    if not force:
        raise FileExistsError(f"{out} already holds a {what}; pass --force to replace it")
