"""Which processes used the machine's cores during a window, from /proc (Linux); also the process
table that the tests use to stop every process of a service they started.

A wall-clock ratio on a shared 2-core machine moves by more than the overhead it measures; CPU
time does not: it says directly how much of the machine the training got and how much went to
everything else the job started (for Ray: its daemons, the controller and helper actors).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # time.perf_counter()
    cpu_s: dict[int, float]  # pid -> user + system seconds so far
    names: dict[int, str]  # label() of the command line
    parents: dict[int, int]
    command_lines: dict[int, str]  # the arguments joined by spaces


def _read(pid: str) -> tuple[str, int, float, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]
    except OSError:  # the process ended while we looked
        return None
    # The command name in parentheses may hold spaces; the fields after it are space-separated.
    fields = text.rsplit(")", 1)[1].split()
    name = label(args) or text[text.index("(") + 1:text.rindex(")")]
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS_PER_S, " ".join(args)


def label(args: list[str]) -> str:
    """A short name for a command line: Ray's own titles as they are (ray::TrainController.run,
    ray-dashboard-StateHead-0), the script or module a Python interpreter runs, else the program."""
    if not args:
        return ""
    first = args[0].split(" (")[0].strip()  # Ray's dashboard heads append their interpreter's command
    if not os.path.basename(first).startswith("python"):
        return first if first.startswith("ray") else os.path.basename(first)
    rest = args[1:]
    for flag in ("-m", "-c"):  # a module, or the first words of inline code (multiprocessing's children)
        if flag in rest[:-1]:
            return rest[rest.index(flag) + 1] if flag == "-m" else "python -c " + rest[rest.index(flag) + 1][:40]
    scripts = [arg for arg in rest if not arg.startswith("-")]
    return os.path.basename(scripts[0]) if scripts else os.path.basename(first)


def snapshot() -> Snapshot:
    cpu, names, parents, command_lines = {}, {}, {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (read := _read(entry)) is not None:
            pid = int(entry)
            names[pid], parents[pid], cpu[pid], command_lines[pid] = read
    return Snapshot(time.perf_counter(), cpu, names, parents, command_lines)


def descendants(snap: Snapshot, root: int) -> set[int]:
    """`root` and every process below it."""
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in snap.parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def cores_used(before: Snapshot, after: Snapshot, pids: set[int]) -> float:
    """Cores the processes `pids` kept busy between the snapshots, on average (a process that
    started in between counts from zero; one that ended in between is not seen)."""
    seconds = sum(after.cpu_s[pid] - before.cpu_s.get(pid, 0.0) for pid in pids if pid in after.cpu_s)
    return seconds / max(after.taken_at - before.taken_at, 1e-9)


def split_cores(before: Snapshot, after: Snapshot, job_root: int, training_root: int) -> dict:
    """Cores used by the training process with its loader workers, and by everything else below
    `job_root` (the benchmark's driver), each of those by name, busiest first."""
    job = descendants(after, job_root)
    training = descendants(after, training_root)
    others = {}
    for pid in job - training:
        name = after.names[pid]
        others[name] = others.get(name, 0.0) + cores_used(before, after, {pid})
    return {"training_cores": cores_used(before, after, training),
            "other_cores": sum(others.values()),
            "others": dict(sorted(((name, round(cores, 4)) for name, cores in others.items() if cores > 0),
                                  key=lambda item: -item[1]))}
