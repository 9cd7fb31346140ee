"""Padding-free execution of a BERT-layout encoder on packed tokens.

Everything here works on *packed* activations: the real tokens of a padded
``(B, L)`` batch, concatenated in row-major order into ``(T, hidden)`` with
``T = attention_mask.sum()``. A :class:`Pack` holds the bookkeeping, built
once per forward from the attention mask, before the embeddings:

- ``indices`` ``(T,)`` int64: the flat positions ``b * L + j`` of the real tokens;
- ``cu_seqlens`` ``(B + 1,)`` int32 and ``max_seqlen``: what varlen attention takes;
- on CPU also the lengths as a Python list (no device sync to read them).

Only the caller-visible outputs are re-padded (:func:`repad`).

Three small local functions are the single places where an op is chosen, so a
faster implementation slots in without touching the model code:

- :func:`packed_attention`: varlen attention (``turbotune.ops.attention_varlen``;
  length-bucketed SDPA only on CPU without dropout when attention's CPU backend
  is ATen's, see its docstring);
- :func:`bias_gelu`: ``GELU(x @ W^T + b)``;
- :func:`cross_entropy`: the heads' loss.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import backend
from ...ops import attention_varlen, layer_norm, linear_gelu
from ...ops import cross_entropy as ops_cross_entropy

__all__ = [
    "Pack",
    "make_pack",
    "sub_pack",
    "repad",
    "packed_attention",
    "bias_gelu",
    "cross_entropy",
    "embed",
    "layer_forward",
    "run_encoder",
]


# ----------------------------------------------------------------------------- packing


class Pack:
    """Bookkeeping of one packed batch (see the module docstring).

    Attributes:
        indices: ``(T,)`` int64 flat positions of the rows in the padded ``(B, L)`` grid.
        cu_seqlens: ``(B + 1,)`` int32 cumulative lengths (starts at 0).
        max_seqlen: longest sequence (int).
        batch, seqlen: the padded shape ``(B, L)``.
        lens: per-sequence lengths as a Python list (None when unknown on the host).
        total: ``T``.
    """

    __slots__ = ("indices", "cu_seqlens", "max_seqlen", "batch", "seqlen", "lens", "total", "_buckets")
    # _buckets: {id(query pack): (query pack, _Plan)} cached for the CPU SDPA path

    def __init__(self, indices: Tensor, cu_seqlens: Tensor, max_seqlen: int, batch: int, seqlen: int,
                 lens: Optional[List[int]], total: int):
        self.indices = indices
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.batch = batch
        self.seqlen = seqlen
        self.lens = lens
        self.total = total
        self._buckets = {}

    def starts(self) -> Tensor:
        """``(B,)`` int64: the packed row of each sequence's first real token."""
        return self.cu_seqlens[:-1].to(torch.int64)


def check_mask(attention_mask: Tensor, batch: int, seqlen: int, device: torch.device) -> Tensor:
    """Validate a ``(B, L)`` padding mask; returns it as bool. Raises ``ValueError``/``TypeError``."""
    m = attention_mask
    if m.dim() != 2 or tuple(m.shape) != (batch, seqlen):
        raise ValueError(f"turbotune.optimize: attention_mask must have shape (batch, seq_len) = ({batch}, {seqlen}) "
                         f"like input_ids, got {tuple(m.shape)}")
    if m.is_complex():
        raise TypeError(f"turbotune.optimize: attention_mask must be bool or 0/1 numbers, got dtype {m.dtype}")
    if m.device != device:
        raise ValueError(f"turbotune.optimize: attention_mask is on {m.device} but the inputs are on {device}")
    return m


def make_pack(mask: Optional[Tensor], batch: int, seqlen: int, device: torch.device) -> Tuple[Pack, bool]:
    """Pack bookkeeping from a validated ``(B, L)`` mask (None = every token real).

    Returns ``(pack, right_padded)``; ``right_padded`` says every row starts with
    a real token (column 0), as stock BERT's pooler assumes.

    Raises:
        ValueError: the mask holds values other than 0/1, or a row has no real token.

    One host read of ``B + 2`` integers (lengths and two flags); on CUDA the
    token indices are found without a second sync.
    """
    if mask is None:
        lens_t = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        indices = torch.arange(batch * seqlen, dtype=torch.int64, device=device)
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        if batch > 0 and seqlen == 0:
            raise ValueError("turbotune.optimize: the batch has sequences of length 0")
        lens = [seqlen] * batch if device.type == "cpu" else None
        return Pack(indices, cu, seqlen, batch, seqlen, lens, batch * seqlen), True
    if mask.dtype == torch.bool:
        bmask = mask
        bad = None
    else:
        bmask = mask != 0
        bad = ((mask != 0) & (mask != 1)).sum().reshape(1).to(torch.int64)
    lens_t = bmask.sum(dim=1, dtype=torch.int32)
    stats = [lens_t.to(torch.int64), bmask[:, 0].all().reshape(1).to(torch.int64) if seqlen > 0
             else torch.ones(1, dtype=torch.int64, device=device)]
    if bad is not None:
        stats.append(bad)
    host = torch.cat(stats).tolist()  # the one host sync
    lens, right = host[:batch], bool(host[batch])
    if bad is not None and host[batch + 1]:
        raise ValueError(f"turbotune.optimize: attention_mask must hold only 0 and 1 (or bool), found "
                         f"{host[batch + 1]} other value(s)")
    empty = [i for i, n in enumerate(lens) if n == 0]
    if empty:
        raise ValueError(f"turbotune.optimize: attention_mask row(s) {empty[:8]}{'...' if len(empty) > 8 else ''} "
                         f"have no real token; every sequence needs at least one (e.g. [CLS])")
    total = sum(lens)
    flat = bmask.reshape(-1)
    if device.type == "cuda":
        # stable sort puts the real positions first in order: no second sync (nonzero would sync)
        indices = torch.argsort((~flat).to(torch.int8), stable=True)[:total]
    else:
        indices = torch.nonzero(flat).reshape(-1)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lens_t, 0, dtype=torch.int32)
    return Pack(indices, cu, max(lens) if lens else 0, batch, seqlen, lens, total), right


def sub_pack(pack: Pack, rows_per_seq: Sequence[int], cu_seqlens: Tensor) -> Pack:
    """A pack of *query* rows (a subset of ``pack``'s rows: ``rows_per_seq[b]`` of sequence ``b``)."""
    lens = list(rows_per_seq)
    return Pack(torch.empty(0, dtype=torch.int64, device=pack.indices.device), cu_seqlens,
                max(lens) if lens else 0, pack.batch, pack.seqlen, lens, sum(lens))


def repad(packed: Tensor, pack: Pack, fill: float = 0.0) -> Tensor:
    """``(T, ...)`` packed rows -> ``(B, L, ...)`` with ``fill`` at padding (differentiable)."""
    out = packed.new_full((pack.batch * pack.seqlen, *packed.shape[1:]), fill)
    out = out.index_copy(0, pack.indices, packed)
    return out.view(pack.batch, pack.seqlen, *packed.shape[1:])


def gather_rows(t: Tensor, pack: Pack) -> Tensor:
    """``(B, L, ...)`` -> ``(T, ...)``: the real positions of a padded tensor."""
    return t.reshape(pack.batch * pack.seqlen, *t.shape[2:]).index_select(0, pack.indices)


# ----------------------------------------------------------------------------- op hooks


def bias_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """``GELU(x @ weight.T + bias)``: ``x`` ``(N, in)``, ``weight`` ``(out, in)``, ``bias`` ``(out,)``
    -> ``(N, out)`` in ``x``'s dtype. ``approximate``: ``"none"`` (exact erf, BERT) or ``"tanh"``.

    The single place the intermediate projection + activation runs: :func:`turbotune.ops.linear_gelu`
    (on a GPU the bias and GELU run in one Triton kernel, forward and backward; elsewhere stock
    ``F.gelu(F.linear(...))``, where ATen's ``addmm`` already folds the bias)."""
    return linear_gelu(x, weight, bias, approximate)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over the targets that are not ``ignore_index`` (``torch.nn.CrossEntropyLoss``).

    ``logits`` ``(N, C)`` any float dtype (fp16/bf16 are upcast to fp32); ``target`` ``(N,)``
    int64. Returns a 0-d fp32 (or fp64) tensor. The single place the heads' loss runs:
    :func:`turbotune.ops.cross_entropy` (Triton on a GPU, ATen elsewhere)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return ops_cross_entropy(logits, target, ignore_index=ignore_index)


# ----------------------------------------------------------------------------- attention


class _Plan:
    """Host-built plan of length-bucketed SDPA for one (query pack, key pack) pair.

    Sequences are sorted by key length and cut into contiguous groups (see
    :func:`_split_groups`); group ``g`` holds ``n`` sequences padded to ``lq``
    queries and ``lk`` keys. ``kslots`` / ``qslots`` list, group after group, the
    packed row that fills each padded slot (padding slots repeat a real row of
    the same sequence: padded keys are masked, padded queries discarded).
    ``out_idx`` picks, for every packed query row and head, its output in the
    concatenation of the groups' ``(n, lq, H, D)`` outputs.
    """

    __slots__ = ("groups", "kslots", "qslots", "ksizes", "qsizes", "out_idx", "heads")

    def __init__(self, q_pack: "Pack", k_pack: "Pack", heads: int, device: torch.device):
        qlens, klens = q_pack.lens, k_pack.lens
        nseq = len(klens)
        order = sorted(range(nseq), key=lambda i: klens[i])
        cuts = _split_groups([klens[i] for i in order], [qlens[i] for i in order])
        qstart, kstart = [0] * (nseq + 1), [0] * (nseq + 1)
        for i in range(nseq):
            qstart[i + 1] = qstart[i] + qlens[i]
            kstart[i + 1] = kstart[i] + klens[i]
        groups, kslots, qslots, out_base = [], [], [], [0] * qstart[nseq]
        flat = 0  # rows of (n, lq, H) outputs before this group
        for lo, hi in cuts:
            seqs = order[lo:hi]
            n = len(seqs)
            lk = max(klens[i] for i in seqs)
            lq = max(qlens[i] for i in seqs)
            if lq == 0:
                continue
            for j, i in enumerate(seqs):
                ks, kl, qs, ql = kstart[i], klens[i], qstart[i], qlens[i]
                kslots.extend(range(ks, ks + kl))
                kslots.extend([ks] * (lk - kl))
                qslots.extend(range(qs, qs + ql))
                qslots.extend([qs if ql else 0] * (lq - ql))
                for r in range(ql):
                    out_base[qs + r] = flat + (j * lq + r) * heads
            glens = torch.tensor([klens[i] for i in seqs], dtype=torch.int64)
            mask = None
            if int(glens.min()) != lk:
                mask = (torch.arange(lk).view(1, lk) < glens.view(n, 1)).view(n, 1, 1, lk).to(device)
            groups.append((n, lq, lk, mask))
            flat += n * lq * heads
        self.groups = groups
        self.heads = heads
        self.ksizes = [n * lk for n, _, lk, _ in groups]
        self.qsizes = [n * lq for n, lq, _, _ in groups]
        self.kslots = torch.tensor(kslots, dtype=torch.int64).to(device)
        self.qslots = torch.tensor(qslots, dtype=torch.int64).to(device)
        base = torch.tensor(out_base, dtype=torch.int64)
        self.out_idx = (base.view(-1, 1) + torch.arange(heads).view(1, -1)).reshape(-1).to(device)


def _plan(q_pack: Pack, k_pack: Pack, heads: int, device: torch.device) -> _Plan:
    cached = k_pack._buckets.get(id(q_pack))
    if cached is None:
        cached = (q_pack, _Plan(q_pack, k_pack, heads, device))  # holding q_pack keeps its id unique
        k_pack._buckets[id(q_pack)] = cached
    return cached[1]


# Cost model of one SDPA group, in units of (head_dim * heads) multiply-adds: attention
# ~4 * lq * lk, gathers ~16 * (lq + 2 * lk) per sequence slot, plus a fixed per-group
# overhead (about ten eager ops forward and backward).
_GROUP_OVERHEAD = 6000


def _split_groups(klens: List[int], qlens: List[int], overhead: int = _GROUP_OVERHEAD) -> List[Tuple[int, int]]:
    """Split sequences sorted by key length into contiguous groups minimising padded
    work + per-group overhead (exact dynamic programme, O(n^2) on the host)."""
    n = len(klens)
    if n == 0:
        return []
    inf = float("inf")
    best = [0.0] + [inf] * n
    cut = [0] * (n + 1)
    for hi in range(1, n + 1):
        lk = klens[hi - 1]  # sorted: the group's longest key
        lq = 0
        for lo in range(hi - 1, -1, -1):
            lq = max(lq, qlens[lo])
            cnt = hi - lo
            cost = best[lo] + overhead + cnt * (4 * lq * lk + 16 * (lq + 2 * lk))
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    out = []
    hi = n
    while hi > 0:
        out.append((cut[hi], hi))
        hi = cut[hi]
    return out[::-1]


def _sdpa_bucketed(q: Tensor, k: Tensor, v: Tensor, q_pack: Pack, k_pack: Pack, scale: float,
                   fused: Optional[Tensor]) -> Tensor:
    heads, dim = q.shape[1], q.shape[2]
    hd = heads * dim
    plan = _plan(q_pack, k_pack, heads, q.device)
    if not plan.groups:
        return q.new_zeros(q.shape)
    # one gather per tensor for all groups (its backward is one scatter), then per-group views
    if fused is not None and fused.shape[1] == 3 * hd and q_pack is k_pack:
        parts = fused.index_select(0, plan.kslots).split(plan.ksizes)
        qkv = [p.view(g[0], g[2], 3, heads, dim).unbind(2) for p, g in zip(parts, plan.groups)]
    else:
        if fused is not None and fused.shape[1] == 2 * hd:
            kv = [p.view(g[0], g[2], 2, heads, dim).unbind(2)
                  for p, g in zip(fused.index_select(0, plan.kslots).split(plan.ksizes), plan.groups)]
        else:
            ks = k.reshape(k.shape[0], hd).index_select(0, plan.kslots).split(plan.ksizes)
            vs = v.reshape(v.shape[0], hd).index_select(0, plan.kslots).split(plan.ksizes)
            kv = [(a.view(g[0], g[2], heads, dim), b.view(g[0], g[2], heads, dim))
                  for a, b, g in zip(ks, vs, plan.groups)]
        qs = q.reshape(q.shape[0], hd).index_select(0, plan.qslots).split(plan.qsizes)
        qkv = [(a.view(g[0], g[1], heads, dim), *b) for a, b, g in zip(qs, kv, plan.groups)]
    outs = []
    for (qg, kg, vg), (n, lq, lk, mask) in zip(qkv, plan.groups):
        og = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2),
                                            attn_mask=mask, scale=scale)  # (n, H, lq, D), stored (n, lq, H, D)
        outs.append(og.transpose(1, 2).reshape(n * lq * heads, dim))
    flat = outs[0] if len(outs) == 1 else torch.cat(outs)
    return flat.index_select(0, plan.out_idx).view(q.shape[0], heads, dim)


def _cpu_sdpa_path(q: Tensor, dropout_p: float, q_pack: Pack, k_pack: Pack) -> bool:
    return (
        dropout_p == 0.0
        and q.device.type == "cpu"
        and q_pack.lens is not None
        and k_pack.lens is not None
        and not torch.compiler.is_compiling()
        and backend.select("attention", q.device, q.dtype).impl == backend.ATEN
    )


def packed_attention(q: Tensor, k: Tensor, v: Tensor, q_pack: Pack, k_pack: Pack, *, dropout_p: float,
                     scale: float, seed: int, offset: int, fused: Optional[Tensor] = None) -> Tensor:
    """Varlen self-attention of packed sequences: the model's single attention call site.

    Args:
        q: ``(Tq, H, D)``; sequence ``b``'s queries are rows ``q_pack.cu_seqlens[b]:[b+1]``.
        k, v: ``(Tk, H, D)`` laid out by ``k_pack``.
        dropout_p: attention-probability dropout (0 in eval).
        scale: softmax scale. seed, offset: Philox key / counter offset of the dropout mask.
        fused: optional hint: the 2-D projection output ``q``/``k``/``v`` are views of,
            ``(Tk, 3 * H * D)`` (columns q | k | v, self-attention) or ``(Tk, 2 * H * D)``
            (k | v). An implementation may read it instead (fewer gathers); results are
            the same either way.

    Returns ``(Tq, H, D)`` in ``q``'s dtype.

    Runs :func:`turbotune.ops.attention_varlen` (Triton on GPU; the native C++
    kernels on CPU) except on CPU without dropout when attention's CPU backend is
    ATen's kernel (``TURBOTUNE_BACKEND=aten``, or an extension built without the
    native attention): ATen has no varlen entry, so its SDPA kernel runs over
    length buckets (sequences sorted by length, a few groups each padded to its
    longest), which computes little padding at a handful of calls.
    """
    if _cpu_sdpa_path(q, dropout_p, q_pack, k_pack):
        return _sdpa_bucketed(q, k, v, q_pack, k_pack, scale, fused)
    return attention_varlen(q, k, v, q_pack.cu_seqlens, k_pack.cu_seqlens, q_pack.max_seqlen, k_pack.max_seqlen,
                            dropout_p=dropout_p, softmax_scale=scale, dropout_seed=seed if dropout_p > 0 else None,
                            dropout_offset=offset)


# ----------------------------------------------------------------------------- model pieces


def embed(base: torch.nn.Module, pack: Pack, spec, input_ids: Optional[Tensor], token_type_ids: Optional[Tensor],
          position_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
    """The embedding layer on the real tokens only: ``(T, hidden)``.

    Gathers the ids (token, type, position) of the real tokens, then runs the
    word / type / position lookups, LayerNorm and dropout of ``base.embeddings``
    on ``T`` rows. Position ids follow the model: BERT uses the column index,
    RoBERTa-style embeddings (``position_embeddings.padding_idx`` set) count
    non-padding *input ids* from ``padding_idx + 1``, exactly as stock.
    """
    emb = base.embeddings
    b, l = pack.batch, pack.seqlen
    idx = pack.indices
    if inputs_embeds is None:
        x = emb.word_embeddings(input_ids.reshape(-1).index_select(0, idx))
    else:
        x = inputs_embeds.reshape(b * l, inputs_embeds.shape[-1]).index_select(0, idx)
        x = x.to(emb.word_embeddings.weight.dtype) if not torch.is_autocast_enabled() else x
    tte = getattr(emb, "token_type_embeddings", None)
    if tte is not None:
        if token_type_ids is None:
            x = x + tte.weight[0]  # stock's all-zeros buffer: row 0 for every token
        else:
            x = x + tte(token_type_ids.expand(b, l).reshape(-1).index_select(0, idx))
    if position_ids is None:
        pad = spec.position_padding_idx
        if pad is None:
            pos = emb.position_ids.reshape(-1).index_select(0, idx % l) if l > 0 else idx
        elif input_ids is not None:
            real = input_ids.ne(pad).to(torch.int32)
            pos = (torch.cumsum(real, dim=1).to(torch.int32) * real).to(torch.int64) + pad
            pos = pos.reshape(-1).index_select(0, idx)
        else:
            pos = (idx % l) + (pad + 1)
    else:
        pos = position_ids.expand(b, l).reshape(-1).index_select(0, idx)
    x = x + emb.position_embeddings(pos)
    x = emb.LayerNorm(x)
    x = emb.dropout(x)
    proj = getattr(base, "embeddings_project", None)
    if proj is not None:
        x = proj(x)
    return x


def _fused_params(linears) -> Tuple[Tensor, Optional[Tensor]]:
    """One ``(sum(out), in)`` weight (and bias) for several Linears that read the same input:
    one GEMM instead of several. The concatenation is part of the autograd graph, so each
    stock Parameter gets its own gradient slice; state_dict keys are untouched."""
    w = torch.cat([m.weight for m in linears])
    if any(m.bias is None for m in linears):
        if all(m.bias is None for m in linears):
            return w, None
        return w, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                             for m in linears])
    return w, torch.cat([m.bias for m in linears])


def _drop(x: Tensor, module: torch.nn.Module) -> Tensor:
    p = module.p
    return F.dropout(x, p, True) if module.training and p > 0 else x


def layer_forward(layer: torch.nn.Module, x: Tensor, pack: Pack, spec, seed: int, offset: int,
                  q_rows: Optional[Tensor] = None, q_pack: Optional[Pack] = None) -> Tensor:
    """One post-LN BERT layer on packed tokens.

    Args:
        layer: the stock ``BertLayer`` (its parameters and dropout modules are used as is).
        x: ``(T, hidden)`` packed hidden states.
        pack: layout of ``x``.
        q_rows: optional ``(Tq,)`` int64 rows of ``x`` whose outputs are needed (grouped
            by sequence, in order); then keys/values use every token but queries, the
            attention output, the FFN and both LayerNorms run on those rows only.
        q_pack: layout of the ``q_rows`` (required with ``q_rows``).

    Returns ``(T, hidden)``, or ``(Tq, hidden)`` with ``q_rows``.
    """
    att = layer.attention
    sa = att.self
    heads, dim = spec.heads, spec.head_dim
    hid = heads * dim
    t = x.shape[0]
    if q_rows is None:
        w, b = _fused_params((sa.query, sa.key, sa.value))
        fused = F.linear(x, w, b)
        q, k, v = fused.view(t, 3, heads, dim).unbind(1)
        resid = x
        q_pack = pack
    else:
        w, b = _fused_params((sa.key, sa.value))
        fused = F.linear(x, w, b)
        k, v = fused.view(t, 2, heads, dim).unbind(1)
        resid = x.index_select(0, q_rows)
        q = F.linear(resid, sa.query.weight, sa.query.bias).view(-1, heads, dim)
    p_attn = sa.dropout.p if sa.training else 0.0
    ctx = packed_attention(q, k, v, q_pack, pack, dropout_p=p_attn, scale=spec.scale, seed=seed, offset=offset,
                           fused=fused)
    so = att.output
    a = _drop(F.linear(ctx.reshape(-1, hid), so.dense.weight, so.dense.bias), so.dropout)
    y = layer_norm(resid, so.LayerNorm.weight, so.LayerNorm.bias, so.LayerNorm.eps, residual=a)[0]
    inter = layer.intermediate
    if spec.gelu is not None:
        h = bias_gelu(y, inter.dense.weight, inter.dense.bias, spec.gelu)
    else:
        h = inter.intermediate_act_fn(inter.dense(y))
    out = layer.output
    o = _drop(F.linear(h, out.dense.weight, out.dense.bias), out.dropout)
    return layer_norm(y, out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps, residual=o)[0]


def _checkpoint_fn(base: torch.nn.Module, layer: torch.nn.Module):
    """The gradient-checkpointing function HF set up (v5: per layer; v4: on the encoder), or None."""
    if not (layer.training and torch.is_grad_enabled()):
        return None
    enc = base.encoder
    for holder in (layer, enc):
        if getattr(holder, "gradient_checkpointing", False):
            fn = getattr(holder, "_gradient_checkpointing_func", None)
            if fn is None:
                from torch.utils.checkpoint import checkpoint

                return lambda f, *a: checkpoint(f, *a, use_reentrant=False)
            return fn
    return None


def run_encoder(base: torch.nn.Module, x: Tensor, pack: Pack, spec, *, seed: int, want_hidden: bool,
                q_rows: Optional[Tensor] = None, q_pack: Optional[Pack] = None):
    """All encoder layers on packed ``x`` ``(T, hidden)``.

    With ``q_rows``/``q_pack`` the last layer computes only those rows (see
    :func:`layer_forward`). Returns ``(final, hidden_states)`` where
    ``hidden_states`` is the list ``[x, layer1, ..., layerN]`` of packed states
    when ``want_hidden`` (then the last layer runs on every row) else None.
    """
    layers = base.encoder.layer
    n = len(layers)
    hidden = [x] if want_hidden else None
    for i, layer in enumerate(layers):
        last = i == n - 1 and q_rows is not None and not want_hidden
        ck = _checkpoint_fn(base, layer)
        if last:
            if ck is None:
                x = layer_forward(layer, x, pack, spec, seed, i, q_rows, q_pack)
            else:
                x = ck(_LayerCall(layer, pack, spec, seed, i, q_rows, q_pack), x)
        elif ck is None:
            x = layer_forward(layer, x, pack, spec, seed, i)
        else:
            x = ck(_LayerCall(layer, pack, spec, seed, i), x)
        if want_hidden:
            hidden.append(x)
    return x, hidden


class _LayerCall:
    """``layer_forward`` with everything but the hidden states bound (for checkpointing)."""

    def __init__(self, layer, pack, spec, seed, offset, q_rows=None, q_pack=None):
        self.args = (layer, pack, spec, seed, offset)
        self.q = (q_rows, q_pack)

    def __call__(self, x: Tensor) -> Tensor:
        layer, pack, spec, seed, offset = self.args
        return layer_forward(layer, x, pack, spec, seed, offset, *self.q)
