"""What machine a benchmark ran on (shared by the benchmark scripts beside this file)."""

import os
import platform
import time


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class OtherLoad:
    """CPU time the rest of the machine used while a timed section ran (other processes skew timings)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return busy / os.sysconf("SC_CLK_TCK"), ours, time.perf_counter()

    def cores(self) -> float:
        """Average cores other processes kept busy since construction."""
        return self.report()["other_cores_avg"]

    def report(self) -> dict:
        end = self._sample()
        if self.start is None or end is None:
            return {"other_core_s": float("nan"), "wall_s": float("nan"), "other_cores_avg": float("nan")}
        busy, ours, wall = (b - a for a, b in zip(self.start, end))
        other = max(0.0, busy - ours)
        return {"other_core_s": other, "wall_s": wall, "other_cores_avg": other / max(wall, 1e-9)}
