"""AdamW under DistributedDataParallel: 2 processes, gloo, localhost only, bounded in time."""
import multiprocessing as mp
import os
import socket
import traceback

import torch

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 4))


def _data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(6, 16, 12, generator=g), torch.randn(6, 16, 4, generator=g)


def _train(model, opt, batches):
    xs, ys = batches
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank, world, port, out_dir):
    try:
        import datetime

        import torch.distributed as dist

        from turbotune.optim import AdamW

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        xs, ys = _data()
        shard = (xs[:, rank * 8 : (rank + 1) * 8], ys[:, rank * 8 : (rank + 1) * 8])
        _train(model, opt, shard)
        torch.save([p.detach() for p in model.module.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_ddp_two_ranks_identical_and_match_single_process(tmp_path):
    from turbotune.optim import AdamW

    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    errors = [f.read_text() for f in tmp_path.glob("*.err")]
    assert not alive, f"DDP workers did not finish in {TIMEOUT_S}s"
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)

    # single process, full batch: DDP averages the two half-batch gradients = the full-batch gradient
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    _train(model, opt, _data())
    for a, b in zip(r0, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(r0, _model().parameters()))
    assert moved > 1e-3
