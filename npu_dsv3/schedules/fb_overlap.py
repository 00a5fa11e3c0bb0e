"""DualPipeV's overlapped pair (``--moe-fb-overlap``): one micro-batch's forward and another's
backward at the same time, so that the communication of one (the MoE all-to-alls, the
sequence-parallel gathers) runs while the other computes.

The forward runs on the schedule's thread and the backward on a second thread. Both issue
collectives, often on the same process groups, and every member of a group must issue that
group's collectives in the same order. A turnstile makes that order the same on every rank:
the two lanes take turns, one collective each (a lane that has finished lets the other run
freely), and each collective is only *issued* inside the turn, asynchronously; the lane then
waits for it outside, while the other lane computes or issues its own. The order therefore
depends only on each lane's own sequence of collectives, which every member of a group runs
identically, and never on timing.

Only what the two lanes share is guarded: the collectives, and megatron's global memory buffer
(the backward lane gets its own). Their work is disjoint otherwise: the pair's forward
and backward belong to different model chunks, the forward alone touches the MoE trackers and
the random generator (a recomputing backward replays forwards under saved generator states, so
recompute is allowed only without dropout), and the backward alone writes gradients.

On a device the backward lane queues its kernels on a stream of its own (ordered after the
schedule's stream at the pair's start, and waited for at its end), so the two lanes' kernels can
run side by side; that path follows the documented stream API and is unverified on NPU and GPU.

``record()`` collects each lane's compute and communication intervals for timelines.
"""

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch


@dataclass(frozen=True)
class Interval:
    lane: str
    """"F" (the pair's forward) or "B" (its backward)."""
    kind: str
    """"lane" (the whole forward or backward), "comm" (one collective from issue to completion)
    or "wait" (waiting for the lane's turn to issue); the lane's other time is compute."""
    start: float
    end: float


class _Turnstile:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.next = "F"
        self.finished: set = set()

    @contextlib.contextmanager
    def turn(self, lane: str) -> Iterator[None]:
        other = "B" if lane == "F" else "F"
        with self.cond:
            self.cond.wait_for(lambda: self.next == lane or other in self.finished)
            try:
                yield
            finally:
                self.next = other
                self.cond.notify_all()

    def finish(self, lane: str) -> None:
        with self.cond:
            self.finished.add(lane)
            self.cond.notify_all()


_turnstile: Optional[_Turnstile] = None
_lane = threading.local()
_recording: Optional[List[Interval]] = None


@contextlib.contextmanager
def record() -> Iterator[List[Interval]]:
    """Collect the intervals of every overlapped pair run inside (for timelines)."""
    global _recording
    _recording = []
    try:
        yield _recording
    finally:
        _recording = None


class _Recorded:
    """A collective's work handle whose ``wait`` records its wait-for-turn and comm intervals."""

    def __init__(self, work, lane: str, asked: float, start: float):
        self.work, self.lane, self.asked, self.start = work, lane, asked, start

    def wait(self, *args, **kwargs):
        done = self.work.wait(*args, **kwargs) if self.work is not None else True
        if _recording is not None:
            _recording.extend([Interval(self.lane, "wait", self.asked, self.start),
                               Interval(self.lane, "comm", self.start, time.perf_counter())])
        return done

    def __getattr__(self, name):
        return getattr(self.work, name)


def taking_turns(original):
    """A torch.distributed collective that, inside a pair, is issued in the lane's turn."""
    if getattr(original, "takes_turns", False):  # a module bound the already wrapped function
        return original

    def collective(*args, **kwargs):
        lane = getattr(_lane, "name", None)
        if _turnstile is None or lane is None:
            return original(*args, **kwargs)
        async_op = kwargs.pop("async_op", False)
        asked = time.perf_counter()
        with _turnstile.turn(lane):
            start = time.perf_counter()
            work = _Recorded(original(*args, async_op=True, **kwargs), lane, asked, start)
        if async_op:
            return work
        work.wait()
        return None

    collective.takes_turns = True
    return collective


def lane_memory_buffer(original):
    """megatron's global memory buffer (the sequence-parallel gathers land in it), one per lane:
    its contract is that a buffer is never used by two computations at once."""

    def get_global_memory_buffer():
        if getattr(_lane, "name", None) != "B":
            return original()
        if getattr(_lane, "buffer", None) is None:
            from megatron.core.utils import GlobalMemoryBuffer

            _lane.buffer = GlobalMemoryBuffer()
        return _lane.buffer

    return get_global_memory_buffer


def _run_lane(name: str, work: Callable[[], None], device_mode) -> Optional[BaseException]:
    _lane.name = name
    start = time.perf_counter()
    try:
        with device_mode() if device_mode is not None else contextlib.nullcontext():
            work()
    except BaseException as e:  # handed to the schedule's thread, which re-raises it
        return e
    finally:
        _lane.name = None
        _turnstile.finish(name)
        if _recording is not None:
            _recording.append(Interval(name, "lane", start, time.perf_counter()))
    return None


_streams: dict = {}


def _side_stream():
    """The backward lane's stream, one per process (created on first use, on the current device)."""
    if "side" not in _streams:
        _streams["side"] = torch.cuda.Stream()
    return _streams["side"]


def run_pair(forward: Callable[[], None], backward: Callable[[], None]) -> None:
    """Run ``forward`` here and ``backward`` on a second thread, at the same time."""
    global _turnstile
    from npu_dsv3 import backend

    # The CPU backend's device mode is a torch function mode, which is per thread.
    mode = backend.cuda_to_cpu.mode
    device_mode = type(mode) if mode is not None else None
    _turnstile = _Turnstile()
    errors: List[Optional[BaseException]] = [None]

    def run_backward():
        with torch.cuda.stream(side):
            errors[0] = _run_lane("B", backward, device_mode)

    # On a device the backward lane's kernels go to their own stream, ordered after everything the
    # schedule queued so far; the schedule's stream then waits for them before using the results.
    # (The CPU backend's streams are one serial stream: these calls change nothing there.)
    main = torch.cuda.current_stream()
    side = _side_stream()
    side.wait_stream(main)
    thread = threading.Thread(target=run_backward, name="dualpipev-backward")
    thread.start()
    try:
        error = _run_lane("F", forward, None)
    finally:
        thread.join()
        main.wait_stream(side)
        _turnstile = None
    for e in (error, errors[0]):
        if e is not None:
            raise e
