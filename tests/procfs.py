"""Other processes' state from /proc (Linux): children, liveness, memory.

Blocking file reads: from a trio test, call them in a worker thread (`wait_until`
does) or accept a few microseconds of blocking for a single read.
"""

from __future__ import annotations

from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...], or None
    once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after its last ")".
    return stat.rsplit(")", 1)[1].split()


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid`, sorted (read from every /proc/N/stat: trio forks
    from worker threads, so /proc/PID/task/PID/children would miss them)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None and fields[1] == str(pid):
            kids.append(int(entry.name))
    return sorted(kids)


def is_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def rss_kib(pid: int) -> int:
    """Resident set size of `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")
