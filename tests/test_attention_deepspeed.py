"""Our Ulysses equals DeepSpeed's ``DistributedAttention`` (a real DeepSpeed install) on the
same sharded inputs, forward and backward, on 2 gloo ranks.

DeepSpeed on CPU needs DS_ACCELERATOR=cpu; its first start compiles a comm extension
(~60-75 s, cached under TORCH_EXTENSIONS_DIR, which scripts/test.sh sets).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from attn_cases import FP32_TOL, make_inputs
from dist_harness import run_distributed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (pip install -e .[dist])",
    ),
]


def _body(rank, world):
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    from flexsp.attention import shard, sp_attention
    from flexsp.attention.local import varlen_attention

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the harness' process group
    group = torch.distributed.new_group(list(range(world)))
    checked = []
    for cu, heads, kvh in (
        ([0, 64], 4, 4),
        ([0, 64], 4, 2),
        ([0, 5, 6, 40, 61], 4, 2),
        ([0, 5, 6, 40, 61], 8, 8),
    ):
        q, k, v, dout = make_inputs(cu, heads, kvh, 16, torch.float32, seed=len(cu) + kvh)
        ql, meta = shard(q, cu, group, "ulysses")
        kl, vl, dl = (shard(x, cu, group, "ulysses", meta=meta)[0] for x in (k, v, dout))
        cu_pad = torch.tensor([0, *meta.padded_seqlens]).cumsum(0).tolist()

        def local_attn(qq, kk, vv, *args, **kw):  # DeepSpeed layout [s, b, h, d], b = 1
            return varlen_attention(qq[:, 0], kk[:, 0], vv[:, 0], cu_pad)[:, None]

        ds = DistributedAttention(local_attn, group, scatter_idx=2, gather_idx=0)
        ins_a = [x.clone().requires_grad_() for x in (ql, kl, vl)]
        ins_b = [x.clone().requires_grad_() for x in (ql, kl, vl)]
        out_ds = ds(*(x[:, None] for x in ins_a), 1)[:, 0]
        out_ds.backward(dl)
        out = sp_attention(*ins_b, meta, group, "ulysses")
        out.backward(dl)
        # Same local kernel, same data, only the all-to-all implementations differ, so
        # results should agree to fp32 rounding (FP32_TOL, see attn_cases.py).
        torch.testing.assert_close(out, out_ds, **FP32_TOL)
        for a, b in zip(ins_b, ins_a):
            torch.testing.assert_close(a.grad, b.grad, **FP32_TOL)
        checked.append((cu, heads, kvh))
    return checked


def test_ulysses_matches_deepspeed():
    env = {"DS_ACCELERATOR": "cpu"}
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(os.getcwd(), ".torch_extensions")
    res = run_distributed(_body, 2, timeout=170, env=env)
    assert len(res[0]) == 4
