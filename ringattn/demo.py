"""ringattn's main job: train a small Llama-style model on one long synthetic sequence with
sequence parallelism, and check the first step's loss against the unsharded model.

    python -m ringattn.demo                                # 4 CPU ranks (spawned here, gloo), seq 8192
    bash scripts/demo.sh                                   # the same under torchrun (4 ranks)
    launch/torchrun.sh 4 -m ringattn.demo --seq 4096       # by hand
    launch/mpirun.sh 4 -m ringattn.demo                    # mpirun + mpi4py bootstrap
    launch/deepspeed.sh 4 --deepspeed 1                    # DeepSpeed launcher + ZeRO-1 engine
    python -m ringattn.demo --ranks 2 --algorithm token_ring --layout contiguous --steps 5

The model is a transformers LlamaForCausalLM built from a LlamaConfig in code (random init, no
download), wrapped by ringattn.integrations.huggingface.apply_sequence_parallel. Every rank
holds its shard of the sequence (zigzag by default); attention runs ring / TokenRing /
Ulysses x ring across the ranks. Before training, rank 0 runs the unsharded model (same
weights) on the whole sequence: the first step's sequence-parallel loss must match it.
Prints tokens/s, peak memory, bytes communicated per rank and the loss. Then it serves: the
trained model generates --generate tokens after the first half of the sequence (sequence-
parallel prefill, KV cache sharded over the ranks, decode over every rank's cache), checked
against transformers' own generate() of the unsharded model. Exits non-zero on a mismatch. With CUDA GPUs: NCCL, one rank per GPU, bf16 and a bigger default model/sequence.
"""
from __future__ import annotations

import argparse
import copy
import math
import multiprocessing as mp
import os
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist

# Defaults: (CPU, gloo) finishes in well under 2 minutes on 2 cores with 4 ranks;
# (GPU, NCCL) is a bigger model and sequence.
CPU_DEFAULTS = dict(seq=8192, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512, steps=4)
GPU_DEFAULTS = dict(seq=65536, hidden=1024, layers=4, heads=16, kv_heads=4, intermediate=2816, vocab=32000, steps=10)
QUICK = dict(seq=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128, steps=2)
# First-step loss vs. the unsharded model: a mean over all tokens of fp32 (resp. bf16) values,
# accumulated in a different order on W ranks -> fp32 agrees to ~1e-6, bf16 to ~1e-2.
LOSS_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=None,
                   help="ranks to spawn when started without a launcher (default: 4 on CPU, #GPUs with CUDA)")
    p.add_argument("--seq", type=int, help="global sequence length (tokens)")
    p.add_argument("--hidden", type=int, help="model width")
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA when < heads)")
    p.add_argument("--intermediate", type=int, help="MLP width")
    p.add_argument("--vocab", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--algorithm", default="auto",
                   choices=["auto", "ring", "token_ring", "ulysses", "ulysses+ring", "ulysses+token_ring"])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--ulysses-size", type=int, default=None, help="2-D mode: ranks per Ulysses group")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--deepspeed", type=int, metavar="ZERO_STAGE", choices=[1, 2, 3], default=None,
                   help="train through a DeepSpeed engine with this ZeRO stage")
    p.add_argument("--no-check", action="store_true", help="skip the unsharded reference loss")
    p.add_argument("--generate", type=int, default=8, metavar="N",
                   help="after training, generate N tokens from the first half of the sequence (sequence-"
                        "parallel prefill, sharded KV cache) and check them against the unsharded model "
                        "(0: skip; not with --deepspeed)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (launcher smoke test)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0 and os.environ.get("RINGATTN_DIST_BACKEND") != "gloo"
    defaults = QUICK if args.quick else GPU_DEFAULTS if gpu else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dtype is None:
        args.dtype = "bfloat16" if gpu and not args.quick else "float32"
    if args.ranks is None:
        args.ranks = torch.cuda.device_count() if gpu else 4
    return args


def build_model(args, dtype):
    """Llama-style causal LM from a config built here (random init, same weights on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048), rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        attn_implementation="sdpa", use_cache=False, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def synthetic_sequence(seq: int, vocab: int, period: int = 97) -> torch.Tensor:
    """(1, seq) tokens: a random motif of `period` tokens repeated with 10% noise, so there is
    something to learn from far back in the sequence (copy from t - period)."""
    g = torch.Generator().manual_seed(1234)
    motif = torch.randint(0, vocab, (period,), generator=g)
    ids = motif.repeat(seq // period + 1)[:seq].clone()
    noise = torch.rand(seq, generator=g) < 0.1
    ids[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return ids.unsqueeze(0)


def _peak_mem_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class CommBytes:
    """Bytes this rank sent: the sequence-parallel attention's point-to-point traffic
    (ringattn.accounting), the Ulysses all-to-alls of the 2-D mode, and the gradient all-reduce
    (its payload; what the all-reduce algorithm puts on the wire depends on the backend)."""

    def __init__(self):
        self.grad_bytes = 0

    @staticmethod
    def attn_bytes() -> int:
        from ringattn import accounting
        from ringattn.integrations.deepspeed import a2a_bytes_sent

        return accounting.bytes_sent() + a2a_bytes_sent()


def _fmt_bytes(n: float) -> str:
    if n < 0:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def train(args, info) -> int:
    import ringattn.integrations.huggingface as rhf

    rank, world, dev = info.rank, info.world_size, info.device
    dtype = getattr(torch, args.dtype)
    launcher = os.environ.get("RINGATTN_DEMO_LAUNCHER", info.launcher)
    u = args.ulysses_size or (math.gcd(world, args.kv_heads) if args.algorithm.startswith("ulysses+") else 1)
    msg = rhf.seq_len_error(args.seq, world, args.layout, args.algorithm, u)
    if msg:
        raise SystemExit(msg + " (--seq)")

    model = build_model(args, dtype).to(dev)
    input_ids = synthetic_sequence(args.seq, args.vocab).to(dev)
    labels = input_ids.clone()
    n_params = sum(p.numel() for p in model.parameters())

    # The unsharded reference: rank 0 runs the same weights on the whole sequence.
    ref_loss = torch.zeros((), dtype=torch.float64, device=dev)
    if not args.no_check:
        if rank == 0:
            ref = copy.deepcopy(model)
            with torch.no_grad():
                ref_loss += ref(input_ids=input_ids, labels=labels).loss.double()
            del ref
        dist.broadcast(ref_loss, src=0)

    rhf.apply_sequence_parallel(model, algorithm=args.algorithm, layout=args.layout,
                                ulysses_size=args.ulysses_size if args.algorithm.startswith("ulysses+") else None)
    plan = model.ringattn_plan
    batch = rhf.shard_batch(model, input_ids, labels)
    del input_ids, labels
    comm = CommBytes()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.deepspeed:
        from ringattn.integrations.deepspeed import initialize_engine

        engine = initialize_engine(model, torch.optim.AdamW(params, lr=args.lr), zero_stage=args.deepspeed)
        step_fn = engine
        comm.grad_bytes = -1  # DeepSpeed's own reduce-scatter / all-reduce: not counted here
    else:
        engine, step_fn = None, model
        opt = torch.optim.AdamW(params, lr=args.lr)

    from tqdm.auto import tqdm

    # What the attention should send: ringattn's byte model for the algorithm auto picks (1-D).
    alg_used, predicted = args.algorithm, [-1] * world
    if not plan.is_2d:
        from ringattn.sequence_parallel import choose_algorithm, predict_comm_bytes

        shape = dict(seq_len=args.seq, world_size=world, layout=args.layout, causal=True, batch=1,
                     heads_q=args.heads, heads_kv=args.kv_heads, head_dim=args.hidden // args.heads, dtype=dtype)
        if alg_used == "auto":
            alg_used = choose_algorithm(**shape, device=dev.type).algorithm
        per_call = predict_comm_bytes(alg_used, **shape)
        predicted = [sum(sent for sent, _ in ch.values()) * args.layers * args.steps for ch in per_call]

    if rank == 0:
        print(f"ringattn demo: {world} ranks ({launcher}, {info.backend}), seq {args.seq}, "
              f"algorithm {args.algorithm}{f' -> {alg_used}' if alg_used != args.algorithm else ''} (layout {args.layout}{f', ulysses {plan.ulysses_size}' if plan.is_2d else ''}), "
              f"{args.dtype}, Llama {args.layers}x{args.hidden} heads {args.heads}/{args.kv_heads}, "
              f"{n_params / 1e6:.2f}M params{', DeepSpeed ZeRO-%d' % args.deepspeed if args.deepspeed else ''}",
              flush=True)
    losses, times = [], []
    attn_bytes0 = comm.attn_bytes()
    bar = tqdm(range(args.steps), desc="train", disable=rank != 0, file=sys.stdout, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        logits = step_fn(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        # DeepSpeed averages gradients over its ranks; by hand we sum them (see sequence_parallel_loss).
        loss = rhf.sequence_parallel_loss(logits, batch["labels"], grad_allreduce="mean" if engine else "sum")
        del logits
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            grads = [p.grad for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)  # sum over ranks: each rank's gradient covers its tokens only
            comm.grad_bytes += flat.numel() * flat.element_size()
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{args.seq / times[-1]:,.0f}")
    bar.close()
    attn_bytes = comm.attn_bytes() - attn_bytes0

    ok = True
    err = abs(losses[0] - ref_loss.item())
    tol = LOSS_TOL[dtype]
    if not args.no_check and not err <= tol * max(1.0, abs(ref_loss.item())):
        ok = False
    stats = torch.tensor([_peak_mem_bytes(dev), attn_bytes, comm.grad_bytes, sum(times)], dtype=torch.float64, device=dev)
    allstats = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(allstats, stats)
    if rank == 0:
        timed = times[1:] or times  # step 1 includes warm-up
        tok_s = args.seq * len(timed) / sum(timed)
        print(f"{'rank':>4} {'tokens':>7} {'peak mem':>11} {'attn bytes sent':>16} {'(predicted)':>12} "
              f"{'grad all-reduce':>16}")
        lens = plan.local_lengths(args.seq)
        for r, s in enumerate(allstats):
            print(f"{r:>4} {lens[r]:>7} {_fmt_bytes(s[0].item()):>11} {_fmt_bytes(s[1].item()):>16} "
                  f"{_fmt_bytes(predicted[r]):>12} {_fmt_bytes(s[2].item()):>16}")
        print(f"loss per step: {' '.join(f'{x:.4f}' for x in losses)}")
        print(f"throughput: {tok_s:,.0f} tokens/s ({sum(times):.1f} s for {args.steps} steps of {args.seq} tokens)")
        if args.no_check:
            print("reference check skipped (--no-check)")
        else:
            print(f"step-1 loss {losses[0]:.6f} vs unsharded model {ref_loss.item():.6f}: |diff| {err:.2e} (tol {tol:.0e})")
    gen_ok = serve(args, model, info, dtype) if args.generate and not args.deepspeed else True
    if rank == 0:
        print("demo OK" if ok and gen_ok else "demo FAILED: " + (
            "first-step loss differs from the unsharded model" if not ok else "generated tokens differ"))
    return 0 if ok and gen_ok else 1


def _agreement(tokens, ref, prompt_len: int):
    """(row 0's generated tokens, how many of them from the start equal the reference's)."""
    new, ref_new = tokens[0, prompt_len:], ref[0, prompt_len:]
    return new, int((new == ref_new).cumprod(0).sum())


def serve(args, model, info, dtype) -> bool:
    """Generate args.generate tokens after a prompt of half the sequence with the trained model:
    sequence-parallel prefill, the KV cache sharded over the ranks, each decode step's attention
    over every rank's cache (ringattn.sharded_kv_attention). Rank 0 then unwraps the model and
    runs transformers' own generate() on the whole prompt: the tokens must match in fp32 (bf16
    rounding can flip a near-tie, so there the agreement is reported, not required)."""
    import ringattn.integrations.huggingface as rhf

    rank, dev = info.rank, info.device
    prompt = synthetic_sequence(args.seq, args.vocab)[:, : max(args.seq // 2, model.ringattn_plan.min_seq_len())].to(dev)
    model.eval()
    t0 = time.perf_counter()
    tokens = rhf.generate(model, prompt, max_new_tokens=args.generate)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - t0
    ref = torch.zeros_like(tokens)
    if rank == 0:
        rhf.remove_sequence_parallel(model)
        model.generation_config.eos_token_id = None  # exactly N greedy tokens, as rhf.generate without eos
        model.generation_config.pad_token_id = 0
        with torch.no_grad():
            ref.copy_(model.generate(prompt, max_new_tokens=args.generate, do_sample=False, use_cache=True))
    dist.broadcast(ref, src=0)
    new, agree = _agreement(tokens, ref, prompt.shape[1])
    ok = agree == len(new) or dtype != torch.float32
    if rank == 0:
        print(f"generate: prompt {prompt.shape[1]} tokens prefilled over {info.world_size} ranks (KV cache sharded), "
              f"{len(new)} new tokens in {took:.2f} s; {agree}/{len(new)} equal to the unsharded model's "
              f"generate(){'' if dtype == torch.float32 else ' (bf16: reported, not required)'}")
        print(f"  tokens: {new.tolist()}")
    return serve_tensor_parallel(args, model, info, dtype, prompt, ref) and ok


def serve_tensor_parallel(args, model, info, dtype, prompt, ref) -> bool:
    """The same trained weights served tensor-parallel over every rank: each decoder layer a
    TokenWeave layer (ringattn.apply_tokenweave, fuse_layers=True: fused AllReduce + residual +
    RMSNorm, the residual sharded between layers; 1/W of the layers' weights and of the KV cache
    per rank), transformers' own generate() on every rank. Its tokens must equal the unsharded
    model's in fp32 (bf16: reported)."""
    import copy

    import ringattn.integrations.huggingface as rhf
    from ringattn.tokenweave import apply_tokenweave, fused_allreduce_rmsnorm_path

    rank, world, cfg = info.rank, info.world_size, model.config
    try:  # refused alike on every rank when the ranks do not divide the heads / MLP width
        tp = apply_tokenweave(copy.deepcopy(rhf.remove_sequence_parallel(model)), fuse_layers=True)
    except ValueError as e:
        if rank == 0:
            print(f"tensor-parallel generate: skipped ({e})")
        return True
    tp.generation_config.eos_token_id = None
    tp.generation_config.pad_token_id = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens = tp.generate(prompt, max_new_tokens=args.generate, do_sample=False, use_cache=True)
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - t0
    new, agree = _agreement(tokens, ref, prompt.shape[1])
    path = fused_allreduce_rmsnorm_path(prompt.shape[1], cfg.hidden_size, dtype, device=info.device)
    if rank == 0:
        print(f"generate (tensor parallel, TokenWeave layers over {world} ranks, fused path {path}): "
              f"{len(new)} new tokens in {took:.2f} s; {agree}/{len(new)} equal to the unsharded model's "
              f"generate(){'' if dtype == torch.float32 else ' (bf16: reported, not required)'}")
    return agree == len(new) or dtype != torch.float32


def _spawned_main(rank, world, port, argv, conn):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RINGATTN_DEMO_LAUNCHER="spawn")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    conn.send(code)


def _spawn(args, argv) -> int:
    """No launcher: start args.ranks processes here (env:// rendezvous on a free local port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = []
    for r in range(args.ranks):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_spawned_main, args=(r, args.ranks, port, argv, child))
        p.start()
        procs.append((p, parent))
    codes = [None] * len(procs)
    while any(c is None for c in codes):
        for i, (p, conn) in enumerate(procs):
            if codes[i] is None and not p.is_alive():
                codes[i] = conn.recv() if conn.poll() else (p.exitcode or 1)
                if codes[i]:  # one rank failed: the others would wait for it in a collective
                    for q, _ in procs:
                        if q.is_alive():
                            q.terminate()
        time.sleep(0.05)
    return max(int(c) for c in codes)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from ringattn.distributed import detect_launcher, init_distributed

    if detect_launcher() == "single" and args.ranks > 1:
        # Fail fast on a bad length before starting any process.
        import ringattn.integrations.huggingface as rhf

        u = args.ulysses_size or (math.gcd(args.ranks, args.kv_heads) if args.algorithm.startswith("ulysses+") else 1)
        msg = rhf.seq_len_error(args.seq, args.ranks, args.layout, args.algorithm, u)
        if msg:
            raise SystemExit(msg + " (--seq / --ranks)")
        return _spawn(args, argv)
    info = init_distributed()
    try:
        rc = train(args, info)
        dist.barrier()  # no rank's collective is still in flight when the groups go
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return rc


def _exit_now(code: int) -> None:
    """Leave without interpreter finalization. A gloo worker thread that drops the last reference
    to a tensor after Python began finalizing aborts the process ("terminate called without an
    active exception", exit 134/250: seen in CI under mpirun and the DeepSpeed launcher after
    "demo OK"), an open torch race (pytorch/pytorch#190489). The groups are already destroyed
    and everything is flushed first."""
    mpi = sys.modules.get("mpi4py.MPI")  # mpirun counts a rank that skips MPI_Finalize as failed
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
