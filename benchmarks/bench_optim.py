"""pytest-benchmark: one AdamW step on MiniLM / BERT-base parameter mixes (cases of the ``optim`` suite).

    pytest benchmarks/bench_optim.py --benchmark-only            # MiniLM mix (quick cases)
    TURBOTUNE_BENCH_FULL=1 pytest benchmarks/bench_optim.py --benchmark-only   # + BERT-base, for-loop

Run as a script to print the Markdown tables recorded in benchmarks/RESULTS.md:

    python benchmarks/bench_optim.py [--full]     # the suite's cases; the providers of each configuration
                                                  # step in turn (paired, the harness's default), so all see
                                                  # the same machine load; + the memory table
    python benchmarks/bench_optim.py --paired-clip  # AdamW(max_grad_norm) vs torch clip_grad_norm_ + fused
                                                    # step, paired, 20+ steps, weights compared at the end
    python benchmarks/bench_optim.py --paired-cnn   # ResNet-18 / -50 mixes, conv weights channels_last:
                                                    # turbotune vs torch fused vs turbotune's reference path

TURBOTUNE_BENCH_THREADS=n pins torch.set_num_threads (the native kernels use OpenMP's own count:
set OMP_NUM_THREADS=n too to pin both). TURBOTUNE_BENCH_CLOCK=thread times the ``--paired-*`` modes in CPU time
of the calling thread (meaningful with one thread: the kernels' own cost on a machine shared with other jobs).
"""
import gc
import os
import sys

import pytest
import torch

from turbotune.bench import markdown_table
from turbotune.bench.suites.optim import memory_table, optim_suite

FULL = os.environ.get("TURBOTUNE_BENCH_FULL", "0") == "1"
CASES = list(optim_suite(quick=not FULL, device=torch.device("cpu")))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.shape.split()[0]}-{c.dtype}-{c.mode}-{c.provider}" for c in CASES])
def test_adamw_step(benchmark, case):
    benchmark.group = f"{case.shape.split()[0]} {case.dtype} {case.mode}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline, bytes=case.work.get("bytes"))
    benchmark.pedantic(case.fn, rounds=10, warmup_rounds=2)


def main(full: bool) -> None:
    from turbotune.bench import run

    rows = run(["optim"], quick=not full, device=torch.device("cpu"), budget_s=2.0 if full else 1.0, progress=False)
    print(markdown_table(rows))
    print("| configuration | params + grads B/param | optimizer state B/param | total B/param |")
    print("|---|---|---|---|")
    for m in memory_table():
        print(f"| {m['config']} | {m['params_grads']:g} | {m['state']:g} | {m['total']:g} |")


# TURBOTUNE_BENCH_CLOCK=thread: time the calling thread's CPU time instead of wall time. With one thread
# (OMP_NUM_THREADS=1 TURBOTUNE_BENCH_THREADS=1) that is the kernel's own cost, free of the time slices other
# processes take on a shared machine (memory stalls still count).
CLOCK = os.environ.get("TURBOTUNE_BENCH_CLOCK", "wall")

CLIP_HEADER = ("| mix | turbotune max_grad_norm min / median ms | torch clip_grad_norm_ + fused min / median ms "
               "| speed-up min / median | GB/s at min (32 / 40 B/param) | weights max rel diff after the run "
               "(<= 1e-5) | norm rel err vs fp64: turbotune / torch |")


def paired_clip(model: str, reps: int) -> str:
    """One Markdown row: clipping + step, turbotune ``AdamW(max_grad_norm=...)`` against torch's
    ``clip_grad_norm_`` + ``AdamW(fused=True)``, paired (:func:`turbotune.bench.timer.measure_paired`), on
    the same parameters and gradients (restored before every step, untimed, since torch's clipping rewrites
    them). After the ``reps`` (>= 20) steps both copies of the weights must agree to 1e-5 relative
    (max |a - b| / max |b| over each tensor)."""
    import time

    from turbotune.bench.suites.optim import CLIP_NORM, MODELS, _params, numel
    from turbotune.bench.timer import measure_paired
    from turbotune.optim import AdamW

    assert reps >= 20
    ps = _params(MODELS[model], torch.float32, torch.device("cpu"))
    qs = _params(MODELS[model], torch.float32, torch.device("cpu"))  # same seed: same values and grads
    grads = [p.grad.clone() for p in ps]
    exact = float(torch.sqrt(sum(g.double().square().sum() for g in grads)))  # the true norm, fp64
    ot = torch.optim.AdamW(ps, lr=1e-4, fused=True)
    oo = AdamW(qs, lr=1e-4, max_grad_norm=CLIP_NORM)
    norms = []

    def torch_step():
        norms.append(torch.nn.utils.clip_grad_norm_(ps, CLIP_NORM))
        ot.step()

    def restore(i):
        torch._foreach_copy_([p.grad for p in (ps if i == 0 else qs)], grads)

    clock = time.thread_time if CLOCK == "thread" else time.perf_counter
    tt, to = measure_paired([torch_step, oo.step], torch.device("cpu"), warmup=2, rounds=reps - 2, before=restore,
                            clock=clock)
    worst = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item() for p, q in zip(qs, ps))
    err_tt = abs(float(oo.last_grad_norm) / exact - 1)
    err_torch = abs(float(norms[-1]) / exact - 1)
    n = numel(MODELS[model])
    ok = "yes" if worst <= 1e-5 else "NO"
    return (f"| {model} | {to.min:.1f} / {to.p50:.1f} | {tt.min:.1f} / {tt.p50:.1f} "
            f"| **{tt.min / to.min:.2f}x / {tt.p50 / to.p50:.2f}x** "
            f"| {32 * n / to.min / 1e6:.1f} / {40 * n / tt.min / 1e6:.1f} | {worst:.1e} ({ok}) "
            f"| {err_tt:.1e} / {err_torch:.1e} |")


CNN_HEADER = ("| mix (conv weights channels_last) | torch fused min / median ms | turbotune min / median ms "
              "| turbotune reference path min / median ms | torch fused on contiguous copies min / median ms "
              "| torch / turbotune min / median | reference path / turbotune min / median "
              "| torch on contiguous / turbotune min / median | weights max rel diff vs torch (<= 1e-6) |")


def paired_cnn(model: str, reps: int) -> str:
    """One Markdown row: an fp32 step on a ResNet parameter mix whose conv weights (and grads) are
    channels_last, as ``turbotune.optimize(cnn)`` leaves them: torch's fused AdamW, turbotune's native kernel
    and turbotune's reference path (what these params took before the kernels accepted dense layouts), each on
    its own copy of the same params and grads, paired (:func:`turbotune.bench.timer.measure_paired`); and
    torch's fused AdamW on contiguous copies (its kernel without the layout). After the run turbotune's and
    torch's weights must agree to 1e-6 relative (max |a - b| / max |b| over each tensor)."""
    import time

    from turbotune.bench.suites.optim import _params, cnn_providers, cnn_shapes, numel
    from turbotune.bench.timer import measure_paired

    shapes = cnn_shapes(model)
    n = numel(shapes)
    providers = cnn_providers()
    sets = [_params(shapes, torch.float32, torch.device("cpu"), channels_last=True) for _ in providers]
    fns = [make(ps) for (_, _, make), ps in zip(providers, sets)]
    contiguous = _params(shapes, torch.float32, torch.device("cpu"))
    fns.append(torch.optim.AdamW(contiguous, lr=1e-4, fused=True).step)
    clock = time.thread_time if CLOCK == "thread" else time.perf_counter
    t = measure_paired(fns, torch.device("cpu"), warmup=2, rounds=reps, clock=clock)
    names = [name for name, _, _ in providers]
    torch_ps, tt_ps = sets[names.index("torch-fused")], sets[names.index("turbotune")]
    worst = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item() for p, q in zip(tt_ps, torch_ps))
    ok = "yes" if worst <= 1e-6 else "NO"
    theirs, ours, ref, contig = t  # the order of cnn_providers() + torch on contiguous copies

    def ratio(a, b):
        return f"{a.min / b.min:.2f}x / {a.p50 / b.p50:.2f}x"

    return (f"| {model} ({n / 1e6:.1f}M, {len(shapes)} tensors) | "
            + " | ".join(f"{x.min:.1f} / {x.p50:.1f}" for x in t)
            + f" | **{ratio(theirs, ours)}** | {ratio(ref, ours)} | {ratio(contig, ours)} | {worst:.1e} ({ok}) |")


PAIRED = {
    "--paired-clip": (paired_clip, CLIP_HEADER, (("minilm-22M", 30), ("bert-base-110M", 20))),
    "--paired-cnn": (paired_cnn, CNN_HEADER, (("resnet18-11.7M", 30), ("resnet50-25.6M", 20))),
}

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("TURBOTUNE_BENCH_THREADS", torch.get_num_threads())))
    modes = [m for m in PAIRED if m in sys.argv]
    if not modes:
        main("--full" in sys.argv)
    for mode in modes:
        fn, header, runs = PAIRED[mode]
        if CLOCK == "thread" and torch.get_num_threads() != 1:
            raise SystemExit("TURBOTUNE_BENCH_CLOCK=thread needs one thread: OMP_NUM_THREADS=1 TURBOTUNE_BENCH_THREADS=1")
        print(f"{mode}: torch {torch.__version__}, {torch.get_num_threads()} threads, {CLOCK} clock, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        for model, reps in runs:
            print(fn(model, reps), flush=True)
            gc.collect()  # the previous mix's params and optimizer state are gone before the next one
