"""Packed sequences: document masking (varlen) inside sequence-parallel attention.

    cu_seqlens = (0, e_1, ..., e_n = L)   global boundaries of n documents packed into ONE sequence
                                          of L tokens (the same on every rank), for every batch row
               = [row_0, ..., row_{B-1}]  or one such tuple per batch row (per-row packings: a list of
                                          1-D int tensors / lists, or a 2-D (B, n) int tensor whose
                                          rows may end in repeats of L as padding); every row ends at L

Token p attends to key t iff both lie in the same document (and t <= p when causal): the
block-diagonal mask flash_attn_varlen_func computes on one GPU, here across the ranks of a ring.

Per (Q owner, K/V owner) pair, layout.attention_block gives the rows the layout needs. This
module cuts that block into pieces (Piece: offsets relative to the block's rows):

    runs    each side's local rows as runs of consecutive global positions (a rank holds 1 chunk,
            contiguous, or 2, zigzag)
    pieces  for every Q run x K/V run and every document meeting both: (q rows in the document)
            x (k/v rows in the document), which is
              - a causal square when both are the same rows (the diagonal of a chunk),
              - fully visible when the K/V rows come before the Q rows (or causal=False),
              - invisible when they come after (dropped)
            (runs are whole chunks or the same chunk, so no other overlap can occur)
    rows    per-row packings: each batch row's pieces; rows whose pieces are equal for this block
            share them (a Piece names its batch rows b0..b0+nb-1, nb = 0: all rows), so a block
            the packings agree on (the usual case: they differ in a few places) stays one set
    trim    the block shrinks to the bounding rows of its pieces; no piece at all -> None: the
            pair is skipped like a causally masked one (TokenRing then sends no Q rows to that
            rank and gets no partial back; KV rotation forwards K/V up to the last ring step any
            rank still has a block at, RingPlan.ring_steps)

block_forward / block_backward / block_lse_backward run a Block: a plain block is one
block_attention call; a pieced block is one call per piece, the pieces' (out, lse) merged in fp32
(a Q row can meet one document in two K/V runs) and the backward's pieces adding into the same
fp32 accumulators (each piece's share, computed with the FINAL lse, is exact). Rows of a trimmed
block that no piece covers get out = 0, lse = -inf, which the ring's merge folds exactly.

    tiles   pieces of the same shape and mask that follow each other along the diagonal (tile t:
            q rows a + t*n, k/v rows c + t*m; a sliding window's band: its causal squares, and
            its anti-causal squares; equal-length documents) become ONE piece of `tiles` tiles,
            run as one call with the tiles as extra batch rows ((B, T*n) -> (B*T, n))

Cost: one block-attention call per piece (per group of batch rows with the same pieces), so a
block meeting many short documents of different lengths costs many small launches (a varlen
kernel would take them in one; not done); a window's band costs a few calls whatever its length.
Every row meets its own document on the diagonal, so every rank's diagonal block covers all of
its rows.
"""
from __future__ import annotations

import bisect
import functools
import os
import zlib
from typing import NamedTuple

import torch

from ringattn.block_attention import block_attn_backward, block_attn_forward, block_lse_backward
from ringattn.ops import merge_attn_states_

_F32 = torch.float32

# How a tiled piece runs (tile_pieces): "auto" = as ONE call with its tiles as batch rows on CUDA
# (one launch instead of T), tile by tile elsewhere (the CPU math backend is slower batched: its
# scores of T tiles at once fall out of cache; perf/RESULTS.md, 2026-12-03); "batched" /
# "per_tile" force one way (the CPU tests run both). Env RINGATTN_TILES sets the default.
TILE_MODES = ("auto", "batched", "per_tile")
TILE_MODE = os.environ.get("RINGATTN_TILES", "auto")
if TILE_MODE not in TILE_MODES:
    raise ValueError(f"RINGATTN_TILES must be one of {TILE_MODES}, got {TILE_MODE!r}")


class Piece(NamedTuple):
    """One document's part of a block; rows relative to the block's q_start / kv_start."""

    q_off: int
    q_len: int
    kv_off: int
    kv_len: int
    causal: bool  # a causal square (q rows == k/v rows), else fully visible
    b0: int = 0   # per-row packings: the batch rows b0 .. b0 + nb - 1 it applies to
    nb: int = 0   # 0: every batch row
    flip: bool = False  # sliding window: an ANTI-causal square (row i sees keys j >= i), run as a
    #                     causal square on the rows and keys in reverse order
    tiles: int = 1  # T tiles: q rows q_off + t*q_len, k/v rows kv_off + t*kv_len, t < T, each
    #                 this piece's mask; the piece spans T*q_len q rows and T*kv_len k/v rows


def _row(values, what: str) -> tuple[tuple | None, str | None]:
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        return None, f"{what} must hold ints"
    if len(values) < 2:
        return None, f"{what} needs at least 2 entries (0 and the sequence length), got {list(values)}"
    if values[0] != 0:
        return None, f"{what} must start at 0, got {values[0]}"
    bad = next((i for i in range(1, len(values)) if values[i] <= values[i - 1]), None)
    if bad is not None:
        return None, (f"{what} must strictly increase (no empty document): entry {bad} is {values[bad]} "
                      f"after {values[bad - 1]}")
    return tuple(values), None


def _int_tensor_problem(t: torch.Tensor) -> str | None:
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        return f"cu_seqlens must be an integer tensor, got {str(t.dtype).replace('torch.', '')}"
    return None


def _strip_padding(values: list) -> list:
    """A row of a 2-D cu_seqlens tensor without the repeats of its last value (its padding)."""
    n = len(values)
    while n > 2 and values[n - 1] == values[n - 2]:
        n -= 1
    return values[:n]


def as_documents(cu_seqlens) -> tuple[tuple | None, str | None]:
    """(boundaries, None) or (None, what is wrong). None -> (None, None).

    One packing for every batch row: a 1-D integer tensor (any device: a CUDA tensor costs one
    device-to-host copy) or a list/tuple of ints, starting at 0 and strictly increasing (no empty
    document) -> a tuple of ints. Per-row packings: a list/tuple of such rows, or a 2-D integer
    tensor (B, n) whose rows may end in repeats of their last value (padding to a common n); all
    rows must end at the same length -> a tuple of B tuples, or one tuple when every row is the
    same."""
    if cu_seqlens is None:
        return None, None
    if isinstance(cu_seqlens, torch.Tensor):
        problem = _int_tensor_problem(cu_seqlens)
        if problem or cu_seqlens.dim() not in (1, 2):
            return None, problem or (f"cu_seqlens must be a 1-D (one packing) or 2-D (one per batch row) integer "
                                     f"tensor, got {cu_seqlens.dim()}-D")
        if cu_seqlens.dim() == 1:
            return _row(cu_seqlens.tolist(), "cu_seqlens")
        rows = [_strip_padding(r) for r in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (list, tuple)):
        if all(isinstance(x, int) and not isinstance(x, bool) for x in cu_seqlens):
            return _row(list(cu_seqlens), "cu_seqlens")
        rows = []
        for b, r in enumerate(cu_seqlens):
            if isinstance(r, torch.Tensor):
                problem = _int_tensor_problem(r)
                if problem or r.dim() != 1:
                    return None, f"cu_seqlens[{b}]: " + (problem or f"a row must be 1-D, got {r.dim()}-D")
                r = r.tolist()
            elif not isinstance(r, (list, tuple)):
                return None, ("cu_seqlens must hold ints (one packing) or one list/1-D tensor per batch row, "
                              f"got {type(r).__name__} at [{b}]")
            rows.append(list(r))
    else:
        return None, ("cu_seqlens must be a 1-D integer tensor or a list of ints (one packing), or one per batch "
                      f"row, got {type(cu_seqlens).__name__}")
    if not rows:
        return None, "cu_seqlens has no rows"
    out = []
    for b, r in enumerate(rows):
        row, problem = _row(r, f"cu_seqlens[{b}]")
        if problem:
            return None, problem
        out.append(row)
    ends = sorted({r[-1] for r in out})
    if len(ends) > 1:
        return None, (f"the batch rows' cu_seqlens end at different lengths {ends}: every row is the same "
                      "global sequence length")
    if all(r == out[0] for r in out):
        return out[0], None
    return tuple(out), None


def per_row(docs) -> bool:
    """Whether `docs` (as_documents) holds one packing per batch row."""
    return docs is not None and isinstance(docs[0], tuple)


def documents_length(docs) -> int:
    """The global sequence length the boundaries end at."""
    return docs[0][-1] if per_row(docs) else docs[-1]


def documents_count(docs) -> int:
    """Documents in all (summed over the rows of per-row packings)."""
    return sum(len(r) - 1 for r in docs) if per_row(docs) else len(docs) - 1


def packed(docs):
    """`docs` unless it is one document for every row (plain attention): then None."""
    return None if docs is None or (not per_row(docs) and len(docs) == 2) else docs


def documents_rows_problem(docs, batch: int) -> str | None:
    """What is wrong with per-row packings for a batch of `batch` rows (None: fine)."""
    if per_row(docs) and len(docs) != batch:
        return f"cu_seqlens has {len(docs)} rows (one packing per batch row), but the batch has {batch} rows"
    return None


def documents_tensor(docs) -> torch.Tensor:
    """The boundaries as one int64 CPU tensor as_documents reads back: 1-D, or (B, n) with each row
    padded by repeating its last value."""
    if not per_row(docs):
        return torch.tensor(docs, dtype=torch.int64)
    n = max(len(r) for r in docs)
    return torch.tensor([r + (r[-1],) * (n - len(r)) for r in docs], dtype=torch.int64)


def documents_crc(docs: tuple) -> int:
    """A 31-bit checksum of the boundaries (what the ranks compare in their signature)."""
    text = "|".join(",".join(map(str, r)) for r in docs) if per_row(docs) else ",".join(map(str, docs))
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _runs(lay, rank: int, start: int, length: int) -> list[tuple[int, int, int]]:
    """(local row, global position, length) of each run of rank's rows [start, start + length)."""
    out, off = [], 0
    for g, n in lay.segments(rank):
        lo, hi = max(start, off), min(start + length, off + n)
        if lo < hi:
            out.append((lo, g + lo - off, hi - lo))
        off += n
    return out


def _split(docs: tuple, g: int, n: int) -> dict[int, tuple[int, int]]:
    """document index -> (global start, length) of its part of [g, g + n)."""
    out = {}
    d = bisect.bisect_right(docs, g) - 1
    while d + 1 < len(docs) and docs[d] < g + n:
        lo, hi = max(docs[d], g), min(docs[d + 1], g + n)
        out[d] = (lo, hi - lo)
        d += 1
    return out


def window_pieces(a: int, n: int, c: int, m: int, w: int) -> list[tuple]:
    """Pieces of query positions [a, a+n) x key positions [c, c+m) under the causal sliding window
    0 <= q - k < w (each query sees its w most recent keys, itself included: Hugging Face's
    config.sliding_window), as (q_pos, q_len, k_pos, k_len, causal, flip) in global positions.

    Row q sees keys [lo(q), hi(q)], lo = max(c, q-w+1), hi = min(c+m-1, q). The rows are cut where
    lo or hi changes slope (q = c+w, q = c+m); in each segment the visible set is at most
      anti    keys [lo, lo+h): row i sees keys j >= i (only where lo rises with q),
      full    the keys every row of the segment sees,
      causal  keys [q0, q0+h): row i sees keys j <= i (only where hi rises with q),
    three squares/rectangles every backend runs. Where both rise (the band), rows go in tiles of
    h = max(1, w-1) so the anti and causal squares never overlap: ~2 * rows / w pieces (of two
    sizes along the diagonal: tile_pieces runs each run of them as one call)."""
    out = []
    r_lo, r_hi = max(a, c), min(a + n, c + m + w - 1)  # rows that see any key
    if r_lo >= r_hi:
        return out
    cuts = sorted({r_lo, r_hi} | {x for x in (c + w, c + m) if r_lo < x < r_hi})
    for r0, r1 in zip(cuts, cuts[1:]):
        rising_lo, rising_hi = r0 >= c + w, r0 < c + m
        step = max(1, w - 1) if rising_lo and rising_hi else r1 - r0
        for t0 in range(r0, r1, step):
            h = min(step, r1 - t0)
            x = t0 - w + 1 if rising_lo else c  # lo of the tile's first row
            end = t0 if rising_hi else c + m    # keys [x, end) lie left of the causal square
            if rising_lo and end > x:           # (end == x: the band of w = 1, rows see only themselves)
                assert end - x >= h, (a, n, c, m, w, t0)
                out.append((t0, h, x, h, True, True))
                x += h
            if end > x:
                out.append((t0, h, x, end - x, False, False))
            if rising_hi:
                out.append((t0, h, t0, h, True, False))
    return out


def tile_pieces(pieces) -> list:
    """Pieces (q_row, q_len, kv_row, kv_len, causal, flip) -> (..., tiles): each piece that has
    the shape and mask of an earlier one and starts where that one (or its last tile) ends, on
    both sides, becomes its next tile. The covered positions and masks are unchanged."""
    out, open_ = [], {}  # (shape, mask, next q row, next kv row) -> index in out
    for a, n, c, m, causal, flip in pieces:
        i = open_.pop((n, m, causal, flip, a, c), None)
        if i is None:
            out.append((a, n, c, m, causal, flip, 1))
            i = len(out) - 1
        else:
            out[i] = out[i][:6] + (out[i][6] + 1,)
        open_[(n, m, causal, flip, a + n, c + m)] = i
    return out


def _block_pieces(lay, docs: tuple, q_owner: int, kv_owner: int, causal: bool, blk, window=None) -> list:
    """One packing's pieces of block `blk`, in absolute local rows:
    (q_row, q_len, kv_row, kv_len, causal, flip, tiles)."""
    pieces = []
    for q_row, q_g, q_n in _runs(lay, q_owner, blk.q_start, blk.q_len):
        q_docs = _split(docs, q_g, q_n)
        for kv_row, kv_g, kv_n in _runs(lay, kv_owner, blk.kv_start, blk.kv_len):
            for d, (kg, kn) in _split(docs, kv_g, kv_n).items():
                if d not in q_docs:
                    continue
                qg, qn = q_docs[d]
                if window is not None:
                    pieces += [(q_row + pa - q_g, pn, kv_row + pc - kv_g, pm, pcaus, pflip)
                               for pa, pn, pc, pm, pcaus, pflip in window_pieces(qg, qn, kg, kn, window)]
                    continue
                square = (qg, qn) == (kg, kn)
                if causal and not square:
                    if kg >= qg + qn:
                        continue  # the K/V rows come after every Q row: invisible
                    if kg + kn > qg:
                        raise AssertionError(f"ringattn.documents: a partial causal overlap (q {qg}+{qn}, "
                                             f"kv {kg}+{kn}) cannot come from the layout's chunks")
                pieces.append((q_row + qg - q_g, qn, kv_row + kg - kv_g, kn, bool(causal and square), False))
    return tile_pieces(pieces)


def document_block(lay, docs: tuple, q_owner: int, kv_owner: int, causal: bool, blk, window: int | None = None):
    """The pieced, trimmed version of the layout's block `blk` (layout.Block or None).
    window: a causal sliding window (window_pieces) inside the documents; docs may be (0, L)."""
    from ringattn.layout import Block

    if blk is None:
        return None
    if not per_row(docs):
        groups = [(0, 0, _block_pieces(lay, docs, q_owner, kv_owner, causal, blk, window))]
    else:
        rows = [_block_pieces(lay, r, q_owner, kv_owner, causal, blk, window) for r in docs]
        if all(r == rows[0] for r in rows):
            groups = [(0, 0, rows[0])]
        else:  # consecutive batch rows with the same pieces share them
            groups = []
            for b, r in enumerate(rows):
                if groups and groups[-1][2] == r:
                    groups[-1] = (groups[-1][0], groups[-1][1] + 1, r)
                else:
                    groups.append((b, 1, r))
    pieces = [p for _, _, ps in groups for p in ps]
    if not pieces:
        return None
    q0 = min(p[0] for p in pieces)
    q1 = max(p[0] + p[1] * p[6] for p in pieces)
    k0 = min(p[2] for p in pieces)
    k1 = max(p[2] + p[3] * p[6] for p in pieces)
    rel = tuple(Piece(a - q0, n, b - k0, m, c, b0, nb, f, T) for b0, nb, ps in groups for a, n, b, m, c, f, T in ps)
    return Block(q0, q1 - q0, k0, k1 - k0, False, rel)


@functools.lru_cache(maxsize=256)
def _per_tile(pieces: tuple) -> tuple:
    return tuple(p._replace(q_off=p.q_off + t * p.q_len, kv_off=p.kv_off + t * p.kv_len, tiles=1)
                 for p in pieces for t in range(p.tiles))


def run_pieces(blk, device: torch.device) -> tuple:
    """blk.pieces as they run on `device` (TILE_MODE): tiled, or each tile its own piece."""
    if TILE_MODE == "batched" or (TILE_MODE == "auto" and device.type == "cuda"):
        return blk.pieces
    return _per_tile(blk.pieces) if any(p.tiles > 1 for p in blk.pieces) else blk.pieces


def _rows(t, p: Piece):
    return t if p.nb == 0 else t.narrow(0, p.b0, p.nb)


def _q(t, p: Piece):
    return _rows(t, p).narrow(1, p.q_off, p.q_len * p.tiles)


def _kv(t, p: Piece):
    return _rows(t, p).narrow(1, p.kv_off, p.kv_len * p.tiles)


def _lse(t, p: Piece):
    return _rows(t, p).narrow(2, p.q_off, p.q_len * p.tiles)


def _whole(blk, p: Piece) -> bool:
    return (p.q_off, p.q_len, p.kv_off, p.kv_len, p.nb, p.flip, p.tiles) == (0, blk.q_len, 0, blk.kv_len, 0, False, 1)


# A tiled piece runs with its tiles as batch rows: (B, T*n, H, D) <-> (B*T, n, H, D) (a view for
# B = 1 or when the rows are the whole tensor, else a copy), lse (B, H, T*n) <-> (B*T, H, n).
def _tile(t, T: int):
    return t if T == 1 else t.reshape(t.shape[0] * T, t.shape[1] // T, *t.shape[2:])


def _tile_view(t, T: int):
    """t's rows as T tiles WITHOUT a copy (an accumulator to add into), or None if that needs one."""
    try:
        return t.view(t.shape[0] * T, t.shape[1] // T, *t.shape[2:])
    except RuntimeError:
        return None


def _untile(t, B: int):
    return t if t.shape[0] == B else t.reshape(B, -1, *t.shape[2:])


def _tile_lse(t, T: int):
    if T == 1:
        return t
    B, H, n = t.shape
    return t.unflatten(2, (T, n // T)).transpose(1, 2).reshape(B * T, H, n // T)


def _untile_lse(t, B: int):
    if t.shape[0] == B:
        return t
    T, H, n = t.shape[0] // B, t.shape[1], t.shape[2]
    return t.unflatten(0, (B, T)).transpose(1, 2).reshape(B, H, T * n)


def _rev(t, dim: int = 1):
    """The rows of t in reverse order (a copy; an anti-causal piece runs on reversed rows)."""
    return t.flip(dim)


def _zeros_like_rows(t, T: int = 1):
    """fp32 (or t's dtype) zeros shaped like t's rows, tiled: (B*T, n/T, ...)."""
    return torch.zeros((t.shape[0] * T, t.shape[1] // T, *t.shape[2:]), dtype=t.dtype, device=t.device)


def block_forward(blk, q, k, v, *, softmax_scale, backend, softcap=None):
    """(out (B, q_len, Hq, Dv) q.dtype, lse (B, Hq, q_len) fp32) of block `blk`; q, k, v are its rows
    (Dv: v's head dim, MLA; D otherwise)."""
    if not blk.pieces:
        return block_attn_forward(q, k, v, causal=blk.causal, softmax_scale=softmax_scale, backend=backend,
                                  softcap=softcap)
    if len(blk.pieces) == 1 and _whole(blk, blk.pieces[0]):
        return block_attn_forward(q, k, v, causal=blk.pieces[0].causal, softmax_scale=softmax_scale,
                                  backend=backend, softcap=softcap)
    B, n, Hq, _ = q.shape
    out = torch.zeros((B, n, Hq, v.shape[3]), dtype=_F32, device=q.device)
    lse = torch.full((B, Hq, n), float("-inf"), dtype=_F32, device=q.device)
    for p in run_pieces(blk, q.device):
        T, Bp = p.tiles, p.nb or B
        qp, kp, vp = _tile(_q(q, p), T), _tile(_kv(k, p), T), _tile(_kv(v, p), T)
        if p.flip:  # anti-causal: the causal square of the reversed rows and keys, reversed back
            o, l = block_attn_forward(_rev(qp), _rev(kp), _rev(vp), causal=True,
                                      softmax_scale=softmax_scale, backend=backend, softcap=softcap)
            o, l = _rev(o), _rev(l, 2)
        else:
            o, l = block_attn_forward(qp, kp, vp, causal=p.causal, softmax_scale=softmax_scale, backend=backend,
                                      softcap=softcap)
        merge_attn_states_(_q(out, p), _lse(lse, p), _untile(o, Bp), _untile_lse(l, Bp).contiguous())
    return out.to(q.dtype), lse


def block_backward(blk, dout, q, k, v, out, lse, *, dq_out, dk_out, dv_out, softmax_scale, backend, softcap=None):
    """Adds block `blk`'s share of dq, dk, dv into dq_out (q rows), dk_out / dv_out (k/v rows)."""
    kw = dict(softmax_scale=softmax_scale, backend=backend, softcap=softcap)
    if not blk.pieces:
        block_attn_backward(dout, q, k, v, out, lse, causal=blk.causal, dq_out=dq_out, dk_out=dk_out,
                            dv_out=dv_out, **kw)
        return
    for p in run_pieces(blk, q.device):
        T = p.tiles
        acc = None if p.flip or T == 1 else \
            [_tile_view(x, T) for x in (_q(dq_out, p), _kv(dk_out, p), _kv(dv_out, p))]
        if acc is not None and all(a is not None for a in acc):  # tiles straight into the accumulators (batch 1)
            block_attn_backward(_tile(_q(dout, p), T), _tile(_q(q, p), T), _tile(_kv(k, p), T), _tile(_kv(v, p), T),
                                _tile(_q(out, p), T), _tile_lse(_lse(lse, p), T), causal=p.causal,
                                dq_out=acc[0], dk_out=acc[1], dv_out=acc[2], **kw)
            continue
        if p.flip or p.tiles > 1:  # (reversed) tiles into fp32 scratch accumulators, added back in order
            Bp = p.nb or q.shape[0]
            r = _rev if p.flip else (lambda t, dim=1: t)
            dq, dk, dv = (_zeros_like_rows(_q(dq_out, p), T), _zeros_like_rows(_kv(dk_out, p), T),
                          _zeros_like_rows(_kv(dv_out, p), T))
            block_attn_backward(r(_tile(_q(dout, p), T)), r(_tile(_q(q, p), T)), r(_tile(_kv(k, p), T)),
                                r(_tile(_kv(v, p), T)), r(_tile(_q(out, p), T)), r(_tile_lse(_lse(lse, p), T), 2),
                                causal=True if p.flip else p.causal, dq_out=dq, dk_out=dk, dv_out=dv, **kw)
            _q(dq_out, p).add_(_untile(r(dq), Bp))
            _kv(dk_out, p).add_(_untile(r(dk), Bp))
            _kv(dv_out, p).add_(_untile(r(dv), Bp))
            continue
        block_attn_backward(_q(dout, p), _q(q, p), _kv(k, p), _kv(v, p), _q(out, p), _lse(lse, p), causal=p.causal,
                            dq_out=_q(dq_out, p), dk_out=_kv(dk_out, p), dv_out=_kv(dv_out, p), **kw)


def block_lse_backward_(blk, dlse, q, k, lse, *, dq_out, dk_out, softmax_scale, backend, softcap=None):
    """Adds block `blk`'s share of the FINAL lse's gradient into dq_out and dk_out."""
    kw = dict(softmax_scale=softmax_scale, backend=backend, softcap=softcap)
    if not blk.pieces:
        block_lse_backward(dlse, q, k, lse, causal=blk.causal, dq_out=dq_out, dk_out=dk_out, **kw)
        return
    for p in run_pieces(blk, q.device):
        T = p.tiles
        acc = None if p.flip or T == 1 else [_tile_view(x, T) for x in (_q(dq_out, p), _kv(dk_out, p))]
        if acc is not None and all(a is not None for a in acc):  # tiles straight into the accumulators
            block_lse_backward(_tile_lse(_lse(dlse, p), T), _tile(_q(q, p), T), _tile(_kv(k, p), T),
                               _tile_lse(_lse(lse, p), T), causal=p.causal, dq_out=acc[0], dk_out=acc[1], **kw)
            continue
        if p.flip or p.tiles > 1:
            Bp = p.nb or q.shape[0]
            r = _rev if p.flip else (lambda t, dim=1: t)
            dq, dk = _zeros_like_rows(_q(dq_out, p), T), _zeros_like_rows(_kv(dk_out, p), T)
            block_lse_backward(r(_tile_lse(_lse(dlse, p), T), 2), r(_tile(_q(q, p), T)), r(_tile(_kv(k, p), T)),
                               r(_tile_lse(_lse(lse, p), T), 2), causal=True if p.flip else p.causal,
                               dq_out=dq, dk_out=dk, **kw)
            _q(dq_out, p).add_(_untile(r(dq), Bp))
            _kv(dk_out, p).add_(_untile(r(dk), Bp))
            continue
        block_lse_backward(_lse(dlse, p), _q(q, p), _kv(k, p), _lse(lse, p), causal=p.causal,
                           dq_out=_q(dq_out, p), dk_out=_kv(dk_out, p), **kw)
