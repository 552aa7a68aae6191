"""Run every benchmark suite: `python -m benchmarks [--quick] [--only NAME ...]`.

Each suite is a module `benchmarks/<name>.py` with `run(quick: bool) -> dict` that writes
`<name>.json` and `<name>.md` (and PNG plots); this entry point runs them in turn with a
progress bar and writes `summary.md` (all tables, with device and versions). Results go
to `./adjoint-bench/` in the working directory (or `--out DIR`); the committed tables in
`benchmarks/results/` change only with `--update-results`.
"""

import argparse
import importlib
import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import _common
from ._common import metadata


SUITES = (
    "costate",
    "sharing",
    "recurrent",
    "ctrnn",
    "continuous_costates",
    "control",
    "constraints",
    "implicit",
    "parallel_costates",
    "fit",
)


def write_summary(quick: bool) -> None:
    """Collect the Markdown of every suite with results on disk into `summary[_quick].md`
    (each table carries its own date, device and sizes)."""
    RESULTS = _common.RESULTS
    meta = metadata()
    parts = [
        "# Benchmark summary",
        "",
        f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores); python {meta['python']}; "
        f"jax {meta['jax']}; equinox {meta['equinox']}; mode: {'quick' if quick else 'full'}",
        "",
    ]
    suffix = "_quick" if quick else ""
    for name in SUITES:
        md = RESULTS / f"{name}{suffix}.md"
        if not md.exists():
            md = RESULTS / f"{name}.md"
        if md.exists():
            parts += [md.read_text(), ""]
    (RESULTS / f"summary{suffix}.md").write_text("\n".join(parts))
    print(f"wrote {RESULTS / f'summary{suffix}.md'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: minutes on a 2-core CPU")
    parser.add_argument("--only", nargs="+", choices=SUITES, help="run only these suites")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        default=None,
        help="JAX platform to run on (default: JAX's choice)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        default="adjoint-bench",
        help="directory for JSON, Markdown and PNG (default: ./adjoint-bench)",
    )
    where.add_argument(
        "--update-results",
        action="store_true",
        help=f"write into the committed tables, {_common.COMMITTED}",
    )
    args = parser.parse_args(argv)
    _common.RESULTS = _common.COMMITTED if args.update_results else Path(args.out).resolve()
    if args.device is not None:
        import jax

        if args.device == "gpu":  # "gpu" names CUDA or ROCm: let jax find the one present
            if jax.default_backend() != "gpu":
                parser.error(f"--device gpu: no GPU backend (jax sees {jax.devices()})")
        else:
            jax.config.update("jax_platforms", args.device)
    names = args.only or SUITES
    done, failed = [], []
    for name in tqdm(names, desc="benchmark suites", disable=not sys.stderr.isatty()):
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as err:
            print(f"[{name}] not available: {err}", file=sys.stderr)
            failed.append(name)
            continue
        t0 = time.perf_counter()
        print(f"[{name}] running{' (quick)' if args.quick else ''} ...", flush=True)
        module.run(quick=args.quick)
        print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", flush=True)
        done.append(name)
    write_summary(args.quick)
    return 1 if failed and not done else 0


if __name__ == "__main__":
    sys.exit(main())
