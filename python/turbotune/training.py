"""The fine-tuning machinery shared by every task: one training loop, metrics, atomic checkpoints, bf16
detection, data-parallel launch and the run report.

The loop is written once (:class:`Trainer`) and runs every *recipe* (:class:`Recipe`): turbotune's and
the stock one a PyTorch / Hugging Face user writes. The differences are injected, never copied:

=================  ==========================================  ===========================================
                   ``turbotune``                               ``stock`` / ``stock+bf16``
=================  ==========================================  ===========================================
tokenizer          ``turbotune.tokenizers.BertTokenizer``      transformers' ``AutoTokenizer``
model              ``turbotune.optimize(model, dtype=...)``    unchanged (fp32; ``stock+bf16`` under
                                                               ``torch.autocast(bfloat16)``)
optimizer          ``turbotune.optim.AdamW`` + clipping        ``torch.optim.AdamW(fused=True)`` +
                                                               ``torch.nn.utils.clip_grad_norm_``
=================  ==========================================  ===========================================

Everything else (batches, order, learning-rate schedule, loss, evaluation) is the same code.

Distributed data parallel: the *global* batch of each step is split across the processes
(``batch[rank::world]``); each process's loss is ``sum of its example losses * world / global batch
size``, so DDP's gradient average is exactly the mean over the global batch and ``N`` processes give
the weights one process gives (tested). Launch: :func:`launch` (torchrun's elastic agent, gloo on CPU,
nccl on GPU), or ``torchrun ... -m turbotune finetune`` for several machines.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .backend import bf16_support

__all__ = [
    "FinetuneError", "DataError", "ModelDirError", "OutOfMemory",
    "bf16_support", "resolve_dtype", "Recipe", "RECIPES", "Dist", "dist_from_env", "init_distributed",
    "plan_batches", "shard", "classification_metrics", "Trainer", "EpochLog", "RunResult",
    "atomic_dir", "atomic_file", "atomic_write_text", "recover_dir", "check_output_dir", "launch", "peak_memory", "apply_optimize",
]


# ----------------------------------------------------------------------------- errors

class FinetuneError(RuntimeError):
    """A fine-tuning run cannot go on; the message says why and what to do."""


class DataError(ValueError):
    """The training / evaluation data is unusable (missing column, empty, one class, bad label, ...)."""


class ModelDirError(ValueError):
    """The model directory is not a usable checkpoint (no config.json, unsupported architecture, ...)."""


class OutOfMemory(FinetuneError):
    """The device ran out of memory; the message suggests a smaller batch or bf16."""


def oom_error(exc: BaseException, batch_size: int, dtype: torch.dtype, device: torch.device) -> OutOfMemory:
    hint = f"try a smaller --batch-size (now {batch_size})"
    if dtype != torch.bfloat16:
        hint += " or --dtype bfloat16"
    return OutOfMemory(f"{device.type.upper()} out of memory while training: {hint} "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")


# ----------------------------------------------------------------------------- hardware / precision

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: Any, device: torch.device) -> Tuple[torch.dtype, str]:
    """``"auto"`` -> bf16 where :func:`bf16_support` says it is fast, else fp32; or an explicit dtype."""
    if dtype is None or dtype == "auto":
        ok, why = bf16_support(device)
        return (torch.bfloat16 if ok else torch.float32), f"auto: {why}"
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype: expected float32, bfloat16 or 'auto', got {dtype}")
        return dtype, "requested"
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()], "requested"
    raise ValueError(f"dtype: expected 'auto', 'float32' or 'bfloat16', got {dtype!r}")


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "none" if dtype is None else str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- recipes

@dataclass(frozen=True)
class Recipe:
    """What differs between turbotune's recipe and the stock one (everything else is shared code).

    ``tokenizer``: ``"turbotune"`` or ``"hf"``; ``optimize``: call :func:`turbotune.optimize`;
    ``optimizer``: ``"turbotune"`` (turbotune AdamW + fused clipping) or ``"torch"``
    (``torch.optim.AdamW(fused=True)`` + ``torch.nn.utils.clip_grad_norm_``); ``autocast``: run the
    forward under ``torch.autocast(dtype)`` (``None``: the model's own precision).
    """

    name: str
    description: str
    tokenizer: str
    optimize: bool
    optimizer: str
    autocast: Optional[torch.dtype] = None

    def make_optimizer(self, param_groups: List[dict], lr: float, device: torch.device,
                       max_grad_norm: Optional[float] = None) -> torch.optim.Optimizer:
        """The recipe's AdamW. turbotune's clips inside its step (``AdamW(max_grad_norm=...)``: one pass over
        the gradients for the norm, the clip coefficient folded into the update)."""
        if self.optimizer == "turbotune":
            from .optim import AdamW

            return AdamW(param_groups, lr=lr, max_grad_norm=max_grad_norm or None)
        kw = {"fused": True} if device.type in ("cpu", "cuda") else {}
        return torch.optim.AdamW(param_groups, lr=lr, **kw)

    def clip_and_step(self, optimizer: torch.optim.Optimizer, params: List[torch.Tensor],
                      max_grad_norm: Optional[float]) -> Optional[torch.Tensor]:
        """Clip the gradients to ``max_grad_norm`` (global L2) and step; returns the norm before clipping.

        The only place where the recipes' clipping differs: turbotune's AdamW (made by :meth:`make_optimizer`
        with ``max_grad_norm``) clips inside ``step()`` and reports the norm as ``last_grad_norm``; the stock
        recipe calls ``torch.nn.utils.clip_grad_norm_`` first.
        """
        if self.optimizer == "turbotune":
            optimizer.step()
            return optimizer.last_grad_norm if max_grad_norm else None
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
        optimizer.step()
        return norm


RECIPES: Dict[str, Recipe] = {
    "turbotune": Recipe("turbotune", "turbotune tokenizer + optimize() + turbotune AdamW", "turbotune", True,
                        "turbotune"),
    "stock": Recipe("stock", "HF tokenizer (pad to longest) + stock fp32 model + torch AdamW(fused)", "hf", False,
                    "torch"),
    "stock+bf16": Recipe("stock+bf16", "stock under torch.autocast(bfloat16)", "hf", False, "torch",
                         autocast=torch.bfloat16),
}


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """The process's place in a torchrun / elastic launch (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op for one process."""
    d = dist_from_env()
    if d.world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    return d


def _all_reduce_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        torch.distributed.all_reduce(t)
    return t


def _barrier(d: Dist) -> None:
    if d.world > 1:
        torch.distributed.barrier()


def plan_batches(n: int, batch_size: int, *, seed: int, epoch: int, lengths: Optional[Sequence[int]] = None,
                 group_by_length: bool = False, min_size: int = 1) -> List[List[int]]:
    """The *global* batches of one epoch: a seeded shuffle of ``range(n)`` cut into ``batch_size`` pieces.

    ``group_by_length`` (needs ``lengths``): sort each window of 50 batches by length, then shuffle
    the batches (transformers' ``group_by_length``), so a batch pads little. The last batch is
    dropped if it has fewer than ``min_size`` items (the world size: every process needs one).
    Identical in every process (it depends on ``seed`` and ``epoch`` only).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    if group_by_length:
        if lengths is None:
            raise ValueError("group_by_length needs lengths")
        window = batch_size * 50
        grouped = []
        for s in range(0, n, window):
            grouped.extend(sorted(order[s:s + window], key=lambda i: -lengths[i]))
        batches = [grouped[i:i + batch_size] for i in range(0, n, batch_size)]
        rng.shuffle(batches)
    else:
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= min_size]


def shard(batch: Sequence[int], d: Dist) -> List[int]:
    """This process's part of a global batch (strided, so sizes differ by at most one)."""
    return list(batch[d.rank::d.world])


# ----------------------------------------------------------------------------- metrics

def classification_metrics(confusion: torch.Tensor, loss_sum: float = float("nan")) -> Dict[str, float]:
    """Accuracy, macro-F1 (over the classes that occur in the labels or the predictions) and mean loss.

    ``confusion``: ``(C, C)`` int64, ``confusion[true, predicted]``.
    """
    c = confusion.to(torch.float64)
    n = float(c.sum())
    tp = c.diag()
    support, predicted = c.sum(1), c.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else float("nan"),
        "loss": loss_sum / n if n else float("nan"),
        "examples": int(n),
    }


# ----------------------------------------------------------------------------- the loop

def apply_optimize(model: torch.nn.Module, dtype: torch.dtype):
    """``turbotune.optimize(model, dtype=...)`` for training or inference.

    Returns ``(handle, autocast dtype or None, notes)``. When no model path takes the model (it
    then runs stock) and bf16 was asked for, the forward runs under ``torch.autocast(bfloat16)``
    instead, so the requested precision holds either way.
    """
    from .models import optimize

    notes: List[str] = []
    opts = {"dtype": dtype} if dtype != torch.float32 else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = optimize(model, **opts)
    for w in caught:
        if "no model path recognises" in str(w.message):
            notes.append(f"turbotune.optimize(): no model path for {type(model).__name__} yet, it runs stock")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    autocast = torch.bfloat16 if dtype == torch.bfloat16 and handle.kind == "none" else None
    return handle, autocast, notes


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_seconds: float
    samples: int
    samples_per_s: float
    eval_seconds: float
    validation: Dict[str, float]
    improved: bool = False
    real_tokens: int = 0
    padded_tokens: int = 0


Collate = Callable[[List[int]], Tuple[Dict[str, torch.Tensor], torch.Tensor, int]]


def _weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Decay every matrix, not biases or LayerNorm / norm weights (transformers' convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak learning rate over ``warmup_steps``, then linear decay to 0."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """One model trained with one :class:`Recipe`.

    Args:
        model: the task's model (``forward(model, inputs) -> logits (B, C)``).
        recipe: see :class:`Recipe`.
        collate: ``collate(indices) -> (inputs, labels int64 (b,), real_tokens)`` for training
            examples ``indices`` (tokenization happens here, inside the timed step, as in a
            user's loop).
        forward: ``forward(model, inputs) -> logits``.
        dtype: ``torch.float32`` or ``torch.bfloat16`` (the turbotune recipe's precision; a stock
            recipe's precision is its ``autocast``).
        lr, weight_decay, max_grad_norm, warmup_steps, total_steps: the optimization recipe.
        device, dist: where it runs.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe, *, collate: Collate,
                 forward: Callable[[torch.nn.Module, Dict[str, torch.Tensor]], torch.Tensor],
                 dtype: torch.dtype = torch.float32, lr: float = 5e-5, weight_decay: float = 0.01,
                 max_grad_norm: Optional[float] = 1.0, warmup_steps: int = 0, total_steps: int = 1,
                 device: torch.device = torch.device("cpu"), dist: Dist = Dist()):
        self.recipe, self.collate, self.forward_fn = recipe, collate, forward
        self.device, self.dist, self.max_grad_norm = torch.device(device), dist, max_grad_norm
        self.notes: List[str] = []
        model.to(self.device)
        self.autocast = recipe.autocast
        self.handle = None
        if recipe.optimize:
            self.handle, self.autocast, notes = apply_optimize(model, dtype)
            self.notes += notes
        self.module = model
        if dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = recipe.make_optimizer(_weight_decay_groups(self.module, weight_decay), lr, self.device,
                                               max_grad_norm)
        self.scheduler = linear_schedule(self.optimizer, warmup_steps, total_steps)
        self.steps = 0
        self.real_tokens = 0  # summed over this process's steps
        self.padded_tokens = 0  # the tokens the padded batches hold (what a padded model computes)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # -- one optimization step ------------------------------------------------------------------
    def step(self, local: List[int], global_count: int) -> Tuple[torch.Tensor, int, int]:
        """Forward, backward, clip, AdamW step and schedule on this process's ``local`` examples.

        Returns ``(sum of the local example losses (0-dim, detached), local examples, real tokens)``.
        """
        self.model.train()
        inputs, labels, tokens = self.collate(local)
        self.real_tokens += tokens
        self.padded_tokens += inputs["input_ids"].numel() if "input_ids" in inputs else tokens
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        labels = labels.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.forward_fn(self.model, inputs)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        (loss_sum * (self.dist.world / global_count)).backward()
        self.recipe.clip_and_step(self.optimizer, self.params, self.max_grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return loss_sum.detach(), len(local), tokens

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, collate: Collate, n: int, num_labels: int, batch_size: int,
                 lengths: Optional[Sequence[int]] = None) -> Dict[str, float]:
        """Accuracy / macro-F1 / loss over ``n`` examples (sharded over the processes, summed)."""
        was_training = self.module.training
        self.module.eval()
        mine = list(range(self.dist.rank, n, self.dist.world))
        if lengths is not None:  # fewer pad tokens; the order does not change the result
            mine.sort(key=lambda i: lengths[i])
        confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64)
        loss = torch.zeros((), dtype=torch.float64)
        for s in range(0, len(mine), batch_size):
            inputs, labels, _ = collate(mine[s:s + batch_size])
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with self._autocast():
                logits = self.forward_fn(self.module, inputs).float().cpu()
            loss += F.cross_entropy(logits, labels, reduction="sum").double()
            pred = logits.argmax(-1)
            confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        stats = torch.cat([confusion.flatten().double(), loss.view(1)])
        if self.dist.world > 1:
            stats = _all_reduce_(stats.to(self.device), self.dist).cpu()
        confusion = stats[:-1].round().long().view(num_labels, num_labels)
        self.module.train(was_training)
        return classification_metrics(confusion, float(stats[-1]))

    # -- the whole run ---------------------------------------------------------------------------
    def fit(self, *, n_train: int, batch_size: int, epochs: int, seed: int, evaluate: Callable[[], Dict[str, float]],
            lengths: Optional[Sequence[int]] = None, group_by_length: bool = False, patience: Optional[int] = None,
            metric: str = "accuracy", on_improve: Optional[Callable[[int, Dict[str, float]], None]] = None,
            progress: bool = True, desc: str = "train") -> List[EpochLog]:
        """Train for ``epochs`` epochs, evaluating after each; ``on_improve(epoch, metrics)`` runs when
        the validation ``metric`` improves; stops early after ``patience`` epochs without improvement."""
        history: List[EpochLog] = []
        best, bad = -math.inf, 0
        show = progress and self.dist.main
        for epoch in range(1, epochs + 1):
            batches = plan_batches(n_train, batch_size, seed=seed, epoch=epoch, lengths=lengths,
                                   group_by_length=group_by_length, min_size=self.dist.world)
            bar = _bar(sum(len(b) for b in batches), f"{desc} epoch {epoch}/{epochs}", show)
            loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # no host sync per step
            seen = 0
            tokens0 = (self.real_tokens, self.padded_tokens)
            t0 = time.perf_counter()
            try:
                for i, batch in enumerate(batches):
                    loss, count, _ = self.step(shard(batch, self.dist), len(batch))
                    loss_total += loss.double()
                    seen += count
                    bar.update(len(batch))
                    if show and (i % 10 == 0 or i == len(batches) - 1):
                        bar.set_postfix_str(f"loss {float(loss_total) / max(seen, 1):.4f} "
                                            f"lr {self.scheduler.get_last_lr()[0]:.2e}")
            finally:
                bar.close()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_s = time.perf_counter() - t0
            stats = _all_reduce_(torch.tensor([float(loss_total), float(seen), self.real_tokens - tokens0[0],
                                               self.padded_tokens - tokens0[1]], dtype=torch.float64,
                                              device=self.device), self.dist).cpu()  # nccl needs CUDA tensors
            t1 = time.perf_counter()
            metrics = evaluate()
            eval_s = time.perf_counter() - t1
            log = EpochLog(epoch, float(stats[0] / max(stats[1], 1)), train_s, int(stats[1]),
                           float(stats[1]) / max(train_s, 1e-9), eval_s, metrics, real_tokens=int(stats[2]),
                           padded_tokens=int(stats[3]))
            if metrics[metric] > best:
                best, bad, log.improved = metrics[metric], 0, True
                if on_improve is not None:
                    on_improve(epoch, metrics)
            else:
                bad += 1
            history.append(log)
            if show:
                print(f"{desc} epoch {epoch}: loss {log.train_loss:.4f}, validation accuracy "
                      f"{metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
                      f"{log.samples_per_s:.1f} samples/s" + (" (best)" if log.improved else ""),
                      file=sys.stderr, flush=True)
            if patience is not None and bad >= patience:
                if show:
                    print(f"{desc}: early stop, no improvement for {bad} epoch(s)", file=sys.stderr, flush=True)
                break
        return history


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="samples", unit_scale=True, leave=False,
                dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------- results

@dataclass
class RunResult:
    """What one recipe's run measured (picklable: it crosses process boundaries)."""

    recipe: str
    description: str
    dtype: str
    world: int
    epochs_run: int
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    samples_per_s: float
    peak_memory_bytes: int
    peak_memory_kind: str
    test: Dict[str, float]
    validation: Dict[str, float]
    history: List[Dict[str, Any]] = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0
    notes: List[str] = field(default_factory=list)
    skipped: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def peak_memory(device: torch.device) -> Tuple[int, str]:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, peak RSS on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss * (1 if sys.platform == "darwin" else 1024)), "peak RSS"
    except Exception:  # pragma: no cover - non-POSIX
        return 0, "unknown"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (columns aligned, first column left, others right)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def human_seconds(s: float) -> str:
    if s != s:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {s % 60:04.1f} s"


# ----------------------------------------------------------------------------- atomic files

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a text file that becomes ``path`` (``os.replace``) only when the block completes; on an
    exception the temporary file is removed and ``path`` keeps its previous content (or stays absent)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _old_name(final: str) -> str:
    parent, base = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{base}.old")


def recover_dir(final: str) -> None:
    """Finish a directory replacement that died between its two renames (fallback path only)."""
    old = _old_name(final)
    if os.path.isdir(old):
        if not os.path.exists(final):
            os.rename(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _replace_dir(src: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(src, final)
        return
    if _renameat2_exchange(src, final):  # src now holds the previous version
        shutil.rmtree(src, ignore_errors=True)
        return
    old = _old_name(final)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)  # a crash here leaves the previous version at `old`: recover_dir() restores it
    os.rename(src, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a fresh temporary directory next to ``final``; on success it replaces ``final`` atomically.

    If the body raises (or the process dies), ``final`` is untouched: the previous version stays
    complete and readable, and the temporary directory is removed (or left as a hidden
    ``.<name>.tmp-*`` sibling after a hard kill, which the next save removes).
    """
    final = os.path.abspath(final)
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    recover_dir(final)
    for stale in os.listdir(parent):
        if stale.startswith(f".{base}.tmp-"):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield tmp
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


MARKER = "metrics.json"


def check_output_dir(path: str) -> None:
    """Refuse to replace a directory that is not a previous turbotune checkpoint (it would be deleted)."""
    path = os.path.abspath(path)
    recover_dir(path)
    if os.path.isfile(path):
        raise FinetuneError(f"--output {path}: is a file; expected a directory to hold the checkpoint")
    if os.path.isdir(path) and os.listdir(path):
        marker = os.path.join(path, MARKER)
        ok = False
        if os.path.isfile(marker):
            with contextlib.suppress(Exception):
                with open(marker, encoding="utf-8") as f:
                    ok = "turbotune" in json.load(f)
        if not ok:
            raise FinetuneError(f"--output {path}: exists and is not a turbotune checkpoint (no {MARKER} written "
                                "by turbotune); it would be replaced, so choose a new or empty directory")


# ----------------------------------------------------------------------------- launching processes

def _worker(target: str, kwargs: Dict[str, Any], threads: Optional[int]):
    """Entry point of each launched process: run ``module:function(**kwargs)``; errors come back as values."""
    import importlib

    if threads:
        torch.set_num_threads(threads)
    mod, fn = target.split(":")
    try:
        return ("ok", getattr(importlib.import_module(mod), fn)(**kwargs))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises
        import traceback

        return ("error", type(exc).__name__, str(exc), traceback.format_exc())
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


_ERRORS = {c.__name__: c for c in (FinetuneError, DataError, ModelDirError, OutOfMemory, ValueError, TypeError,
                                    FileNotFoundError)}


def launch(target: str, kwargs: Dict[str, Any], nproc: int, *, threads: Optional[int] = None) -> Any:
    """Run ``target`` (``"module:function"``) in ``nproc`` fresh processes with torchrun's machinery
    (``torch.distributed.launcher.elastic_launch``: a local rendezvous, ``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_RANK`` set as torchrun sets them) and return rank 0's result (with ``peak`` results of
    all ranks available through it). An exception in a worker is re-raised here with its message.
    """
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"nproc: expected >= 1, got {nproc}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"turbotune-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # elastic agents otherwise force 1 thread per process
    try:
        out = elastic_launch(config, _worker)(target, kwargs, threads)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    results = [out[r] for r in sorted(out)]
    for r in results:
        if r[0] == "error":
            cls = _ERRORS.get(r[1])
            if cls is None:
                raise FinetuneError(f"a worker process failed: {r[1]}: {r[2]}\n{r[3]}")
            raise cls(r[2])
    return [r[1] for r in results]
