"""Shared benchmark plumbing: interleaved medians, XLA memory, metadata, result files."""

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax


COMMITTED = Path(__file__).resolve().parent / "results"  # the tables the README quotes
RESULTS = COMMITTED  # where suites write; `python -m benchmarks` sets it (--out)


def metadata() -> dict:
    import equinox
    import jaxlib

    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', dev.platform)}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "equinox": equinox.__version__,
        "machine": platform.machine(),
    }


def _interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1):
    """Wall times (s) of each zero-argument function, run A B C A B C ... after `warmup`
    calls each, with `block_until_ready`, so that machine drift hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (s) of each zero-argument function, timed interleaved."""
    times = _interleaved_times(fns, repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_ratios(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    pairs: dict[str, tuple[str, str]],
    warmup: int = 1,
) -> dict:
    """Time zero-argument functions interleaved A B C A B C ... (after `warmup` calls
    each), with `block_until_ready`, and compare them round by round.

    **Returns:** `{"median_s": {name: median wall time}, "ratio": {label: median over the
    rounds of t_a / t_b}, "repeats": repeats}` for each `label: (a, b)` of `pairs`. The
    ratio of the same round's times is robust to drift of the machine's speed that hits
    a whole round (other jobs, frequency scaling), which a ratio of medians is not."""
    times = _interleaved_times(fns, repeats, warmup)
    return {
        "median_s": {name: statistics.median(ts) for name, ts in times.items()},
        "ratio": {
            label: statistics.median(x / y for x, y in zip(times[a], times[b]))
            for label, (a, b) in pairs.items()
        },
        "repeats": repeats,
    }


def compiled_memory(jitted, *args) -> dict[str, int]:
    """XLA's compiled memory figures (bytes) for a jitted function at `args`."""
    compiled = jitted.lower(*args).compile()
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }


def compile_seconds(jitted, *args) -> float:
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write `results/<name>.json` and `results/<name>.md`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(data, indent=2, default=float) + "\n")
    md.write_text(markdown.rstrip() + "\n")
    return js, md


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(name: str, fig) -> Path:
    """Save a matplotlib figure as `results/<name>.png` (Agg backend, no screen needed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
