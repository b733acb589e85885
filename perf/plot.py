"""Plots of perf/sweep.py CSVs: one PNG per metric, one panel per (world, heads, causal, pass).

    python perf/plot.py perf/results/2026-12-01_cpu_sweep.csv                 # PNGs next to the CSV
    python perf/plot.py a.csv b.csv --out DIR --prefix issue3                 # several CSVs, one set of PNGs

Writes PREFIX_time.png (ms per call vs global sequence length, log-log, the single-process
baseline dashed), PREFIX_tflops.png (TFLOP/s per rank), PREFIX_bytes.png (max over ranks of
max(bytes sent, bytes received) per call, log-log), PREFIX_overlap.png (overlap_fraction, 0..1)
and PREFIX_ratio.png (ms / single-process ms, with the issue 3 target 1.15 dashed). Rows with an
error are left out; the x axis is each panel's sequence lengths. PREFIX defaults to the first
CSV's name without .csv. matplotlib with the Agg backend (no display needed).

    python perf/plot.py OUT/bench_tokenweave_fused.csv      # perf/bench_tokenweave.py's fused-op CSV

A TokenWeave CSV (recognised by its fused_us column) gives one PNG, PREFIX.png: us per call vs
tokens for the fused op (residual full and sharded) and the unfused sequence, and the speedup
with the issue 6 target (1.3x at >= 1024 tokens) dashed; one column per (hidden, CTA cap).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

ALG_STYLE = {  # colour, marker
    "ring": ("tab:blue", "o"), "token_ring": ("tab:orange", "s"), "auto": ("tab:green", "^"),
    "allgather": ("tab:red", "D"), "torch_cp": ("tab:purple", "v"), "single": ("black", None),
    "ulysses": ("tab:gray", "h"), "ulysses_ring": ("gold", "d"),
    # peers (perf/peers.py): dashed lines
    "rfa": ("tab:brown", "P"), "usp": ("tab:pink", "X"), "ds_ulysses": ("tab:olive", "*"),
    "torch_ring": ("tab:cyan", "v"),
}
PEERS = ("rfa", "usp", "ds_ulysses", "torch_ring", "torch_cp")
TARGET_RATIO = 1.15

METRICS = [
    # (file suffix, y label, value(row) -> float or None, log y)
    ("time", "ms per call (median, slowest rank)", lambda r: _f(r["ms_median"]), True),
    ("tflops", "TFLOP/s per rank", lambda r: _f(r["tflops_per_rank"]), False),
    ("bytes", "MiB per rank per call (max of sent, recv)",
     lambda r: _mib(_max(_f(r["sent_bytes_max"]), _f(r["recv_bytes_max"]))), True),
    ("overlap", "overlap fraction (1 = comm hidden)", lambda r: _f(r.get("overlap_fraction")), False),
    ("ratio", "time / single-process time", lambda r: _f(r.get("ratio_vs_single")), False),
]


def _f(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _mib(x):
    return None if x is None else x / 2**20


def _max(a, b):
    vals = [x for x in (a, b) if x is not None]
    return max(vals) if vals else None


def read_rows(paths):
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows += [r for r in csv.DictReader(f) if not r.get("error")]
    return rows


def _panel_key(r):
    return (int(r["world"]), int(r["heads_q"]), int(r["heads_kv"]), r["causal"], r["pass"], r.get("window") or "")


def _single_key(r):
    return (r["device"], r["batch"], r["heads_q"], r["heads_kv"], r["head_dim"], r["dtype"], r["causal"], r["pass"],
            r.get("window") or "")


def _minor_label(y, _pos):
    """Label the 2x and 5x minor ticks of a log axis only (readable, enough to interpolate)."""
    if y <= 0:
        return ""
    mantissa = y / 10 ** math.floor(math.log10(y) + 1e-9)
    return f"{y:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def _fmt_len(n):
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_metric(rows, suffix, ylabel, value, logy, out_path, title):
    sp = [r for r in rows if r["algorithm"] != "single"]
    singles = [r for r in rows if r["algorithm"] == "single"]
    panels = sorted({_panel_key(r) for r in sp}, key=lambda k: (k[0], -k[2], k[3], k[4], int(k[5] or 0)))
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows + 0.7), squeeze=False)
    algs = [a for a in ALG_STYLE if any(r["algorithm"] == a for r in sp)]
    handles = {}
    for ax, key in zip(axes.flat, panels):
        W, hq, hkv, causal, p, win = key
        mine = [r for r in sp if _panel_key(r) == key]
        lens = sorted({int(r["seq_len"]) for r in mine})
        for a in algs:
            pts = sorted((int(r["seq_len"]), value(r)) for r in mine if r["algorithm"] == a)
            pts = [(x, y) for x, y in pts if y is not None and (y > 0 or not logy)]
            if not pts:
                continue
            color, marker = ALG_STYLE[a]
            # auto runs ring or token_ring: dotted with open markers, so the line it sits on shows
            style = dict(ls=":", lw=2.2, mfc="none", ms=8, zorder=3) if a == "auto" else \
                dict(ls="--", lw=1.2, ms=6) if a in PEERS else dict(lw=1.6, ms=5)
            h, = ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, marker=marker, label=a, **style)
            handles[a] = h
        if suffix == "overlap" and not any(len(line.get_xdata()) for line in ax.get_lines()):
            ax.text(0.5, 0.5, "not resolvable here\n(messages within the noise)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="grey")
        if suffix in ("time", "tflops"):
            ref = {(_single_key(r), int(r["seq_len"])): r for r in singles}
            pts = []
            for L in lens:
                r0 = next(r for r in mine if int(r["seq_len"]) == L)
                s = ref.get((_single_key(r0), L))
                y = value(s) if s else None
                if y is not None:
                    pts.append((L, y))
            if pts:
                h, = ax.plot([x for x, _ in pts], [y for _, y in pts], color="black", ls="--", lw=1.4,
                             label="single process (full sequence)")
                handles["single"] = h
        if suffix == "ratio":
            ax.axhline(TARGET_RATIO, color="grey", ls="--", lw=1)
            ax.text(0.02, TARGET_RATIO, f" target {TARGET_RATIO}", color="grey",
                    fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
            ax.axhline(1.0, color="lightgrey", lw=0.8)
            ax.set_ylim(bottom=0)
        if suffix == "overlap":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.xaxis.set_major_locator(FixedLocator(lens))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_fmt_len(x) for x in lens])
        if len(lens) == 1:
            ax.set_xlim(lens[0] / 1.5, lens[0] * 1.5)
        else:
            ax.set_xlim(lens[0] / 1.3, lens[-1] * 1.3)
        ax.set_title(f"W={W}  {'MHA' if hq == hkv else 'GQA'} {hq}/{hkv}  {'causal' if causal == 'True' else 'full'}"
                     f"{f' w={win}' if win else ''}  {p}",
                     fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(which="both", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("global sequence length", fontsize=8)
    if not handles:  # no row has this metric (e.g. overlap with --overlap-iters 0): no PNG
        plt.close(fig)
        return None
    order = [a for a in ALG_STYLE if a in handles]
    fig.legend([handles[a] for a in order], [handles[a].get_label() for a in order], loc="upper center",
               ncol=len(order), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0 - 0.05 / nrows))
    fig.suptitle(title, fontsize=9, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.1 / nrows))
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


TW_TARGET = 1.3  # issue 6: fused >= 1.3x the unfused sequence at >= 1024 tokens (and never slower)
TW_SERIES = [  # (column, label, colour, marker)
    ("fused_us", "fused (residual full)", "tab:blue", "o"),
    ("fused_shard_us", "fused (residual sharded)", "tab:green", "^"),
    ("unfused_us", "unfused: symm-mem all-reduce + add_rmsnorm", "black", "s"),
]


def is_tokenweave_csv(path) -> bool:
    """perf/bench_tokenweave.py's bench_tokenweave_fused.csv (rather than a sweep CSV)."""
    with open(path, newline="") as f:
        return "fused_us" in (next(csv.reader(f), None) or [])


def plot_tokenweave(rows, out_path, title):
    """bench_tokenweave_fused.csv: us per call vs tokens (log-log) and the speedup over the unfused
    sequence, one column of panels per (hidden, CTA cap)."""
    panels = sorted({(int(r["hidden"]), int(r["max_ctas"])) for r in rows})
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(3.8 * len(panels), 5.6), squeeze=False, sharex="col")
    handles = {}
    for c, (hidden, cap) in enumerate(panels):
        mine = sorted((r for r in rows if (int(r["hidden"]), int(r["max_ctas"])) == (hidden, cap)),
                      key=lambda r: int(r["tokens"]))
        toks = [int(r["tokens"]) for r in mine]
        top, bottom = axes[0, c], axes[1, c]
        for col, label, color, marker in TW_SERIES:
            pts = [(int(r["tokens"]), _f(r.get(col))) for r in mine]
            pts = [(x, y) for x, y in pts if y is not None and y > 0]
            if pts:
                handles[label], = top.plot(*zip(*pts), color=color, marker=marker, ms=4, lw=1.4, label=label)
        for col, color, marker in (("speedup", "tab:blue", "o"), ("speedup_shard", "tab:green", "^")):
            pts = [(int(r["tokens"]), _f(r.get(col))) for r in mine]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                bottom.plot(*zip(*pts), color=color, marker=marker, ms=4, lw=1.4)
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.axhline(TW_TARGET, color="grey", ls="--", lw=1)
        bottom.text(0.02, TW_TARGET, f" target {TW_TARGET}x at >= 1024 tokens", color="grey", fontsize=7,
                    va="bottom", transform=bottom.get_yaxis_transform())
        bottom.set_ylim(bottom=0)
        top.set_yscale("log")
        top.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        top.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        top.set_title(f"hidden {hidden}, CTAs <= {cap}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(toks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([_fmt_len(x) for x in toks], rotation=90 if len(toks) > 8 else 0)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(which="both", labelsize=7)
        bottom.set_xlabel("tokens", fontsize=8)
    axes[0, 0].set_ylabel("us per call (slowest rank)", fontsize=8)
    axes[1, 0].set_ylabel("speedup over unfused", fontsize=8)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=9, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="sweep CSV(s)")
    ap.add_argument("--out", help="folder for the PNGs (default: the first CSV's folder)")
    ap.add_argument("--prefix", help="PNG name prefix (default: the first CSV's name)")
    args = ap.parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.csv[0]))
    prefix = args.prefix or os.path.basename(args.csv[0])[:-4]
    if is_tokenweave_csv(args.csv[0]):  # perf/bench_tokenweave.py's fused-op CSV
        rows = read_rows(args.csv)
        if not rows:
            sys.exit("plot.py: no rows in " + ", ".join(args.csv))
        os.makedirs(out, exist_ok=True)
        meta = os.path.join(os.path.dirname(os.path.abspath(args.csv[0])), "bench_tokenweave.json")
        device = ""
        if os.path.exists(meta):
            import json
            with open(meta) as f:
                m = json.load(f).get("meta", {})
            device = f"{m.get('device', '')}, torch {m.get('torch', '')}; "
            if m.get("device") == "cpu-smoke":
                device = "cpu-smoke (host simulation: a flow check, NOT a measurement); "
        title = (f"{device}fused AllReduce + residual + RMSNorm, {rows[0]['world']} ranks, bf16, "
                 f"us per call in CUDA graphs")
        p = plot_tokenweave(rows, os.path.join(out, f"{prefix}.png"), title)
        print(f"wrote {p}")
        return [p]
    rows = read_rows(args.csv)
    if not rows:
        sys.exit("plot.py: no rows without errors in " + ", ".join(args.csv))
    os.makedirs(out, exist_ok=True)
    devices = sorted({r["device"] for r in rows})
    dates = sorted({r["date"][:10] for r in rows})
    transports = sorted({r["transport"] for r in rows if r["algorithm"] != "single"})
    dtype = sorted({r["dtype"] for r in rows})
    dims = sorted({r["head_dim"] for r in rows})
    title = (f"{' | '.join(devices)}; transport {','.join(transports)}; {','.join(dtype)}, D={','.join(dims)}, "
             f"layout {','.join(sorted({r['layout'] for r in rows if r['layout']}))}; {','.join(dates)}")
    written = []
    for suffix, ylabel, value, logy in METRICS:
        p = plot_metric(rows, suffix, ylabel, value, logy, os.path.join(out, f"{prefix}_{suffix}.png"), title)
        if p:
            written.append(p)
            print(f"wrote {p}")
    return written


if __name__ == "__main__":
    main()
