"""Time and bytes moved by sequence-parallel attention, per mode and degree.

Spawns ``degree`` ranks (gloo on CPU, NCCL on CUDA when present), packs random documents into
one buffer, and measures forward+backward of ``sp_attention`` (median of ``--iters``).
Bytes are counted by wrapping the torch.distributed calls the runtime uses (bytes *sent* by a
rank, all-to-all self-chunks excluded), forward and backward together, per rank (max).

    python benchmarks/attention.py --tokens 4096 --heads 8 --dim 64 \
        --out benchmarks/results/attention_cpu.md

On CPU all ranks share the machine's cores (threads per rank = cores / degree), so times
measure overheads and balance, not speed-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import stamp as provenance  # noqa: E402  (benchmarks/stamp.py)


def _count_bytes(counter):
    orig_a2a, orig_batch = dist.all_to_all_single, dist.batch_isend_irecv

    def a2a(out, inp, out_splits=None, in_splits=None, group=None, async_op=False):
        me = dist.get_rank(group)
        row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
        counter[0] += sum(s for p, s in enumerate(in_splits) if p != me) * row
        return orig_a2a(out, inp, out_splits, in_splits, group=group, async_op=async_op)

    def batch(ops):
        counter[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops
                          if op.op in (dist.isend,))
        return orig_batch(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = a2a, batch


def _worker(rank, world, port, cfg, q_out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from flexsp.attention import shard, sp_attention
    from flexsp.distributed import init_distributed

    torch.set_num_threads(max(1, cfg["threads"] // world))
    _, _, device = init_distributed()
    counter = [0]
    _count_bytes(counter)
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(cfg["tokens"] // 16, cfg["tokens"] // 2, (64,), generator=g)
    cu = [0]
    for n in lens.tolist():
        if cu[-1] + n > cfg["tokens"]:
            break
        cu.append(cu[-1] + n)
    cu.append(cfg["tokens"])
    dtype = getattr(torch, cfg["dtype"])
    H, Hkv, D = cfg["heads"], cfg["kv_heads"], cfg["dim"]
    q, k, v = (torch.randn(cfg["tokens"], h, D, generator=g).to(dtype)
               for h in (H, Hkv, Hkv))
    kw = {"ulysses_degree": cfg["ulysses_degree"]} if cfg["mode"] == "hybrid" else {}
    ql, meta = shard(q, cu, group, cfg["mode"], **kw)
    kl, vl = (shard(x, cu, group, cfg["mode"], meta=meta)[0] for x in (k, v))
    ql, kl, vl = (x.to(device).requires_grad_() for x in (ql, kl, vl))
    times = []
    for it in range(cfg["iters"] + 1):
        dist.barrier(group)
        counter[0] = 0
        t0 = time.perf_counter()
        out = sp_attention(ql, kl, vl, meta, group, cfg["mode"])
        out.backward(torch.ones_like(out))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if it:
            times.append(time.perf_counter() - t0)
    sent = torch.tensor([float(counter[0])])
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        q_out.put((t.item(), sent.item(), len(cu) - 1, meta.tokens_local))
    dist.destroy_process_group()


def run(cfg, world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_worker, args=(world, port, cfg, q), nprocs=world, start_method="spawn")
    return q.get(timeout=5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--degrees", default="1,2,4")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    a = ap.parse_args()
    stamp = provenance.start()
    base = dict(tokens=a.tokens, heads=a.heads, kv_heads=a.kv_heads, dim=a.dim, dtype=a.dtype,
                iters=a.iters, threads=os.cpu_count() or 1)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {os.cpu_count()} cores (gloo)"
    rows = []
    for d in (int(x) for x in a.degrees.split(",")):
        runs = [("local", "ulysses", None)] if d == 1 else \
            [("ulysses", "ulysses", None), ("ring", "ring", None)] + \
            ([(f"hybrid u={d // 2} r=2", "hybrid", d // 2)] if d >= 4 else [])
        for label, mode, u in runs:
            t, sent, ndocs, tl = run(dict(base, mode=mode, ulysses_degree=u), d)
            rows.append(f"| {label} | {d} | {tl} | {t * 1e3:.1f} | {sent / 2**20:.2f} |")
            print(rows[-1], flush=True)
    stamp = provenance.finish(stamp)
    text = "\n".join([
        f"# SP attention, forward+backward ({dev})", "",
        provenance.markdown_block(stamp),
        f"MEASURED: torch {torch.__version__}. Timings taken on the machine of the stamp; on a shared machine "
        "other jobs' load (load averages in the stamp) inflates and scatters them. Bytes are counted, not timed.",
        "",
        f"{a.tokens} tokens in {ndocs} packed documents, {a.heads} heads ({a.kv_heads} kv) x "
        f"{a.dim}, {a.dtype}; median of {a.iters} iterations, slowest rank. "
        "MiB sent = bytes sent by the busiest rank (fwd+bwd). On CPU the ranks share the cores, "
        "so time shows overhead/balance, not speed-up.", "",
        "| mode | degree | tokens/rank | fwd+bwd ms | MiB sent/rank |",
        "|---|---|---|---|---|", *rows, ""])
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
