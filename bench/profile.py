"""Where l4proxy's time goes under ``Connection: close`` load: py-spy, summarized.

py-spy samples the worker's Python stacks (``--subprocesses``: the
supervisor's worker is a child; ``--nonblocking``: the proxy is never
paused, which rules out ``--native``) while wrk drives close-mode load.
Time inside the compiled modules is billed to the Python frame that called
them; the pump thread runs without the GIL and appears idle (not sampled). The raw (collapsed)
output is one line per distinct stack, ``frame;frame;... count``. From it we
report *self* time (the innermost frame) and *inclusive* time (any frame on
the stack) per function, as shares of the non-idle samples: inclusive says
which phase of a connection costs (accept, peek, connect, hand-off), self
says which line of code burns it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

from bench import wrk
from bench.scenarios import Target

RATE = 200  # samples per second per thread
ENTRY_POINTS = ("(l4proxy/__main__.py)", "(l4proxy/cli.py)", "(l4proxy/sidecar/run.py)")

_LOCATION = re.compile(r"\s*\(([^()]*)\)\s*$")


@dataclass(frozen=True)
class Profile:
    samples: int
    self_share: list[tuple[str, float]]
    inclusive_share: list[tuple[str, float]]
    raw_path: str
    busy: list[tuple[str, float]] = field(default_factory=list)  # thread -> share of wall time

    def text(self, top: int = 15) -> str:
        lines = [f"py-spy, l4proxy (raw stacks: {self.raw_path})", ""]
        if self.busy:
            lines.append("threads busy (share of wall time on CPU):")
            lines += [f"  {share * 100:5.1f} %  {name}" for name, share in self.busy]
        lines.append(f"event-loop thread, self time ({self.samples} samples; innermost frame):")
        lines += [f"  {share * 100:5.1f} %  {name}" for name, share in self.self_share[:top]]
        lines.append("event-loop thread, inclusive time of l4proxy functions:")
        lines += [f"  {share * 100:5.1f} %  {name}" for name, share in self.inclusive_share[:top]]
        return "\n".join(lines) + "\n"


def py_spy() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = exe if os.path.exists(exe) else shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy is not installed (pip install -r requirements-bench.txt)")
    return found


def _frame_name(frame: str) -> str:
    """``_serve (/x/l4proxy/sidecar/worker.py:312)`` → ``_serve (l4proxy/sidecar/worker.py)``:
    lines merged; l4proxy's files from the package down, others as folder/file."""
    m = _LOCATION.search(frame)
    if not m:
        return frame.strip()
    parts = m.group(1).rsplit(":", 1)[0].split("/")
    top = len(parts) - 1 - parts[::-1].index("l4proxy") if "l4proxy" in parts[:-1] else -2
    where = "/".join(parts[top:])
    return f"{frame[: m.start()].strip()} ({where})"


_PROCESS = re.compile(r"^process (\d+):")
_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\)(?::\s*(.*))?$")


def summarize(
    raw: str, raw_path: str = "", expected_per_thread: float = 0.0, focus: str = "MainThread"
) -> Profile:
    """Aggregate py-spy's ``--format raw --threads`` output.

    Self and inclusive shares are over the *focus* threads' samples (the
    event loops: where the per-connection work runs); every thread counts
    toward the busy shares. *expected_per_thread*: rate × seconds, the
    samples of a thread always on CPU.
    """
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = [f for f in stack.split(";") if f]
        # py-spy puts the process and the thread as pseudo-frames first.
        pid, thread = "", ""
        while parts and (_PROCESS.match(parts[0]) or _THREAD.match(parts[0])):
            label = parts.pop(0)
            if m := _PROCESS.match(label):
                pid = m.group(1)
            elif m := _THREAD.match(label):
                thread = m.group(1) or "thread"
        frames = [_frame_name(f) for f in parts]
        if not frames:
            continue
        if thread:
            threads[f"{thread} (pid {pid})" if pid else thread] += n
            if thread != focus:
                continue
        total += n
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return Profile(0, [], [], raw_path)
    busy = (
        [(k, v / expected_per_thread) for k, v in threads.most_common()]
        if expected_per_thread
        else []
    )
    return Profile(
        total,
        [(k, v / total) for k, v in self_time.most_common()],
        # Inclusive time of l4proxy's own functions, without the entry
        # points that sit under every stack: what is left are the phases.
        [
            (k, v / total)
            for k, v in inclusive.most_common()
            if "(l4proxy/" in k and not k.endswith(ENTRY_POINTS)
        ],
        raw_path,
        busy,
    )


def profile_close_load(
    target: Target, out_dir: str, seconds: int = 5, connections: int = 50
) -> Profile:
    """Record *target* (an l4proxy) while wrk runs Connection: close at *connections*."""
    raw_path = os.path.join(out_dir, "l4proxy-close.pyspy.txt")
    record = [
        py_spy(),
        "record",
        "--pid",
        str(target.process.pid),
        "--subprocesses",
        "--threads",
        "--rate",
        str(RATE),
        "--duration",
        str(seconds),
        "--format",
        "raw",
        "--output",
        raw_path,
        "--nonblocking",
    ]
    argv = wrk.command(target.url, connections, seconds + 2, close=True)
    load = threading.Thread(target=wrk.run, args=(argv, target.launcher), daemon=True)
    load.start()
    done = subprocess.run(record, capture_output=True, text=True, timeout=seconds + 60)
    load.join()
    if done.returncode != 0 or not os.path.exists(raw_path):
        raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr[-1500:]}")
    with open(raw_path) as f:
        return summarize(f.read(), raw_path, RATE * seconds)
