"""TokenWeave token splitting: two near-equal, wave-aware halves and the side stream they overlap on.

A GEMM of M rows x N columns on tiles of tile_m x tile_n runs in
    waves(M) = ceil(ceil(M / tile_m) * ceil(N / tile_n) / num_sms)
waves. Splitting T tokens at m costs waves(m) + waves(T - m) instead of waves(T); the split is
chosen among tile-aligned offsets near T/2 so that, where possible, neither half adds a wave
(TokenWeave, arXiv 2505.11329, "wave-aware" splitting). Below `min_tokens` the kernels of a half
are too short to hide anything and splitting is off.

The overlap itself: while the main stream computes one half, the other half's fused
AllReduce+RMSNorm runs on a high-priority side stream; the streams meet through events only
(`SideStream.launch` / `SideStream.join`), never whole-stream waits.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

DEFAULT_TILE_M = 128
DEFAULT_TILE_N = 128
# Token count below which splitting is off by default; perf/bench_tokenweave.py --split measures
# the crossover (RINGATTN_TW_SPLIT_MIN_TOKENS overrides).
DEFAULT_SPLIT_MIN_TOKENS = 1024


def split_min_tokens() -> int:
    v = os.environ.get("RINGATTN_TW_SPLIT_MIN_TOKENS")
    return DEFAULT_SPLIT_MIN_TOKENS if v in (None, "") else int(v)


def num_sms(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used to shape CPU runs like GPU runs


def gemm_waves(rows: int, cols: int, sms: int, tile_m: int = DEFAULT_TILE_M, tile_n: int = DEFAULT_TILE_N) -> int:
    if rows <= 0:
        return 0
    tiles = -(-rows // tile_m) * -(-cols // tile_n)
    return -(-tiles // sms)


def wave_aware_split(
    num_tokens: int, gemm_cols: int, sms: int, tile_m: int = DEFAULT_TILE_M, tile_n: int = DEFAULT_TILE_N
) -> int:
    """Split offset m (0 < m < T) for two near-equal halves [0, m), [m, T).

    Candidates: multiples of tile_m within [0.3 T, 0.7 T] (plus T // 2). Chosen: fewest total
    waves for a GEMM with `gemm_cols` output columns, then the most even split.
    """
    T = num_tokens
    if T < 2:
        raise ValueError(f"cannot split {T} tokens")
    lo, hi = max(1, int(0.3 * T)), min(T - 1, int(0.7 * T) + 1)
    cands = {T // 2}
    k = -(-lo // tile_m)
    while k * tile_m <= hi:
        if 0 < k * tile_m < T:
            cands.add(k * tile_m)
        k += 1

    def cost(m):
        return (gemm_waves(m, gemm_cols, sms, tile_m, tile_n) + gemm_waves(T - m, gemm_cols, sms, tile_m, tile_n),
                abs(2 * m - T), m)

    return min(cands, key=cost)


def split_ranges(num_tokens: int, enabled: bool, min_tokens: int, gemm_cols: int, sms: int) -> list[tuple[int, int]]:
    """[(0, T)] when splitting is off (disabled or T < min_tokens), else the two halves."""
    if not enabled or num_tokens < max(2, min_tokens):
        return [(0, num_tokens)]
    m = wave_aware_split(num_tokens, gemm_cols, sms)
    return [(0, m), (m, num_tokens)]


class SideStream:
    """A high-priority CUDA side stream joined to the main stream by events (no-op on CPU).

        ev = side.launch()             # side waits for main's work so far (an event)
        with side.run(): ...           # enqueue the communication on the side stream
        done = side.done()             # event after it
        side.join(done)                # main waits for that event before consuming
    """

    _streams: dict = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        if self.enabled:
            key = (device.index,)
            if key not in SideStream._streams:
                low, high = torch.cuda.Stream.priority_range()
                SideStream._streams[key] = torch.cuda.Stream(device=device, priority=high)
            self.stream = SideStream._streams[key]

    def main(self):
        return torch.cuda.current_stream(self.device) if self.enabled else None

    def launch(self):
        """The side stream waits for everything the main stream enqueued so far."""
        if self.enabled:
            ev = torch.cuda.Event()
            ev.record(self.main())
            self.stream.wait_event(ev)

    @contextmanager
    def run(self):
        if not self.enabled:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def done(self):
        if not self.enabled:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def join(self, event) -> None:
        if self.enabled and event is not None:
            self.main().wait_event(event)

    def hand_to_main(self, *tensors) -> None:
        """Tensors allocated on the side stream and used on main: keep the allocator from
        reusing their memory before main is done with them."""
        if self.enabled:
            main = self.main()
            for t in tensors:
                if t is not None and t.is_cuda:
                    t.record_stream(main)
