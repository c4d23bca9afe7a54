"""FlexSP on Ray: Ray Train's TorchTrainer runs ``flexsp.train.run`` on N workers.

Local (starts a Ray instance bound to 127.0.0.1)::

    python launch/ray_job.py --num-workers 2 -- train.steps=2 output_dir=/tmp/flexsp-ray

As a Ray job (the script connects to the cluster's Ray through the RAY_ADDRESS Ray sets for the job;
output_dir must be storage every node sees; ``python`` is the first on the head's PATH: start the head
from the project's environment)::

    ray job submit --address http://<head-ip>:8265 --working-dir . -- \
        python launch/ray_job.py --num-workers 8 --use-gpu -- model=small output_dir=/shared/runs/flexsp

The job's status follows the exit status: 0 SUCCEEDED, else FAILED (2: a user error, one line in
``ray job logs``).

The config is composed once on the driver (Hydra compose API, the same configs/ and overrides as
``python -m flexsp.train``), validated there (a bad value is one line ``ray_job: error: ...`` and exit
status 2 before Ray starts) and handed to every worker as a plain dict. Ray Train starts the
torch.distributed group (gloo on CPU, nccl on GPU); the trainer reuses it. A user error found by the
workers (a missing corpus, ...) is printed once, by the worker that found it first, and the driver
exits with status 2 without Ray's traceback; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


ERROR_MARKER = ".flexsp_user_error"
"""Written into output_dir by the worker that printed a user error: the workers then return
normally (no Ray traceback of an error already explained) and the driver exits with status 2."""


sys.path.insert(0, str(REPO))
from flexsp.config import RunConfig as FlexSPConfig  # noqa: E402 (this repo on the path first)
from flexsp.config.compose import compose  # noqa: E402
from flexsp.errors import UserError, print_error  # noqa: E402


def compose_config(overrides: list[str]) -> FlexSPConfig:
    """The typed config of ``overrides`` (as ``python -m flexsp.train`` composes it)."""
    return compose(overrides)


def train_loop_per_worker(config: dict) -> None:
    sys.path.insert(0, config["repo"])
    import torch.distributed as dist

    from flexsp.errors import is_user_error
    from flexsp.failure import report
    from flexsp.train import run

    try:
        run(config["cfg"])
    except Exception as exc:
        if not is_user_error(exc):
            raise
        first = getattr(exc, "flexsp_first", None)
        printer = first if first is not None else dist.get_rank() == 0
        report(exc, "flexsp-train", printer=printer)
        if not printer:
            return
        try:
            (Path(config["cfg"].output_dir) / ERROR_MARKER).write_text(str(exc))
        except OSError:  # no shared output_dir to tell the driver through: let Ray report it
            raise exc from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--storage-path", default=None, help="Ray Train storage (default <output_dir>/ray)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m flexsp.train")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train's workers patch print() to also log it: every line a worker prints (a user error
    # included) would reach the job's log twice. Propagated to the workers by TorchTrainer.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    local = "RAY_ADDRESS" not in os.environ
    if local:
        # Ray resolves 127.0.0.1 to the machine's network address unless it runs in single-machine
        # mode; this keeps the local instance (and the workers' MASTER_ADDR) on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from dataclasses import replace

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from flexsp.train import validate

    try:
        cfg = compose_config(args.overrides)
        out = cfg.output_dir.resolve()
        cfg = replace(cfg, output_dir=out)
        validate(cfg, args.num_workers)
    except UserError as exc:
        return print_error("ray_job", exc)
    if not local:  # ray job submit / existing cluster
        # Ray Train's helper actors (its PlacementGroupCleaner) find the cluster by RAY_ADDRESS, else
        # by looking for Ray on their machine, which fails with a traceback in the job's log when
        # the node runs another Ray instance: the job's actors and workers get the driver's address.
        address = os.environ["RAY_ADDRESS"]
        named = address not in ("auto", "local") and "://" not in address
        ray.init(runtime_env={"env_vars": {"RAY_ADDRESS": address}} if named else None)
    else:  # local: bound to loopback
        ray.init(
            num_cpus=max(2, int(args.num_workers * args.cpus_per_worker)),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "repo": str(REPO)},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            resources_per_worker={"CPU": args.cpus_per_worker},
        ),
        run_config=RunConfig(name="flexsp", storage_path=args.storage_path or str(out / "ray")),
    )
    if local:
        print(f"[ray_job] local Ray node address: {ray.util.get_node_ip_address()}", flush=True)
    (out / ERROR_MARKER).unlink(missing_ok=True)
    trainer.fit()
    if (out / ERROR_MARKER).is_file():
        ray.shutdown()
        return 2
    metrics = out / "metrics.jsonl"
    lines = (
        [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
    )
    print(
        f"[ray_job] {len(lines)} steps logged in {metrics}; losses {[ln['loss'] for ln in lines]}", flush=True
    )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
