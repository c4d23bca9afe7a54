"""``flexsp-dryrun``'s summary and the markdown table of several dry runs (from their dryrun.json).

Units as printed: the device in GB (10^9 bytes, as ``dryrun.device_memory_gb``) and GiB (2^30);
per-rank parts in GiB / MiB / KiB (powers of two).
"""

from __future__ import annotations

import json
from pathlib import Path

PROG = "flexsp-dryrun"
GIB = 2**30
MIB = 2**20
GB = 10**9


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _gib(n: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def device_text(n: int) -> str:
    """Device memory in both units: ``80 GB (74.51 GiB)``."""
    return f"{n / GB:g} GB ({n / GIB:.2f} GiB)"


def suggestion_text(r: dict) -> str:
    """What to do when the model does not fit (``r["fit_suggestion"]``, see dryrun_sizing.smallest_fit)."""
    s, world = r.get("fit_suggestion"), r["world_size"]
    hsdp = r["sharding"]["shard_size"] < world
    if s is None:
        return (
            f"no world size fits: the unsharded buffers ({_gib(r['per_rank_bytes']['unsharded'])}) and "
            f"the reserve ({_gib(r['reserve']['total'])}) leave no room for one token in "
            f"{device_text(r['device_memory_bytes'])}; use devices with more memory or a smaller "
            f"dryrun.reserve_gb"
        )
    c = f"C = {s['capacity_tokens']:,} tokens/rank"
    if s["world_size"] == world and s["shard_size"]:
        return f"it fits with parallel.shard_size={s['shard_size']} on these {world} ranks ({c})"
    where = f"{s['world_size']} ranks"
    if hsdp:
        where += " sharding over all of them (parallel.shard_size=0)"
    return f"the smallest world size that fits is {where} (dryrun.world_size={s['world_size']}: {c})"


def _per_rank_line(r: dict) -> str:
    b, act, u, res = r["per_rank_bytes"], r["activation"], r["unsharded_parts"], r["reserve"]
    ac = "on" if act["activation_checkpointing"] else "off"
    return " | ".join(
        [
            f"  per rank: params {_gib(b['params'])}",
            f"grads {_gib(b['grads'])}",
            f"optimizer {_gib(b['optimizer'])}",
            f"unsharded {_gib(b['unsharded'])} (backward of {u['phase']})",
            f"reserve {_gib(b['reserve'])} (dryrun.reserve_gb {res['fixed'] / GB:g} GB + loss chunk "
            f"{_gib(res['loss_chunk'])})",
            f"activations {_gib(b['activations'])} (C = {r['capacity_tokens']:,} tokens x "
            f"{act['bytes_per_token'] / MIB:.3f} MiB/token, AC {ac}; {r['capacity_tokens_no_reserve']:,} "
            "without "
            f"the reserve)",
            f"total {_gib(b['total'])} (reserve included) of {_gib(r['device_memory_bytes'])}: "
            f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
        ]
    )


def _plan_line(r: dict) -> str | None:
    bt, p = r["batch"], r["plan"]
    head = (
        f"  plan of one batch ({bt['workload']}, {bt['num_sequences']} sequences, {bt['tokens']:,} "
        f"tokens, longest {bt['longest']:,}): "
    )
    if p and "error" in p:
        return head + f"NONE: {p['error']}"
    if not p:
        return None
    extra = f", {p['speedup_over_static']}x over static SP" if "speedup_over_static" in p else ""
    return head + (
        f"{p['summary']}; predicted {p['predicted_ms']:.1f} ms (lower bound "
        f"{p['lower_bound_ms']:.1f}, gap {100 * p['gap']:.1f}%{extra}), {p['status']}, "
        f"solved in {p['solve_seconds']:.2f} s"
    )


def format_report(r: dict) -> str:
    m, cm = r["model"], r["cost_model"]
    lines = [
        f"{PROG}: {m['name']} ({_count(r['model_params'])} params) on {r['world_size']} ranks "
        f"({r['devices_per_node']}/node), {r['precision']}, FSDP2 mesh {r['sharding']['mesh']}, "
        f"device {device_text(r['device_memory_bytes'])}",
        _per_rank_line(r),
        f"  cost model: {cm['name'] or 'none'} ({cm['note']})",
    ]
    if r["activation"]["method"].startswith("FALLBACK"):
        lines.append(f"  activations per token: {r['activation']['method']}")
    plan = _plan_line(r)
    if plan:
        lines.append(plan)
    if not r["fits"]:
        lines.append(
            f"  DOES NOT FIT on {r['world_size']} x {device_text(r['device_memory_bytes'])}: "
            f"{suggestion_text(r)}"
        )
    lines.append(
        f"  dry run: {r['wall_seconds']:.1f} s, peak RSS {_gib(r['peak_rss_bytes'])} -> {r.get('path', '')}"
    )
    return "\n".join(lines)


TABLE_HEAD = (
    "| run | device | params + grads + optimizer | unsharded | reserve (fixed + loss chunk) "
    "| activations | total | fits | C before the reserve | C after the reserve | act/token "
    "| plan of the batch | predicted iteration | vs static SP=N | dry run: time, peak RSS |\n"
    + "|---" * 15
    + "|\n"
)


def _table_row(r: dict) -> str:
    b, plan, res = r["per_rank_bytes"], r["plan"] or {}, r["reserve"]
    mesh = "x".join(str(x) for x in r["sharding"]["mesh"])
    name = f"{r['model']['name']} {r['precision']} {r['world_size']} ranks, mesh {mesh}" + (
        "" if r["model"]["activation_checkpointing"] else ", AC off"
    )
    g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    if "error" in plan:
        summary, ms, vs = "none: " + plan["error"][:90], "-", "-"
    else:
        summary = f"{plan['summary']} ({plan['status']}, {plan['solve_seconds']:.2f} s)".replace("|", "\\|")
        ms = f"{plan['predicted_ms'] / 1000:.2f} s"
        vs = f"{plan['speedup_over_static']}x" if "speedup_over_static" in plan else "-"
    cells = [
        name,
        device_text(r["device_memory_bytes"]),
        g(b["params"] + b["grads"] + b["optimizer"]),
        g(b["unsharded"]),
        f"{g(b['reserve'])} ({res['fixed'] / GB:g} GB + {res['loss_chunk'] / GIB:.2f} GiB)",
        g(b["activations"]),
        g(b["total"]),
        "yes" if r["fits"] else f"**no**: {suggestion_text(r)}",
        f"{r['capacity_tokens_no_reserve']:,}",
        f"{r['capacity_tokens']:,}",
        f"{r['activation']['bytes_per_token'] / MIB:.3f} MiB",
        summary,
        ms,
        vs,
        f"{r['wall_seconds']:.1f} s, {r['peak_rss_bytes'] / MIB:.0f} MiB",
    ]
    return "| " + " | ".join(cells) + " |"


def table(paths) -> str:
    """A markdown table of dry runs: each path is a dryrun.json or its output_dir."""
    files = [Path(p) / "dryrun.json" if Path(p).is_dir() else Path(p) for p in paths]
    reports = [json.loads(f.read_text()) for f in files]
    return TABLE_HEAD + "\n".join(_table_row(r) for r in reports) + "\n"
