"""Peak memory of one run: the process's resident memory and, with CUDA, the GPU allocator's.

`PeakMemory` is what the engine, the streaming functions and the benchmarks report. The
CPU peak is this run's, not the process's, and measuring it changes nothing for other
tools: the kernel's high-water mark (VmHWM) is read, never reset. (Resetting it through
/proc/self/clear_refs works on Linux but also resets the ru_maxrss that `time -v`,
`wait4` and benchmark harnesses read, so they would under-report the process.) If the
mark rose during the run, the run set the process's peak and the new mark is exact;
otherwise the peak comes from a background thread sampling the resident size every few
milliseconds (a spike shorter than that can be missed).
"""

from __future__ import annotations

import functools
import os
import resource
import threading
from collections.abc import Sequence
from typing import Any

import torch

SAMPLE_SECONDS = 0.01
# what the allocator keeps beyond the tensors: each thread's heap holds freed blocks under
# glibc's mmap threshold (`release_large_frees`, 4 MiB), a few each
ALLOCATOR_SLACK_BYTES = 32 * 2**20
# the code of torch's kernels that a run is the first to call, paged in from the shared
# libraries as it runs and resident (file-backed) from then on: RssFile grew by 5.5 MB
# (task arithmetic), 6.5 (DARE) and 10.6 (TIES) in streamed merges of a 106M Llama
KERNEL_CODE_BYTES = 16 * 2**20


def predicted_peak_mb(rss_at_start_mb: float, held_mb: float) -> float:
    """A run's predicted peak RSS in MiB: what the process held when the run started, what
    the run's path holds at its fullest (`held_mb`, from its own terms), and what any run
    holds beyond its tensors (the allocator's slack, the kernels' code)."""
    return rss_at_start_mb + held_mb + (ALLOCATOR_SLACK_BYTES + KERNEL_CODE_BYTES) / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since start or the last reset)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (nan where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def release_large_frees(threshold_bytes: int = 4 * 2**20) -> bool:
    """Make glibc serve every allocation of `threshold_bytes` or more with its own memory
    map, returned to the system when freed. (By default glibc raises that threshold up to
    32 MiB after each large free, and then keeps tensors of a few MiB freed by each thread
    in that thread's heap: a streamed merge's three threads held ~200 MB more than they
    used.) False where the C library is not glibc."""
    try:
        return bool(_libc().mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except AttributeError:  # no C library found, or not glibc
        return False


def return_freed_heap() -> bool:
    """Give the pages of freed chunks inside glibc's heaps back to the system
    (`malloc_trim`). A layer-by-layer run frees a layer's activations, a few MiB each, among
    the cached inputs it keeps: the heap fragments, and what it held after each layer would
    add up with depth. False where the C library is not glibc."""
    try:
        return bool(_libc().malloc_trim(0))
    except AttributeError:
        return False


_MADV_HUGEPAGE = 14  # Linux's madvise advice
_HUGE_PAGE = 2 * 2**20


def prefer_huge_pages(buffer: torch.Tensor) -> None:
    """Ask the kernel to back a fresh CPU buffer's whole 2 MiB pages with huge pages (where
    transparent huge pages are on "madvise"), before it is first written: filling it then
    takes 512× fewer page faults (reading a 2.2 GB checkpoint into fresh tensors: 2.5 s →
    1.3 s). A no-op for small or GPU buffers and where the C library or kernel says no."""
    if buffer.device.type != "cpu" or buffer.nbytes < 2 * _HUGE_PAGE or _libc() is None:
        return
    start = -(-buffer.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (buffer.data_ptr() + buffer.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _libc().madvise(start, end - start, _MADV_HUGEPAGE)


def _gpus(devices: Sequence[torch.device | str] | None) -> list[torch.device]:
    if not torch.cuda.is_available():
        return []
    if devices is None:
        # querying a device that was never used would create a CUDA context on it
        if not torch.cuda.is_initialized():
            return []
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    out = []
    for device in map(torch.device, devices):
        if device.type == "cuda":
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            if device not in out:
                out.append(device)
    return out


class PeakMemory:
    """`with PeakMemory() as meter: ...` (or `start()` ... `stop()`) then `meter.report()`:
    the peak CPU resident memory of what ran inside, and GPU peaks summed over `gpus`
    (default: every GPU when CUDA is in use already; pass the devices a run computes on
    when it has not started CUDA yet)."""

    def __init__(self, gpus: Sequence[torch.device | str] | None = None) -> None:
        self._gpu_request = gpus
        self._gpus: list[torch.device] = []
        self._done = threading.Event()
        self._sampler: threading.Thread | None = None
        self._mark_at_start_mb = 0.0
        self.rss_at_start_mb = 0.0
        self.sampled_peak_mb = 0.0
        self._report: dict[str, Any] | None = None

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def start(self) -> "PeakMemory":
        self._mark_at_start_mb = peak_rss_mb()
        self.rss_at_start_mb = self.sampled_peak_mb = current_rss_mb()
        self._gpus = _gpus(self._gpu_request)
        for device in self._gpus:
            torch.cuda.reset_peak_memory_stats(device)
        self._sampler = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self.sampled_peak_mb = max(self.sampled_peak_mb, current_rss_mb())

    def stop(self) -> None:
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
        self.sampled_peak_mb = max(self.sampled_peak_mb, current_rss_mb())
        # taken here, so what runs between the end of the run and `report` does not count
        mark = peak_rss_mb()
        exact = mark > self._mark_at_start_mb  # the run raised the process's peak: the mark is its own
        self._report = {
            "cpu_peak_rss_mb": max(mark, self.sampled_peak_mb) if exact else self.sampled_peak_mb,
            "rss_at_start_mb": self.rss_at_start_mb, "peak_measured_from": "run start",
            "cpu_peak_source": "kernel high-water mark" if exact
            else f"resident size sampled every {SAMPLE_SECONDS * 1000:.0f} ms"}
        if self._gpus:
            self._report.update(
                gpu_peak_allocated_mb=sum(torch.cuda.max_memory_allocated(d) for d in self._gpus) / 2**20,
                gpu_peak_reserved_mb=sum(torch.cuda.max_memory_reserved(d) for d in self._gpus) / 2**20,
                gpus=[str(d) for d in self._gpus])

    def report(self) -> dict[str, Any]:
        """Peaks in MiB, as they stood at `stop`; `cpu_peak_source` says how the CPU peak
        was taken."""
        if self._report is None:
            raise RuntimeError("PeakMemory.report() before stop()")
        return dict(self._report)


# ------------------------------------------------------- Model Tailor's working set

def scored_bytes(out: int, inp: int, *, hessian: bool, target: bool) -> int:
    """One linear's score-cache entry: float32 salience and sensitivity z-scores and the
    inverse-Hessian factor; with exact compensation its Hessian, anchored also its target."""
    return 8 * out * inp + 4 * inp * inp + (4 * inp * inp if hessian else 0) + (4 * out * inp if target else 0)


def linear_working_bytes(out: int, inp: int) -> int:
    """Scoring and compensating one linear at a time: two of the damped Hessian, its
    Cholesky factor, inverse and upper factor in float64 at once (8·in² each), the factor in
    float32 (4·in²), and about six float32 out×in temporaries (change, salience,
    sensitivity, importance, the compensated copy)."""
    return 20 * inp * inp + 24 * out * inp


def layer_activation_bytes(batch: int, seq: int, hidden: int, ffn: int, heads: int) -> int:
    """One batch through one decoder layer, in float32 at most: some six hidden-wide
    tensors per token (residual, norm, q, k, v, attention output), three MLP-wide ones, and
    the attention weights (batch × heads × seq²)."""
    tokens = batch * seq
    return 4 * (6 * tokens * hidden + 3 * tokens * ffn + batch * heads * seq * seq)
