"""Shared benchmark plumbing: timing, machine description, and writing JSON / Markdown / PNG."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

import lora_fast

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_us(fn: Callable[[], object], min_run_time: float) -> float:
    """Median time of one call in microseconds (torch.utils.benchmark's blocked autorange)."""
    fn()
    measurement = tbench.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    ).blocked_autorange(min_run_time=min_run_time)
    return measurement.median * 1e6


def interleaved_median_us(
    fns: dict[str, Callable[[], object]], min_run_time: float, min_rounds: int = 5
) -> dict[str, float]:
    """Median time of one call of each function in microseconds, measured in rounds that call
    every function once, in turn, until each has run for ``min_run_time`` seconds (and at least
    ``min_rounds`` times). On a shared machine whose speed drifts, the drift lands on every
    function alike, so the ratios between them hold where back-to-back timings would not.

    Each round starts one function later than the one before, so every function follows each
    other one equally often: what a call leaves behind (a slow one's freed heap, evicted caches)
    does not always fall on the same successor. On the CPU, a SmolLM2 decode forward measured
    2.5% slower right after PEFT's mixed-batch forward than after the base model's."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < min_rounds or min(sum(t) for t in times.values()) < min_run_time:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def gpu_median_us(
    fn: Callable[[], object], repetitions: int, graph: bool = True, captured: list[bool] | None = None
) -> float:
    """Median GPU time of one call in microseconds, L2 flushed before each repetition.

    With ``graph`` the call is captured in a CUDA graph and replayed (launch overhead out of the
    measurement, as in a graph-captured serving step); if capture fails it is timed eagerly.
    ``captured``, when given, gets True appended if a graph was replayed, else False.
    """
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile / autotune / allocate outside the measurement
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                fn()
            run = cuda_graph.replay
        except Exception:
            torch.cuda.synchronize()
            run = fn
    if captured is not None:
        captured.append(run is not fn)
    times = []
    for _ in range(repetitions):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: str = "cuda", size_bytes: int = 2**30) -> float:
    """Achieved HBM bandwidth of a device-to-device copy (bytes read + written per second)."""
    src = torch.empty(size_bytes, dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return 2 * size_bytes / seconds / 1e9


def read_bandwidth_gbps(device: str, size_bytes: int = 2**29, repetitions: int = 10) -> float:
    """Bytes per second the device reads from memory with torch's own threads: the median time of
    summing a float32 buffer of ``size_bytes`` (larger than any cache), GB/s."""
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(repetitions + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        buffer.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return size_bytes / statistics.median(times[2:]) / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_isa": lora_fast.backends.cpu_isa(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lora_fast": lora_fast.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for package in ("peft", "triton", "vllm"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def slug(text: str) -> str:
    """``text`` as a file-name piece: lower case, each run of other characters one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


ROW_LOG_ENV = "BENCH_ROW_LOG"


def record_row(row: dict) -> None:
    """Appends ``row`` as one JSON line to the file named by $BENCH_ROW_LOG, if set: a run cut
    short by a time limit (benchmarks/gpu_session.sh) keeps every row measured before the cut."""
    path = os.environ.get(ROW_LOG_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")


def write_results(stem: str, payload: dict, table: str, out_dir: Path | None = None) -> list[Path]:
    """``<stem>.json`` and ``<stem>.md`` under out_dir (default benchmarks/results/)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path = out_dir / f"{stem}.md"
    header = ", ".join(f"{k}: {v}" for k, v in payload["machine"].items() if v is not None)
    md_path.write_text(f"# {stem}\n\n{header}\n\n{table}\n")
    return [json_path, md_path]
