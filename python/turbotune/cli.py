"""The ``turbotune`` command line.

``turbotune info``   versions, devices, Triton mode, CUDA extension status and,
                     for every registered op, which implementation runs here and why
``turbotune bench``  run the benchmark suites against stock PyTorch
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from typing import List, Optional


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    """What ``turbotune info`` prints."""
    import torch

    import turbotune
    from turbotune import _native, backend

    import turbotune.ops  # noqa: F401  (registers every op)

    lines = [f"turbotune {turbotune.__version__}"]
    lines.append(f"python     {platform.python_version()} ({platform.machine()})")
    for dist in ("torch", "triton", "transformers", "numpy"):
        lines.append(f"{dist:<10} {_version(dist)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device     cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append(f"device     cpu only ({os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads; "
                     f"torch.cuda: {'built' if torch.backends.cuda.is_built() else 'not built'}, no device)")
    mode, why = backend.triton_mode()
    lines.append(f"triton     {mode}: {why}")
    st = _native.status()
    if st.loaded:
        feats = ", ".join(k for k, v in st.cpu_features.items() if v) or "none detected"
        lines.append(f"native     loaded ({'OpenMP, ' if st.openmp else ''}{st.threads} threads; CPU: {feats})")
    else:
        lines.append(f"native     NOT loaded: {st.error}")
    lines.append(f"cuda ext   {st.cuda_summary()}")
    forced = os.environ.get(backend.ENV_VAR)
    lines.append(f"override   {backend.ENV_VAR}={forced}" if forced else f"override   {backend.ENV_VAR} not set (automatic)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lines.append("")
    lines.append(f"ops on {dev}:")
    for name, row in backend.explain().items():
        spec = backend.registered_ops()[name]
        lines.append(f"  {name}: {spec.summary}" if spec.summary else f"  {name}")
        for dtype, choice in row.items():
            lines.append(f"    {dtype:<9} -> {choice.impl:<9} {choice.reason}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    print(info_text())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from turbotune import bench

    names = args.only or None
    available = bench.all_suites()
    if args.list:
        for name, fn in available.items():
            doc = (sys.modules[fn.__module__].__doc__ or "").strip().splitlines()
            print(f"{name:<12} {doc[0] if doc else ''}")
        return 0
    if names:
        unknown = [n for n in names if n not in available]
        if unknown:
            print(f"turbotune bench: unknown suite(s) {', '.join(unknown)}; available: {', '.join(available)}",
                  file=sys.stderr)
            return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"turbotune bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    rows = bench.run(names, quick=args.quick, progress=not args.no_progress)
    paths = bench.write_results(rows, args.out)
    print(bench.markdown_table(rows), end="")
    print(f"\nwrote {paths['json']} and {paths['markdown']}")
    print("vs torch = stock PyTorch median time / turbotune median time in the same run (> 1 = faster)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbotune", description="Fast BERT/CNN fine-tuning and inference kernels.")
    p.add_argument("--version", action="version", version=f"turbotune {_version('turbotune')}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sp = sub.add_parser("info", help="versions, devices and which implementation each op uses here")
    sp.set_defaults(func=_cmd_info)

    sp = sub.add_parser("bench", help="benchmark turbotune against stock PyTorch")
    sp.add_argument("--quick", action="store_true", help="a small subset of each suite (about a minute)")
    sp.add_argument("--only", action="append", metavar="NAME", help="run only this suite (repeatable)")
    sp.add_argument("--out", default="turbotune-bench", metavar="DIR",
                    help="where bench.json and bench.md are written (default: ./turbotune-bench)")
    sp.add_argument("--threads", type=int, metavar="N",
                    help="CPU threads for torch (default: torch's choice; 1 gives steadier numbers on a busy machine)")
    sp.add_argument("--list", action="store_true", help="list the available suites and exit")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
