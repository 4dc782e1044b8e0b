"""Model weights that really live in huge pages: stage the GGUF into a hugetlbfs mount at model-server start.

Why: reserving vm.nr_hugepages does nothing for llama.cpp (it never asks for huge pages, and an mmap of a
file on ext4 uses 4 KiB pages). A file on hugetlbfs is backed by 2 MiB pages, and llama.cpp mmaps it as
it is: fewer TLB misses and weights the kernel can never swap out. hugetlbfs has no write(), so the copy
is ftruncate'd to a page multiple and filled through mmap. The copy is lost at reboot, so staging belongs
to service start, and it must never kill the service: every failure is a StagingError that the supervisor
turns into "serve the on-disk file, with a warning and the reason in /status".

The mount itself is made by the rollout (roles/hugepages.py: hugetlbfs owned by the agent's user), because
the agent runs without capabilities. An agent running as root (tests) mounts it itself when told a
directory that is not yet hugetlbfs, and unmounts it on stop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import mmap
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from clawbot.common.preflight import read_meminfo

log = logging.getLogger("clawbot.model.staging")

HUGETLBFS_MAGIC = 0x958458F6
SIDECAR = "staged-model.json"
COPY_CHUNK = 16 << 20
PROGRESS_EVERY_S = 2.0
# the staging mount: its source name (in /etc/fstab and /proc/self/mountinfo), mode and page size; the rollout
# mounts it alike (roles/hugepages.py)
MOUNT_DEVICE, MOUNT_MODE, MOUNT_PAGESIZE = "clawbot-hugepages", "0700", "2M"


class StagingError(Exception):
    """Staging is impossible or failed; the message says why and what to change."""


# --------------------------------------------------------------------------- kernel facts


def statfs_type(path: str | Path) -> tuple[int, int]:
    """(f_type, f_bsize) of the filesystem holding `path`: os.statvfs has no f_type, so ask libc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64/aarch64
    if libc.statfs(os.fsencode(str(path)), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    f_type, f_bsize = ctypes.c_long.from_buffer(buf, 0).value, ctypes.c_long.from_buffer(buf, 8).value
    return f_type & 0xFFFFFFFF, f_bsize


def is_hugetlbfs(path: str | Path) -> bool:
    try:
        return statfs_type(path)[0] == HUGETLBFS_MAGIC
    except OSError:
        return False


def pages_needed(file_bytes: int, page_bytes: int) -> int:
    return max(1, math.ceil(file_bytes / page_bytes))


# --------------------------------------------------------------------------- the mount


def ensure_mount(directory: str | Path) -> bool:
    """Make sure `directory` is a writable hugetlbfs mount. Returns True when this call mounted it.

    Unprivileged (the service): the rollout's mount must already be there. Root (tests, manual runs):
    create and mount it, pagesize=2M, mode 0700."""
    path = Path(directory)
    if is_hugetlbfs(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise StagingError(f"{path} is hugetlbfs but not writable by uid {os.geteuid()}: the rollout mounts it "
                               "with uid/gid of the agent's user")
        return False
    if os.geteuid() != 0:
        raise StagingError(f"{path} is not a hugetlbfs mount (the rollout's hugepages role mounts one there "
                           "owned by the agent's user; the agent itself has no right to mount)")
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise StagingError(f"{path} is not a hugetlbfs mount and not empty: refusing to mount over it")
    done = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={MOUNT_PAGESIZE},mode={MOUNT_MODE}", MOUNT_DEVICE,
                           str(path)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or not is_hugetlbfs(path):
        raise StagingError(f"cannot mount hugetlbfs at {path}: {(done.stderr or done.stdout).strip()}")
    log.info("mounted hugetlbfs (pagesize=2M) at %s", path)
    return True


def unmount(directory: str | Path) -> None:
    done = subprocess.run(["umount", str(directory)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        log.warning("cannot unmount %s: %s", directory, done.stderr.strip())
    else:
        log.info("unmounted %s", directory)


# --------------------------------------------------------------------------- staging


@dataclass
class StagedModel:
    """What was staged, recorded in a sidecar in the (normal) state dir so a restart can reuse it."""

    source: str
    source_size: int
    source_mtime_ns: int
    source_sha256: str
    path: str  # the staged copy on hugetlbfs
    staged_ino: int
    staged_size: int
    page_kib: int
    pages: int
    copy_seconds: float = 0.0
    reused: bool = False


def _read_sidecar(state_dir: Path) -> StagedModel | None:
    try:
        data = json.loads((state_dir / SIDECAR).read_text())
        data.pop("reused", None)
        return StagedModel(**data)
    except (OSError, ValueError, TypeError):
        return None


def _write_sidecar(state_dir: Path, staged: StagedModel) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{SIDECAR}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(staged), indent=2))
    os.replace(tmp, state_dir / SIDECAR)


def _reusable(record: StagedModel | None, source: Path, st: os.stat_result, sha: str, mount: Path) -> bool:
    if record is None:
        return False
    if (record.source, record.source_size, record.source_mtime_ns, record.source_sha256) != (
            str(source), st.st_size, st.st_mtime_ns, sha):
        return False
    staged = Path(record.path)
    try:
        sst = staged.stat()
    except OSError:
        return False
    return staged.parent == mount and sst.st_ino == record.staged_ino and sst.st_size == record.staged_size


def release(state_dir: str | Path, mount: str | Path | None = None, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove the staged copy (its pages go back to the pool once no process maps it) and the sidecar.

    Also removes leftovers of an interrupted copy in `mount`: the mount belongs to clawbot alone.

    + keep: staged copies another model server still serves (a staged swap runs two): never removed"""
    state_dir = Path(state_dir)
    removed: list[str] = []
    record = _read_sidecar(state_dir)
    candidates = [Path(record.path)] if record else []
    if mount is not None and is_hugetlbfs(mount):
        candidates += [p for p in Path(mount).iterdir() if p.suffix in (".gguf", ".partial")]
    kept = {str(Path(k)) for k in keep if k}
    for path in dict.fromkeys(candidates):
        if str(path) in kept:
            continue
        try:
            path.unlink()
            removed.append(str(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove staged copy %s: %s", path, exc)
    (state_dir / SIDECAR).unlink(missing_ok=True)
    if removed:
        log.info("released staged model copy: %s", ", ".join(removed))
    return removed


def stage(source: str | Path, mount: str | Path, state_dir: str | Path, source_sha256: str,
          keep: tuple[str, ...] = ()) -> StagedModel:
    """Copy `source` into the hugetlbfs `mount` (or reuse an identical staged copy) and return its record.

    `source_sha256` is the source's hash (cached by the caller); the copy is hashed as it lands in the
    huge pages and must match it. Raises StagingError naming need vs free pages when the pool is short."""
    source, mount, state_dir = Path(source), Path(mount), Path(state_dir)
    st = source.stat()
    f_type, page_bytes = statfs_type(mount)
    if f_type != HUGETLBFS_MAGIC:
        raise StagingError(f"{mount} is not a hugetlbfs mount")
    record = _read_sidecar(state_dir)
    if _reusable(record, source, st, source_sha256, mount):
        assert record is not None
        record.reused = True
        log.info("reusing staged copy %s of %s (same size, mtime and sha256)", record.path, source)
        return record
    release(state_dir, mount, keep)  # a copy of another (or changed) model: free its pages first

    pages = pages_needed(st.st_size, page_bytes)
    info = read_meminfo()
    page_kib = page_bytes // 1024
    # HugePages_Free still counts pages that are reserved for mappings but not yet faulted in.
    free = info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)
    if info.get("Hugepagesize") == page_bytes and free < pages:
        total = info.get("HugePages_Total", 0)
        raise StagingError(
            f"too few huge pages to stage {source.name} ({st.st_size} bytes): need {pages} pages of {page_kib} kB, "
            f"{free} free (HugePages_Total {total}); raise vm.nr_hugepages to at least {total - free + pages} "
            f"(the rollout reserves clawbot.common.sizing.hugepages_for(model bytes))")

    final = mount / f"{source.stem}.{source_sha256[:12]}.gguf"
    partial = final.with_suffix(".partial")
    started = time.monotonic()
    digest = hashlib.sha256()
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, pages * page_bytes)
        try:
            # MAP_SHARED on hugetlbfs reserves all pages here (ENOMEM if the pool is short), so the copy
            # cannot SIGBUS half-way when another process takes pages meanwhile.
            mapped = mmap.mmap(fd, pages * page_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise StagingError(f"cannot map {pages} huge pages for {source.name}: {exc.strerror or exc} "
                               f"(HugePages_Free {read_meminfo().get('HugePages_Free')})") from None
        with mapped, open(source, "rb") as src:
            view = memoryview(mapped)
            offset, last_log = 0, started
            while offset < st.st_size:
                n = src.readinto(view[offset:min(offset + COPY_CHUNK, st.st_size)])
                if not n:
                    raise StagingError(f"{source} shrank while it was being staged ({offset} of {st.st_size} bytes)")
                digest.update(view[offset:offset + n])  # hash what landed in the huge pages
                offset += n
                now = time.monotonic()
                if now - last_log >= PROGRESS_EVERY_S:
                    last_log = now
                    rate = offset / max(now - started, 1e-6)
                    log.info("staging %s: %d/%d MiB (%.0f %%) in %.1f s, %.0f MiB/s, ETA %.0f s", source.name,
                             offset >> 20, st.st_size >> 20, 100 * offset / st.st_size, now - started,
                             rate / (1 << 20), (st.st_size - offset) / max(rate, 1e-6))
            view.release()
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    os.close(fd)
    if digest.hexdigest() != source_sha256:
        partial.unlink(missing_ok=True)
        raise StagingError(f"staged copy of {source} has sha256 {digest.hexdigest()}, the source {source_sha256}: "
                           "the file changed while it was copied, or memory is bad")
    if source.stat().st_mtime_ns != st.st_mtime_ns:
        partial.unlink(missing_ok=True)
        raise StagingError(f"{source} was modified while it was being staged")
    os.replace(partial, final)
    seconds = time.monotonic() - started
    staged = StagedModel(str(source), st.st_size, st.st_mtime_ns, source_sha256, str(final), final.stat().st_ino,
                         pages * page_bytes, page_kib, pages, round(seconds, 3))
    _write_sidecar(state_dir, staged)
    log.info("staged %s into %s: %d pages of %d kB in %.1f s (%.0f MiB/s), sha256 verified", source.name, final,
             pages, page_kib, seconds, st.st_size / (1 << 20) / max(seconds, 1e-6))
    return staged
