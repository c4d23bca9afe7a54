#!/usr/bin/env python3
"""The dry-run table: 7B-70B at 64 ranks on 80 GB and 141 GB devices, C before and after the reserve.

Each row is one ``python -m flexsp.dryrun`` subprocess (ONE CPU process acting as rank 0 of a fake
64-rank world; the model built on ``meta`` and sharded exactly as training shards it; nothing is
materialised), with the default ``dryrun`` section (``configs/dryrun/default.yaml``: reserve_gb,
8 devices per node, 512 ``github`` sequences of at most 131,072 tokens, a 2 s planner time box)
except the device memory. Two HSDP rows (shard within 8-rank nodes) at 80 GB are added: the 70B
one does not fit, and its row says what does. Every number is PREDICTED by the dry run (measured
bytes of the sharded meta model and of a meta forward; an analytic roofline for the times), not
measured on a GPU.

    .venv/bin/python benchmarks/dryrun_table.py            # ~3 min on 2 loaded cores
    .venv/bin/python benchmarks/dryrun_table.py --quick    # 7b only (a check of the script)

Writes ``benchmarks/results/dryrun_64.md`` and ``dryrun_64.json`` (the reports, the plans' group
lists dropped), stamped with the commit, the machine and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import stamp as provenance  # noqa: E402  (benchmarks/stamp.py)
from flexsp.dryrun_report import table  # noqa: E402

MODELS = ("7b", "13b", "30b", "70b")
DEVICES_GB = (80, 141)          # an H100 / A100 80 GB; an H200 141 GB
HSDP_ROWS = (("7b", 80, 8), ("70b", 80, 8))
WORLD = 64


def rows(quick: bool) -> list[tuple[str, int, int]]:
    """(model, device GB, HSDP shard size or 0) of every row."""
    models = MODELS[:1] if quick else MODELS
    plain = [(m, gb, 0) for gb in DEVICES_GB for m in models]
    return plain + [r for r in HSDP_ROWS if r[0] in models]


def dry_run(model: str, gb: int, shard: int, out: Path) -> tuple[list[str], int]:
    """Run one dry run; (its overrides, exit status: 0 fits, 4 does not)."""
    overrides = [f"model={model}", f"dryrun.world_size={WORLD}", f"dryrun.device_memory_gb={gb}",
                 *([f"parallel.shard_size={shard}"] if shard else []), f"output_dir={out}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "flexsp.dryrun", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode not in (0, 4):
        raise RuntimeError(f"flexsp.dryrun {' '.join(overrides)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return overrides, proc.returncode


def _drop_groups(report: dict) -> dict:
    plan = report.get("plan") or {}
    plan.pop("plan", None)
    return report


def markdown(st: provenance.Stamp, runs: list[dict], tab: str) -> str:
    import torch
    r0 = runs[0]["report"]
    res = r0["reserve"]
    lines = [
        f"# flexsp-dryrun at {WORLD} ranks: 7B-70B on 80 GB and 141 GB devices, C before and after the "
        f"reserve", "",
        provenance.markdown_block(st),
        f"Python {platform.python_version()}, torch {torch.__version__}, no GPU. The dry-run and solve times "
        "are wall times on the shared machine of the stamp (loaded times).",
        "",
        "Every row is ONE CPU process acting as rank 0 of a fake 64-rank world (`fake` process group): the "
        "model is built on `meta` and sharded exactly as training shards it (FSDP2; `train.precision=auto` "
        "-> `bf16`: fp32 master parameters, bf16 compute, fp32 reduce). Everything below is PREDICTED: bytes "
        "are measured on the sharded meta model and a meta forward, times come from an analytic roofline "
        "cost model (no profile of these models on this machine).", "",
        "Units: the device is given in GB (10^9 bytes, as `dryrun.device_memory_gb`; an \"80 GB\" device has "
        "74.51 GiB) and every per-rank figure in GiB (2^30). The reserve is `dryrun.reserve_gb` "
        f"= {res['fixed'] / 1e9:g} GB (CUDA context and library workspaces ~1, NCCL buffers ~2, allocator "
        "fragmentation ~3) plus the loss's transient chunk computed from the model (a chunk of "
        "2^25 // vocab tokens: the previous chunk's bf16 gradient + its fp32 logits + their fp32 "
        "softmax, or its gradient and the LM head's weight gradient in bf16 + fp32, whichever is "
        "larger; `tests/test_dryrun_sizing.py` checks it against the bytes a real backward allocates). "
        "**C before the reserve** fills the device with activations (what the earlier table, with "
        "\"80 GB\" read as 80 GiB, reported); "
        "**C after the reserve** is what the planner uses now. A model that does not fit exits with "
        "status 4 and its row names the smallest world size / HSDP shard size that fits.", "",
        "## Commands", "", "```bash",
        *[f"python -m flexsp.dryrun {' '.join(r['overrides'])}" for r in runs],
        "```", "",
        f"(`python` = `.venv/bin/python`.) Sampled batch: {r0['batch']['num_sequences']} "
        f"`{r0['batch']['workload']}` sequences of at most {r0['batch']['context_tokens']:,} tokens "
        f"(seed {r0['batch']['seed']}: {r0['batch']['tokens']:,} tokens, "
        f"longest {r0['batch']['longest']:,}), "
        f"planner time box "
        f"{r0['dryrun']['time_limit']:g} s. All reports: `benchmarks/results/dryrun_64.json` (the plans' "
        "group lists dropped).", "",
        "## Per rank", "", tab,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="7b rows only (a check of the script)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dryrun_64"),
                    help="output path without suffix (.md and .json are written)")
    args = ap.parse_args(argv)
    st = provenance.start(["python", "benchmarks/dryrun_table.py", *argv])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, gb, shard in rows(args.quick):
            out = Path(tmp) / f"{model}-{gb}gb{f'-hsdp{shard}' if shard else ''}"
            overrides, rc = dry_run(model, gb, shard, out)
            print(f"{' '.join(overrides[:-1])}: exit {rc}", flush=True)
            runs.append({"overrides": [o for o in overrides if not o.startswith("output_dir=")],
                         "exit_status": rc, "report": json.loads((out / "dryrun.json").read_text()),
                         "path": out})
        tab = table([r["path"] for r in runs])
    st = provenance.finish(st, cost_models={"analytic roofline": "`solver.presets.analytic_cost_model` of each "
                                            "model (flexsp.dryrun; no profile)"})
    for r in runs:
        r.pop("path")
        _drop_groups(r["report"])
    Path(args.out).with_suffix(".json").write_text(json.dumps({"stamp": provenance.to_json(st), "runs": runs}, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(st, runs, tab))
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
