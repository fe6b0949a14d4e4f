"""Run one command and measure it the way the operating system sees it.

Every tool runs under ``/usr/bin/time -f '%M %e %U %S'``: GNU time forks the command from
its own small process and reports the command's ``ru_maxrss`` (peak resident set, KiB, as
``wait4`` returns it) -- so the bench's own Python cannot leak into the figure, which it
would if the harness forked the command itself (Linux carries the pre-``exec`` high-water
mark over into the child's ``ru_maxrss``).  Wall time is the harness's monotonic clock
around the whole run.

Guards, so that a peer that needs more memory than the machine has records
"failed (OOM)" instead of taking the shared machine down:

* ``RLIMIT_AS`` (address space) set in the child before ``exec`` (``--mem-limit``): an
  allocation past it fails inside the child (MemoryError / "can't allocate memory");
* a watchdog thread samples the command's RSS (psutil) every 0.2 s and kills its process
  group when the RSS passes ``--mem-limit`` or the machine's MemAvailable drops below
  ``--min-available`` (other people's work runs here too);
* a wall-clock timeout.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import psutil
except ImportError:  # pragma: no cover - the guard degrades to RLIMIT_AS only
    psutil = None

GNU_TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"
OOM_PATTERNS = re.compile(r"MemoryError|can't allocate memory|Cannot allocate memory|bad_alloc|"
                          r"out of memory|DefaultCPUAllocator|std::bad_alloc|mmap failed|OSError: \[Errno 12\]", re.I)


@dataclass
class RunResult:
    status: str                 # "ok" | "failed (OOM: ...)" | "failed (timeout ...)" | "failed (exit N: ...)"
    wall_s: float | None
    peak_rss_bytes: int | None  # ru_maxrss of the command, as GNU time reports it
    user_s: float | None = None
    sys_s: float | None = None
    exit_code: int | None = None
    output_bytes: int | None = None
    watchdog_peak_rss_bytes: int | None = None
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return asdict(self)


def _limit_address_space(limit: int | None):
    def apply() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        if p.pid == pid:          # GNU time itself: tiny, not the command
            continue
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_measured(argv: list[str], log: Path, *, cwd: Path, env: dict, timeout: float,
                 mem_limit: int | None, min_available: int | None, output: Path | None = None) -> RunResult:
    timefile = log.with_suffix(".time")
    cmd = [GNU_TIME, "-f", "%M %e %U %S", "-o", str(timefile), *argv]
    stop = threading.Event()
    killed: list[str] = []
    peak = [0]
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                preexec_fn=_limit_address_space(mem_limit), start_new_session=True)

        def kill(reason: str) -> None:
            if not killed:
                killed.append(reason)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def watch() -> None:
            while not stop.wait(0.2):
                if psutil is None:
                    continue
                rss = _tree_rss(proc.pid)
                peak[0] = max(peak[0], rss)
                if mem_limit and rss > mem_limit:
                    kill(f"RSS passed the bench's limit of {mem_limit / 2**30:.0f} GiB")
                elif min_available and psutil.virtual_memory().available < min_available:
                    kill(f"machine memory nearly exhausted (MemAvailable < {min_available / 2**30:.1f} GiB) "
                         f"at RSS {rss / 2**30:.1f} GiB")

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(f"timeout after {timeout:.0f} s")
            proc.wait()
        except BaseException:
            kill("interrupted")
            proc.wait()
            raise
        finally:
            stop.set()
            watcher.join()
        wall = time.perf_counter() - t0

    text = log.read_text(errors="replace")
    tail = "\n".join(text.strip().splitlines()[-15:])
    rss = user = sys_ = None
    exit_code = proc.returncode
    try:
        lines = timefile.read_text().strip().splitlines()
        for line in lines:
            m = re.match(r"Command exited with non-zero status (\d+)", line)
            if m:
                exit_code = int(m.group(1))
            m = re.match(r"Command terminated by signal (\d+)", line)
            if m:
                exit_code = -int(m.group(1))
        fields = lines[-1].split()
        rss, wall_time, user, sys_ = int(fields[0]) * 1024, float(fields[1]), float(fields[2]), float(fields[3])
    except (OSError, IndexError, ValueError):
        pass

    if killed:
        reason = killed[0]
        status = f"failed (timeout after {timeout:.0f} s)" if reason.startswith("timeout") else \
            "failed (interrupted)" if reason == "interrupted" else f"failed (OOM: {reason})"
    elif exit_code == 0:
        status = "ok"
    elif exit_code == -signal.SIGKILL:
        status = "failed (OOM: killed by the kernel)"
    elif re.search(r"No space left on device|Errno 28|ENOSPC", text):
        status = "failed (disk full: no space left on device)"
    elif OOM_PATTERNS.search(text):
        limit = f"address-space limit {mem_limit / 2**30:.0f} GiB" if mem_limit else "allocation failed"
        status = f"failed (OOM: {limit})"
    else:
        last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")
        status = f"failed (exit {exit_code}: {last.strip()[:160]})"
    out_bytes = dir_bytes(output) if output is not None and status == "ok" else None
    return RunResult(status, round(wall, 3), rss, user, sys_, exit_code, out_bytes,
                     peak[0] or None, tail if status != "ok" else "")


def warm_page_cache(files: list[Path]) -> float:
    """Read every file once so each tool starts with its source in the page cache."""
    t0 = time.perf_counter()
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def drop_page_cache(files: list[Path]) -> float:
    """Evict these files (only) from the page cache: POSIX_FADV_DONTNEED, no root needed."""
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - t0
