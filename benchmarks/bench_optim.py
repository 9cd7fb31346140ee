"""pytest-benchmark: one AdamW step on MiniLM / BERT-base parameter mixes (cases of the ``optim`` suite).

    pytest benchmarks/bench_optim.py --benchmark-only            # MiniLM mix (quick cases)
    TURBOTUNE_BENCH_FULL=1 pytest benchmarks/bench_optim.py --benchmark-only   # + BERT-base, for-loop

Run as a script to print the Markdown tables recorded in benchmarks/RESULTS.md:

    python benchmarks/bench_optim.py [--full]     # the suite's cases, one after the other
    python benchmarks/bench_optim.py --paired     # turbotune fp32 / torch fused / turbotune bf16+master /
                                                  # a copy of 28 B/param, interleaved: all see the same load
    python benchmarks/bench_optim.py --paired-clip  # AdamW(max_grad_norm) vs torch clip_grad_norm_ + fused
                                                    # step, interleaved, 20+ steps, weights compared at the end
    python benchmarks/bench_optim.py --paired-schedule  # plain fp32 step: the kernel's balanced work split
                                                        # vs the old equal-chunk-count split vs torch vs copy
    python benchmarks/bench_optim.py --paired-cnn   # ResNet-18 / -50 mixes, conv weights channels_last:
                                                    # turbotune vs torch fused vs turbotune's reference path

TURBOTUNE_BENCH_THREADS=n pins torch.set_num_threads (the native kernels use OpenMP's own count:
set OMP_NUM_THREADS=n too to pin both). TURBOTUNE_BENCH_CLOCK=thread times the paired modes in CPU time
of the calling thread (meaningful with one thread: the kernels' own cost on a machine shared with other jobs).
"""
import gc
import os
import sys

import pytest
import torch

from turbotune.bench import markdown_table, measure
from turbotune.bench.suites.optim import memory_table, optim_suite

FULL = os.environ.get("TURBOTUNE_BENCH_FULL", "0") == "1"
CASES = list(optim_suite(quick=not FULL, device=torch.device("cpu")))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.shape.split()[0]}-{c.dtype}-{c.mode}-{c.provider}" for c in CASES])
def test_adamw_step(benchmark, case):
    benchmark.group = f"{case.shape.split()[0]} {case.dtype} {case.mode}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline, bytes=case.work.get("bytes"))
    benchmark.pedantic(case.fn, rounds=10, warmup_rounds=2)


def main(full: bool) -> None:
    cases = list(optim_suite(quick=not full, device=torch.device("cpu")))
    rows = []
    for c in cases:
        t = measure(c.fn, torch.device("cpu"), warmup=2, budget_s=2.0 if full else 1.0, min_repeats=5 if full else 10)
        rows.append(dict(op=c.op, provider=c.provider, mode=c.mode, shape=c.shape, dtype=c.dtype, device=c.device,
                         p20=t.p20, p50=t.p50, p80=t.p80, repeats=t.repeats, baseline=c.baseline,
                         ratio_vs_torch=None, gb_per_s=c.work["bytes"] / (t.p50 / 1e3) / 1e9))
    base = {(r["mode"], r["shape"], r["dtype"]): r["p50"] for r in rows if r["baseline"]}
    for r in rows:
        r["ratio_vs_torch"] = base[(r["mode"], r["shape"], r["dtype"])] / r["p50"]
    print(markdown_table(rows))
    print("| configuration | params + grads B/param | optimizer state B/param | total B/param |")
    print("|---|---|---|---|")
    for m in memory_table():
        print(f"| {m['config']} | {m['params_grads']:g} | {m['state']:g} | {m['total']:g} |")


# TURBOTUNE_BENCH_CLOCK=thread: time the calling thread's CPU time instead of wall time. With one thread
# (OMP_NUM_THREADS=1 TURBOTUNE_BENCH_THREADS=1) that is the kernel's own cost, free of the time slices other
# processes take on a shared machine (memory stalls still count).
CLOCK = os.environ.get("TURBOTUNE_BENCH_CLOCK", "wall")


def _interleave(fns, reps, before=None, keep_order=False):
    """Time each function of ``fns`` once per round, rounds repeated ``reps`` times; the order rotates every
    round so that none always runs first (the machine may be shared). ``before(name)`` runs untimed before
    each call. Returns ``{name: times in ms}``, sorted unless ``keep_order`` (then round by round)."""
    import time

    clock = time.thread_time if CLOCK == "thread" else time.perf_counter
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            if before is not None:
                before(k)
            s = clock()
            fns[k]()
            times[k].append((clock() - s) * 1e3)
    return times if keep_order else {k: sorted(v) for k, v in times.items()}


def _min_med(t):
    return t[0], t[len(t) // 2]


def paired(model: str, reps: int) -> str:
    """One Markdown row: min / median of interleaved steps (robust to a machine shared with other jobs),
    with a plain copy of the same 28 B/param as the bandwidth floor."""
    from turbotune.bench.suites.optim import MODELS, _params, numel
    from turbotune.optim import AdamW

    ps = _params(MODELS[model], torch.float32, torch.device("cpu"))
    qs = _params(MODELS[model], torch.bfloat16, torch.device("cpu"))
    n = numel(MODELS[model])
    src, dst = torch.ones(7 * n // 2), torch.empty(7 * n // 2)
    fns = {"tt": AdamW(ps, lr=1e-4).step, "torch": torch.optim.AdamW(ps, lr=1e-4, fused=True).step,
           "bf16": AdamW(qs, lr=1e-4).step, "copy": lambda: dst.copy_(src)}
    for f in fns.values():
        f()
        f()
    t = _interleave(fns, reps)
    (a0, a5), (b0, b5), (c0, c5), (d0, d5) = (_min_med(t[k]) for k in ("tt", "torch", "bf16", "copy"))
    gbs = lambda ms: 28 * n / ms / 1e6  # noqa: E731
    return (f"| {model} | {a0:.1f} / {a5:.1f} | {b0:.1f} / {b5:.1f} | {b0 / a0:.2f}x / {b5 / a5:.2f}x "
            f"| {c0:.1f} / {c5:.1f} | {c0 / a0:.2f} / {c5 / a5:.2f} "
            f"| {d0:.1f} / {d5:.1f} | {gbs(a0):.1f} / {gbs(b0):.1f} / {gbs(d0):.1f} |")


def paired_clip(model: str, reps: int) -> str:
    """One Markdown row: clipping + step, turbotune ``AdamW(max_grad_norm=...)`` against torch's
    ``clip_grad_norm_`` + ``AdamW(fused=True)``, interleaved, on the same parameters and gradients (restored
    before every step, untimed, since torch's clipping rewrites them). After ``reps`` (>= 20) steps both
    copies of the weights must agree to 1e-5 relative (max |a - b| / max |b| over each tensor)."""
    from turbotune.bench.suites.optim import CLIP_NORM, MODELS, _params, numel
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

    def restore(name):
        torch._foreach_copy_([p.grad for p in (ps if name == "torch" else qs)], grads)

    t = _interleave({"torch": torch_step, "turbotune": oo.step}, reps, before=restore)
    worst = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item() for p, q in zip(qs, ps))
    err_tt = abs(float(oo.last_grad_norm) / exact - 1)
    err_torch = abs(float(norms[-1]) / exact - 1)
    (a0, a5), (b0, b5) = _min_med(t["turbotune"]), _min_med(t["torch"])
    n = numel(MODELS[model])
    ok = "yes" if worst <= 1e-5 else "NO"
    return (f"| {model} | {a0:.1f} / {a5:.1f} | {b0:.1f} / {b5:.1f} | **{b0 / a0:.2f}x / {b5 / a5:.2f}x** "
            f"| {32 * n / a0 / 1e6:.1f} / {40 * n / b0 / 1e6:.1f} | {worst:.1e} ({ok}) | {err_tt:.1e} / {err_torch:.1e} |")


def paired_schedule(model: str, reps: int) -> str:
    """One Markdown row: the plain fp32 step with the CPU kernel's two work splits (balanced bytes per
    thread, the default; ``TURBOTUNE_CPU_SCHEDULE=chunks``, equal chunk counts as before issue 8) against
    torch's fused AdamW and two bandwidth floors moving 28 B/param (a copy, and an in-place ``add_`` with
    AdamW's read/write mix), interleaved; per-round ratios are torch time / turbotune time within the same
    round (both saw the same load)."""
    from turbotune.bench.suites.optim import MODELS, _params, numel
    from turbotune.optim import AdamW

    ps = _params(MODELS[model], torch.float32, torch.device("cpu"))
    n = numel(MODELS[model])
    ours, theirs = AdamW(ps, lr=1e-4), torch.optim.AdamW(ps, lr=1e-4, fused=True)
    src, dst = torch.ones(7 * n // 2), torch.empty(7 * n // 2)  # copy: 14 B read + 14 B written (+ write-allocate)
    acc, inc = torch.ones(7 * n // 3), torch.ones(7 * n // 3)  # acc += inc: 16 B read + 12 B written, as AdamW

    def with_schedule(value):
        def fn():
            os.environ["TURBOTUNE_CPU_SCHEDULE"] = value
            ours.step()
        return fn

    fns = {"balanced": with_schedule("balanced"), "chunks": with_schedule("chunks"), "torch": theirs.step,
           "copy": lambda: dst.copy_(src), "add_": lambda: acc.add_(inc)}
    for f in fns.values():
        f()
        f()
    rounds = _interleave(fns, reps, keep_order=True)
    os.environ.pop("TURBOTUNE_CPU_SCHEDULE", None)
    t = {k: sorted(v) for k, v in rounds.items()}

    def ratio(k):
        r = sorted(a / b for a, b in zip(rounds["torch"], rounds[k]))
        return f"{r[len(r) // 2]:.3f} ({r[len(r) // 4]:.3f}-{r[3 * len(r) // 4]:.3f})"

    keys = ("balanced", "chunks", "torch", "copy", "add_")
    cells = [f"{_min_med(t[k])[0]:.1f} / {_min_med(t[k])[1]:.1f}" for k in keys]
    gbs = " / ".join(f"{28 * n / t[k][0] / 1e6:.1f}" for k in keys)
    return f"| {model} | " + " | ".join(cells) + f" | {ratio('balanced')} | {ratio('chunks')} | {gbs} |"


def _round_ratio(rounds, num, den) -> str:
    """Median (IQR) over rounds of rounds[num][i] / rounds[den][i] (same round: same machine load)."""
    r = sorted(a / b for a, b in zip(rounds[num], rounds[den]))
    return f"{r[len(r) // 2]:.2f}x ({r[len(r) // 4]:.2f}-{r[3 * len(r) // 4]:.2f})"


def paired_cnn(model: str, reps: int) -> str:
    """One Markdown row: an fp32 step on a ResNet parameter mix whose conv weights (and grads) are
    channels_last, as ``turbotune.optimize(cnn)`` leaves them: turbotune's native kernel, torch's fused AdamW
    and turbotune's reference path (what these params took before the kernels accepted dense layouts), each on
    its own copy of the same params and grads, interleaved; and torch's fused AdamW on contiguous copies (what
    its kernel costs without the layout). After the run turbotune's and torch's weights must agree to 1e-6
    relative (max |a - b| / max |b| over each tensor)."""
    from turbotune.bench.suites.optim import _params, cnn_providers, cnn_shapes, numel

    shapes = cnn_shapes(model)
    n = numel(shapes)
    providers = cnn_providers()
    sets = {name: _params(shapes, torch.float32, torch.device("cpu"), channels_last=True) for name, _, _ in providers}
    fns = {name: make(sets[name]) for name, _, make in providers}
    contiguous = _params(shapes, torch.float32, torch.device("cpu"))
    fns["torch-fused (contiguous)"] = torch.optim.AdamW(contiguous, lr=1e-4, fused=True).step
    for f in fns.values():
        f()
        f()
    rounds = _interleave(fns, reps, keep_order=True)
    worst = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item()
                for p, q in zip(sets["turbotune"], sets["torch-fused"]))
    ok = "yes" if worst <= 1e-6 else "NO"
    cells = [f"{_min_med(sorted(rounds[k]))[0]:.1f} / {_min_med(sorted(rounds[k]))[1]:.1f}" for k in fns]
    return (f"| {model} ({n / 1e6:.1f}M, {len(shapes)} tensors) | " + " | ".join(cells)
            + f" | **{_round_ratio(rounds, 'torch-fused', 'turbotune')}** "
            f"| {_round_ratio(rounds, 'turbotune (reference path)', 'turbotune')} "
            f"| {_round_ratio(rounds, 'torch-fused (contiguous)', 'turbotune')} | {worst:.1e} ({ok}) |")


PAIRED = {
    "--paired": (
        paired, [("minilm-22M", 30), ("bert-base-110M", 15)],
        "| mix | turbotune fp32 min / median ms | torch fused fp32 min / median ms | speed-up min / median "
        "| turbotune bf16+master min / median ms | bf16+master / fp32 time, min / median "
        "| copy of 28 B/param min / median ms | GB/s at min: turbotune / torch / copy |",
    ),
    "--paired-clip": (
        paired_clip, [("minilm-22M", 30), ("bert-base-110M", 20)],
        "| mix | turbotune max_grad_norm min / median ms | torch clip_grad_norm_ + fused min / median ms "
        "| speed-up min / median | GB/s at min (32 / 40 B/param) | weights max rel diff after the run "
        "(<= 1e-5) | norm rel err vs fp64: turbotune / torch |",
    ),
    "--paired-schedule": (
        paired_schedule, [("minilm-22M", 40), ("bert-base-110M", 20)],
        "| mix | turbotune balanced min / median ms | turbotune chunks min / median ms | torch fused min / median ms "
        "| copy 28 B/param min / median ms | add_ 28 B/param min / median ms | torch / balanced per round: median "
        "(IQR) | torch / chunks per round: median (IQR) | GB/s at min: balanced / chunks / torch / copy / add_ |",
    ),
    "--paired-cnn": (
        paired_cnn, [("resnet18-11.7M", 30), ("resnet50-25.6M", 20)],
        "| mix (conv weights channels_last) | torch fused min / median ms | turbotune min / median ms "
        "| turbotune reference path min / median ms | torch fused on contiguous copies min / median ms "
        "| torch / turbotune per round: median (IQR) | reference path / turbotune per round: median (IQR) "
        "| torch on contiguous / turbotune per round: median (IQR) | weights max rel diff vs torch (<= 1e-6) |",
    ),
}

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("TURBOTUNE_BENCH_THREADS", torch.get_num_threads())))
    modes = [m for m in PAIRED if m in sys.argv]
    if not modes:
        main("--full" in sys.argv)
    for mode in modes:
        fn, runs, header = PAIRED[mode]
        if CLOCK == "thread" and torch.get_num_threads() != 1:
            raise SystemExit("TURBOTUNE_BENCH_CLOCK=thread needs one thread: OMP_NUM_THREADS=1 TURBOTUNE_BENCH_THREADS=1")
        print(f"{mode}: torch {torch.__version__}, {torch.get_num_threads()} threads, {CLOCK} clock, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        for model, reps in runs:
            print(fn(model, reps), flush=True)
            gc.collect()  # the previous mix's params and optimizer state are gone before the next one
