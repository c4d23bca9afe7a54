"""One section of the GPU check, run in its own process by benchmarks/gpu_check.py:

    python benchmarks/gpu_sections.py SECTION --result FILE --ctx FILE --out DIR --budget S [--smoke]

The section writes its :class:`gpu_common.SectionResult` to ``--result`` as it goes (so rows measured
before a kill survive) and returns 0 when it ran and its checks passed. ``--ctx`` holds what earlier
sections exported (the measured matmul peak). ``--budget``: seconds until the orchestrator kills this
process group; the section itself stops starting new work a few seconds earlier.

Sections here: env (device, versions, which packages came from carried wheels, bf16 matmul peak),
tests (``pytest -m gpu``), train (gpu_train_smoke.py); attention (gpu_attention.py), profile
(gpu_costfit.py) and fused_ops (gpu_fused.py) live in their own files. A test-only section, hang,
starts a child process and sleeps (the orchestrator's kill-at-budget is tested with it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from gpu_common import Deadline, SectionResult, bench, short_error, table  # noqa: E402

STOP_EARLY_S = 2.0
"""A section stops starting new work this many seconds before it is killed (the kill is the backstop)."""
PACKAGES = (("torch", "torch"), ("triton", "triton"), ("liger_kernel", "liger-kernel"), ("pytest", "pytest"),
            ("transformers", "transformers"), ("numpy", "numpy"), ("scipy", "scipy"),
            ("safetensors", "safetensors"), ("matplotlib", "matplotlib"), ("flash_attn", "flash-attn"))
"""(module, distribution) pairs whose version and origin the env section reports."""


# ----------------------------------------------------------------------------------------- env
def package_origin(module: str, dist: str, deps_dir: str | None) -> dict:
    """Version and origin of ``module`` without importing it: ``carried wheel`` when it resolves
    inside ``deps_dir`` (where gpu_check.sh installed the carried wheels), else ``image``."""
    import importlib.metadata
    import importlib.util
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return {"version": None, "origin": f"missing ({type(exc).__name__})"}
    if spec is None:
        return {"version": None, "origin": "missing"}
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    where = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
    carried = bool(deps_dir) and os.path.realpath(where).startswith(os.path.realpath(deps_dir))
    origin = f"carried wheel ({deps_dir})" if carried else "image"
    return {"version": version, "origin": origin, "path": where}


def section_env(cfg: dict, res: SectionResult, deadline: Deadline) -> None:
    import platform

    import torch

    from flexsp.attention import local as attn_local
    from flexsp.ops import liger_available
    device = cfg["device"]
    d = res.data
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        d["device_name"] = torch.cuda.get_device_name(device)
        d["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        d["memory_gib"] = round(prop.total_memory / 2**30, 1)
        d["cudnn"] = torch.backends.cudnn.version()
    else:
        d["device_name"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    d.update(python=platform.python_version(), cuda=torch.version.cuda, host=platform.node())
    deps = os.environ.get("FLEXSP_GPU_DEPS_DIR") or None
    d["packages"] = {mod: package_origin(mod, dist, deps) for mod, dist in PACKAGES}
    wheels = Path(os.environ.get("FLEXSP_WHEELS", REPO / "benchmarks" / "wheels"))
    d["wheels_dir"] = str(wheels)
    d["wheels"] = sorted(p.name for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    d["liger_usable"] = liger_available()
    d["attention_backends"] = list(attn_local.BACKENDS)
    d["attention_dispatch"] = attn_local.pick_backend(device, None)
    dyn = torch._dynamo.config
    d["dynamo_recompile_limit"] = getattr(dyn, "recompile_limit", getattr(dyn, "cache_size_limit", None))
    res.lines = [f"- device: {d['device_name']}" + (f", capability {d['capability']}, {d['memory_gib']} GiB, "
                                                     f"cuDNN {d['cudnn']}" if "capability" in d else ""),
                 f"- python {d['python']}, CUDA {d['cuda']}, host {d['host']}",
                 f"- flexsp attention backends {d['attention_backends']}; backend=None dispatches to "
                 f"{d['attention_dispatch']!r} here; liger usable: {d['liger_usable']}; dynamo recompile "
                 f"limit {d['dynamo_recompile_limit']}", "",
                 *table(["package", "version", "from"],
                        [(m, p["version"] or "-", p["origin"]) for m, p in d["packages"].items()]), "",
                 f"carried wheels in {wheels}: {', '.join(d['wheels']) or 'none'}"]
    res.flush()
    # bf16 matmul peak: the yardstick of every % below. n^3 matmuls in batches of `per` calls
    # between syncs (a host sync per call would cost ~1% at 8192^3).
    n, per = cfg["matmul_n"], cfg["matmul_per_batch"]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)

    def batch():
        for _ in range(per):
            torch.mm(a, b)
    t = bench(batch, device, deadline, warmup=2, min_iters=3, max_iters=5, min_time_s=0.05,
              quick=cfg["smoke"])
    flop = 2.0 * n**3 * per
    peak = flop / t.median / 1e12
    d["matmul"] = {"n": n, "calls_per_timing": per, **t.as_dict(), "tflops_median": peak,
                   "tflops_best": flop / t.low / 1e12}
    d["export"] = {"peak_tflops": peak}
    res.lines += ["", f"bf16 matmul {n}x{n}x{n}, {t.runs} timings of {per} calls: median {peak:.1f} TFLOP/s "
                  f"(best {flop / t.low / 1e12:.1f}). **Measured bf16 matmul peak: {peak:.1f} TFLOP/s** "
                  "(the median; every % of peak below is of this number)."]
    carried = [f"{m} {p['version']}" for m, p in d["packages"].items() if p["origin"].startswith("carried")]
    res.key = f"{d['device_name']}; bf16 peak {peak:.1f} TFLOP/s; from wheels: {', '.join(carried) or 'none'}"
    for mod, info in d["packages"].items():
        print(f"[env] {mod} {info['version'] or '-'}: {info['origin']} {info.get('path', '')}", flush=True)


# --------------------------------------------------------------------------------------- tests
OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def section_tests(cfg: dict, res: SectionResult, deadline: Deadline) -> None:
    """``pytest -m gpu`` in a child process (same process group: killed with this section), its
    outcomes parsed as they stream, so a kill at the budget still reports the tests that ran."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
           "--durations=8", *cfg["pytest_targets"]]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    outcomes: dict[str, str] = {}
    out: list[str] = []
    last = 0.0
    res.data["command"] = " ".join(cmd[1:])
    for line in proc.stdout:
        print(line, end="", flush=True)
        out.append(line.rstrip("\n"))
        m = OUTCOME.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
        if time.monotonic() - last > 2:
            _tests_report(res, outcomes, out, None)
            last = time.monotonic()
    rc = proc.wait()
    _tests_report(res, outcomes, out, rc)
    if rc not in (0, 5):  # 5: nothing collected
        res.status = f"FAIL: pytest exited {rc}"


def _tests_report(res: SectionResult, outcomes: dict, out: list, rc) -> None:
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o.lower()] = counts.get(o.lower(), 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test finished"
    res.key = summary + ("" if rc is not None else " (so far)")
    res.data.update(returncode=rc, counts=counts, outcomes=outcomes)
    rows = [(node, o) for node, o in outcomes.items()]
    res.lines = [f"`{res.data['command']}` -> exit {rc if rc is not None else '(running)'}: {summary}", "",
                 *table(["test", "outcome"], rows)]
    bad = [i for i, line in enumerate(out)
           if line.startswith(("=", "_")) and ("FAILURES" in line or "ERRORS" in line)]
    if bad:  # the failure tracebacks (capped), then the short summary
        res.lines += ["", "```", *out[bad[0]:bad[0] + 120], "```"]
    for marker, cap in (("slowest", 12), ("short test summary info", 40)):
        at = [i for i, line in enumerate(out) if marker in line and line.startswith("=")]
        if at:  # the block up to the next ==== header
            block = [out[at[0]]]
            for line in out[at[0] + 1:at[0] + cap]:
                if line.startswith("=") and "short test summary" in line:
                    break
                block.append(line)
            res.lines += ["", "```", *block, "```"]
    res.flush()


# --------------------------------------------------------------------------------------- train
def section_train(cfg: dict, res: SectionResult, deadline: Deadline) -> None:
    from gpu_train_smoke import run_smoke
    out = Path(tempfile.mkdtemp(prefix="flexsp_gpu_train_"))
    r = run_smoke(out, **cfg["train_shape"])
    res.data.update(r)
    steps = r["step_s"]
    res.lines = [f"{r['steps']} steps of the tiny model on {r['device']} ({r['backend']}): meta init, FSDP2, "
                 "bf16 mixed precision, DCP checkpoint every 2 steps; a second run resumed from step 2.", "",
                 *table(["step", *(str(i) for i in range(1, len(steps) + 1))],
                        [["s", *(f"{s:.3f}" for s in steps)]]),
                 "",
                 f"- first step (compile / warm-up): {r['first_step_s']:.2f} s",
                 f"- steady step (median of steps 3-{r['steps']}): {r['steady_step_s'] * 1e3:.1f} ms, "
                 f"{r['steady_tokens_per_s']:,.0f} tokens/s ({r['tokens_per_step']:.0f} tokens/step; a tiny "
                 "model: this measures overheads, not the GPU)",
                 f"- resumed losses of steps 3-{r['steps']} equal the uninterrupted run's: "
                 f"{'yes' if r['ok'] else 'NO'} (max relative difference {r['resume_max_rel_diff']:.2e})",
                 "- peak memory: " + ("n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} MB")]
    res.key = (f"first step {r['first_step_s']:.1f} s, steady {r['steady_step_s'] * 1e3:.0f} ms/step, "
               f"{r['steady_tokens_per_s']:,.0f} tok/s; resume {'equal' if r['ok'] else 'DIFFERS'}")
    if not r["ok"]:
        res.status = "FAIL: the resumed run's losses differ from the uninterrupted run's"


# ---------------------------------------------------------------------------------------- hang
def section_hang(cfg: dict, res: SectionResult, deadline: Deadline) -> None:
    """Test only (FLEXSP_GPU_CHECK_TEST_HANG): a child that sleeps, and this process sleeping."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    res.data["child_pid"] = child.pid
    res.lines = [f"started child {child.pid}; sleeping"]
    res.flush()
    time.sleep(600)


# ---------------------------------------------------------------------------------------- main
def _sections() -> dict:
    def attention(*args):
        from gpu_attention import section_attention
        return section_attention(*args)

    def profile(*args):
        from gpu_costfit import section_profile
        return section_profile(*args)

    def fused_ops(*args):
        from gpu_fused import section_fused_ops
        return section_fused_ops(*args)
    return {"env": section_env, "tests": section_tests, "train": section_train, "attention": attention,
            "profile": profile, "fused_ops": fused_ops, "hang": section_hang}


def make_config(smoke: bool, out_dir: Path, ctx: dict, section: str) -> dict:
    """Shapes of the sections; ``device`` (imports torch) for all but tests (pytest's own process does)."""
    device = None
    if section != "tests":
        import torch
        if not smoke and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (use --smoke for the CPU smoke mode)")
        device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    base = dict(smoke=smoke, device=device, out_dir=out_dir, ctx=ctx)
    if smoke:
        return base | dict(matmul_n=256, matmul_per_batch=2,
                           pytest_targets=["tests/test_attention_kernels.py"],
                           train_shape=dict(steps=4, batch_tokens=1024, max_doc_tokens=256, planner="thread"))
    return base | dict(matmul_n=8192, matmul_per_batch=10, pytest_targets=["tests"],
                       train_shape=dict(steps=8, batch_tokens=16384, max_doc_tokens=2048, planner="process"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section")
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--ctx", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--end-time", type=float, required=True,
                   help="epoch seconds at which this process is killed")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    deadline = Deadline(a.end_time - time.time() - STOP_EARLY_S)
    res = SectionResult(a.result)
    res.flush()
    try:
        if a.section == "hang":  # before importing torch: the test of the kill stays cheap
            section_hang({}, res, deadline)
        sections = _sections()
        if a.section not in sections:
            raise ValueError(f"unknown section {a.section!r}; valid: {sorted(sections)}")
        ctx = json.loads(a.ctx.read_text()) if a.ctx and a.ctx.exists() else {}
        sections[a.section](make_config(a.smoke, a.out, ctx, a.section), res, deadline)
        if res.status == "running":
            res.status = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, including KeyboardInterrupt
        res.status = f"error: {short_error(exc, 300)}"
        res.data["traceback"] = traceback.format_exc(limit=12)
        print(res.data["traceback"], file=sys.stderr, flush=True)
    res.flush()
    return 0 if res.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
