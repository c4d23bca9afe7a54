"""CPU step time of the HF-native path vs the native path on the same Llama shape, side by side.

One process, one thread (``torch.set_num_threads``). A random ``LlamaForCausalLM`` of the given shape
is saved locally; ``flexsp.model.hf.from_hf`` loads it twice: ``hf_native=False`` (the native
``Transformer``) and ``hf_native=True`` (transformers' modules with FlexSP's attention and loss,
flexsp.model.hf_native). Both get the same packed batches (documents of random lengths, per-document
positions, next-token labels, ``AttnContext.local``) and an AdamW each (same hyper-parameters). A
step = forward + backward (``loss_sum / targets``) + AdamW step + zero_grad, timed with
``time.perf_counter``. Steps are interleaved: batch i runs on native then HF-native, batch i+1 on
HF-native then native, and so on, so load drift and order hit both alike. The first ``--warmup``
steps of each path are excluded. Reported: median, p10/p90, min and mean step ms per path; the ratio
of the medians; the median of the per-batch paired ratios; |loss difference| per step (same
weights and math, so only rounding: it shows both paths compute the same thing).

    python benchmarks/hf_native_vs_native.py --steps 40 --out benchmarks/results/hf_native_vs_native_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import stamp as provenance  # noqa: E402  (benchmarks/stamp.py)


def make_checkpoint(a, path: Path) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=8192,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(a.seed)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(str(path))


def batches(a):
    """Packed batches: documents of uniform random length in [min_doc, max_doc] up to ``tokens``."""
    import torch

    from flexsp.model import lm_labels, positions_from_cu_seqlens

    g = torch.Generator().manual_seed(a.seed + 1)
    out = []
    for _ in range(a.steps):
        cu = [0]
        while cu[-1] < a.tokens:
            n = int(torch.randint(a.min_doc, a.max_doc + 1, (1,), generator=g))
            cu.append(min(a.tokens, cu[-1] + n))
        ids = torch.randint(0, a.vocab, (a.tokens,), generator=g)
        out.append((ids, positions_from_cu_seqlens(cu), lm_labels(ids, cu), cu))
    return out


def step(model, opt, batch) -> tuple[float, float]:
    import torch

    from flexsp.model import AttnContext

    ids, pos, labels, cu = batch
    t0 = time.perf_counter()
    loss_sum, count = model(ids, pos, AttnContext.local(cu), labels=labels)
    loss = loss_sum / count
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    assert torch.isfinite(loss)
    return dt, float(loss.detach())


def stats(xs: list[float]) -> dict:
    s = sorted(xs)
    q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
    return {
        "median_ms": statistics.median(s) * 1e3,
        "p10_ms": q[0] * 1e3,
        "p90_ms": q[-1] * 1e3,
        "min_ms": s[0] * 1e3,
        "mean_ms": statistics.fmean(s) * 1e3,
        "n": len(s),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per packed batch")
    p.add_argument("--min-doc", type=int, default=64)
    p.add_argument("--max-doc", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help="batches (steps per path)")
    p.add_argument("--warmup", type=int, default=3, help="first steps per path left out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/hf_native_vs_native_cpu")
    a = p.parse_args(argv)
    import torch
    import transformers

    from flexsp.model.hf import from_hf

    torch.set_num_threads(a.threads)
    stamp = provenance.start(None if argv is None else ["python", "benchmarks/hf_native_vs_native.py", *argv])
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(a, Path(d))
        models = {
            "native": from_hf(d, dtype=torch.float32, hf_native=False),
            "hf_native": from_hf(d, dtype=torch.float32, hf_native=True),
        }
    assert type(models["native"]).__name__ == "Transformer"
    assert type(models["hf_native"]).__name__ == "HFNativeModel"
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    times = {k: [] for k in models}
    losses = {k: [] for k in models}
    loads = []
    for i, batch in enumerate(batches(a)):
        order = ("native", "hf_native") if i % 2 == 0 else ("hf_native", "native")
        for k in order:
            dt, loss = step(models[k], opts[k], batch)
            times[k].append(dt)
            losses[k].append(loss)
        loads.append(os.getloadavg()[0])
    kept = {k: v[a.warmup :] for k, v in times.items()}
    res = {k: stats(v) for k, v in kept.items()}
    paired = [h / n for h, n in zip(kept["hf_native"], kept["native"])]
    stamp = provenance.finish(stamp)
    out = {
        "stamp": provenance.to_json(stamp),
        "software": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{a.threads} thread(s)",
        "shape": {
            k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
        },
        "batch": {
            "tokens": a.tokens,
            "doc_lengths": [a.min_doc, a.max_doc],
            "steps": a.steps,
            "warmup": a.warmup,
        },
        "loadavg_1min_per_step": loads,
        "results": res,
        "ratio_of_medians": res["hf_native"]["median_ms"] / res["native"]["median_ms"],
        "paired_ratio": {"median": statistics.median(paired), "min": min(paired), "max": max(paired)},
        "max_abs_loss_diff": max(abs(x - y) for x, y in zip(losses["native"], losses["hf_native"])),
        "losses": losses,
        "step_s": times,
    }
    write(out, Path(a.out))
    keys = ("results", "ratio_of_medians", "paired_ratio", "max_abs_loss_diff")
    print(json.dumps({k: out[k] for k in keys}, indent=1))
    return 0


def write(r: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    s, b = r["shape"], r["batch"]
    rows = "\n".join(
        f"| {k} | {v['median_ms']:.1f} | {v['p10_ms']:.1f} - {v['p90_ms']:.1f} | "
        f"{v['min_ms']:.1f} | {v['mean_ms']:.1f} | {v['n']} |"
        for k, v in r["results"].items()
    )
    st = r["stamp"]
    loads = r["loadavg_1min_per_step"]
    pr = r["paired_ratio"]
    md = f"""# CPU step time: HF-native path vs native path, same Llama shape (measured)

{provenance.markdown_block(provenance.Stamp(**st))}
Software: {r["software"]}. 1-minute load average {st["loadavg_start"][0]:.2f} at the start,
{st["loadavg_end"][0]:.2f} at the end, {min(loads):.2f}-{max(loads):.2f} during the steps. **The machine is
shared (other jobs ran on its 2 cores), which inflates and scatters every timing**; steps are
interleaved (native, HF-native, then HF-native, native, ...) so load drift hits both paths alike,
and the paired per-batch ratio is the load-robust number.

Model: LlamaForCausalLM hidden {s["hidden"]}, {s["layers"]} layers, {s["heads"]} heads /
{s["kv_heads"]} KV heads, intermediate {s["intermediate"]}, vocab {s["vocab"]}, fp32, loaded from the
same local random checkpoint by `from_hf(hf_native=False)` (flexsp.model.Transformer) and
`from_hf(hf_native=True)` (transformers' modules, FlexSP attention and loss). Batches:
{b["steps"]} packed batches of {b["tokens"]} tokens, documents of {b["doc_lengths"][0]}-{b["doc_lengths"][1]}
tokens, the same batches for both; a step = forward + backward + AdamW + zero_grad in one
process; the first {b["warmup"]} steps per path left out.

| path | median step ms | p10 - p90 ms | min ms | mean ms | steps |
|---|---|---|---|---|---|
{rows}

**HF-native / native: ratio of the medians {r["ratio_of_medians"]:.3f}; median of the per-batch
paired ratios {pr["median"]:.3f} (range {pr["min"]:.3f}-{pr["max"]:.3f}).** Same computation: max
|loss difference| over the steps {r["max_abs_loss_diff"]:.1e} (both paths start from the same
weights and take the same AdamW steps; fp32 rounding is the only allowed difference, 0 =
bit-identical).
"""
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
