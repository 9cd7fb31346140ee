"""CNN benchmarks: the fused BatchNorm + ReLU (+ add) op and ResNet-18 / ResNet-50
training steps and inference against stock PyTorch (the ``cnn`` suite of
``turbotune bench``).

    pytest benchmarks/bench_cnn.py --benchmark-only [--quick]     # the suite's cases

Run as a script for interleaved (paired) rounds, robust on a shared machine:
every round times each provider once, in turn, and the report gives the median
time per provider and the median of the per-round ratios ``torch / provider``:

    python benchmarks/bench_cnn.py --paired                       # ResNet-18 fp32 inference, batch 32, 224x224
    python benchmarks/bench_cnn.py --paired --mode train --arch resnet50 --res 160
    python benchmarks/bench_cnn.py --paired --dtype bf16 --mode train
    python benchmarks/bench_cnn.py --bn                           # fused BN+add+ReLU vs torch, paired
    python benchmarks/bench_cnn.py --goals                        # the issue's goals (GPU: bf16 op and train step)
"""
import argparse
import statistics
import sys
import time

import torch

SUITE = "cnn"


def test_cnn(benchmark, case):
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline)

    def run():
        case.fn()
        if case.device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3 if case.op.startswith("resnet") else 20, warmup_rounds=1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired(fns, device, rounds, warmup=1):
    """``{name: [seconds per round]}``: each round calls every fn once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def report(title, times, baseline="torch", unit=None, items=None):
    base = times[baseline]
    lines = [f"### {title}", "", "| provider | median ms | min ms | median of per-round ratios (torch / provider) |"
             + (f" {unit}/s |" if unit else ""), "|---|---|---|---|" + ("---|" if unit else "")]
    for k, v in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, v))
        med = statistics.median(v)
        row = f"| {k} | {med * 1e3:.1f} | {min(v) * 1e3:.1f} | {'baseline' if k == baseline else f'{ratio:.2f}x'} |"
        if unit:
            row += f" {items / med:.1f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv=None):
    from turbotune.bench import grad_modes
    from turbotune.bench.suites.cnn import bn_providers, paired_models

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paired", action="store_true", help="interleaved rounds of the model providers")
    p.add_argument("--bn", action="store_true", help="interleaved rounds of the fused op vs torch")
    p.add_argument("--goals", action="store_true", help="check the issue's goals on this device")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--mode", default="infer", choices=["infer", "train"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--providers", default="torch,torch channels_last,turbotune",
                   help="comma-separated: torch, torch channels_last, torch.compile, turbotune")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {a.rounds} paired rounds\n")
    if a.paired:
        fns = paired_models(a.arch, a.mode, dtype, device, a.batch, a.res, tuple(a.providers.split(",")))
        times = paired(fns, device, a.rounds)
        print(report(f"{a.arch} {a.mode}, batch {a.batch}, {a.res}x{a.res}, {a.dtype}", times, unit="images",
                     items=a.batch))
    if a.bn or a.goals:
        shape = (64, 256, 56, 56) if device.type == "cuda" else (32, 64, 56, 56)
        bdt = torch.bfloat16 if device.type == "cuda" else torch.float32
        provs = bn_providers(shape, bdt, device)
        for mode in ("fwd", "fwd+bwd"):
            fns = {k: grad_modes(f, leaves, modes=(mode,))[mode] for k, (f, leaves) in provs.items()}
            times = paired(fns, device, max(a.rounds, 20) if device.type == "cuda" else a.rounds)
            print(report(f"bn+add+relu {mode}, {'x'.join(map(str, shape))} channels_last, {_dn(bdt)}", times))
            if a.goals and device.type == "cuda":
                r = statistics.median(b / t for b, t in zip(times["torch"], times["turbotune"]))
                print(f"GOAL fused BN+add+ReLU {mode} >= 2x torch: {r:.2f}x {'PASS' if r >= 2 else 'FAIL'}\n")
    if a.goals:
        if device.type == "cuda":
            for arch in ("resnet18", "resnet50"):
                fns = paired_models(arch, "train", torch.bfloat16, device, 64, 224)
                times = paired(fns, device, 10)
                print(report(f"{arch} train step, batch 64, 224x224, bf16 autocast", times, unit="images", items=64))
                r = statistics.median(b / t for b, t in zip(times["torch"], times["turbotune"]))
                print(f"GOAL {arch} bf16 train step >= 1.2x stock eager: {r:.2f}x {'PASS' if r >= 1.2 else 'FAIL'}\n")
        else:
            fns = paired_models("resnet18", "infer", torch.float32, device, 32, 224, ("torch", "turbotune"))
            times = paired(fns, device, a.rounds)
            print(report("resnet18 infer, batch 32, 224x224, fp32", times, unit="images", items=32))
            r = statistics.median(b / t for b, t in zip(times["torch"], times["turbotune"]))
            print(f"GOAL CPU fp32 ResNet-18 inference >= 1.6x stock eager: {r:.2f}x {'PASS' if r >= 1.6 else 'FAIL'}")
    return 0


def _dn(dtype):
    return str(dtype).replace("torch.", "")


if __name__ == "__main__":
    sys.exit(main())
