"""flexsp.dryrun_sizing against references:

- the loss's transient chunk (what flexsp-dryrun reserves for the chunked linear cross-entropy)
  equals the peak of the bytes the real backward allocates, tracked op by op (a TorchDispatchMode
  that adds the storage of every non-aliasing op's output and subtracts it when the tensor dies),
  in bf16 and fp32, over several chunks. Tolerance: the tracked peak may exceed the prediction by
  the chunks' small index tensors (masks, row indices, the scalar gradient: well under 1%);
- per-rank model states at any shard count equal rank 0's bytes of the model really sharded by
  FSDP2 in a fake world (so the world size suggested for a model that does not fit is exact);
- smallest_fit: HSDP first grows the shard groups, then the world size.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flexsp import dryrun_sizing as sizing


class LiveBytes(TorchDispatchMode):
    """Bytes held by tensors that ops created while active: peak and current."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # new storage, not a view
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not t._is_view():
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_transient_is_the_backward_peak(monkeypatch, dtype):
    from flexsp.ops import linear_cross_entropy, torch_ops

    monkeypatch.setattr(torch_ops, "DEFAULT_CHUNK_ELEMENTS", 2**20)  # 1M-logit chunks: a light test
    vocab, hidden, tokens = 8192, 48, 300  # 128-token chunks: 3 of them
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 0.02).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    loss = linear_cross_entropy(h, w, y, backend="torch")
    tracked = LiveBytes()
    with tracked:
        loss.backward()
    cb = torch.empty((), dtype=dtype).element_size()
    pred = sizing.loss_transient_bytes(vocab, hidden, cb)
    assert pred["chunk_tokens"] == 128 and tokens > 2 * pred["chunk_tokens"]
    # the backward's own outputs: grad of the hidden states, the float32 weight-gradient accumulator
    outputs = tokens * hidden * cb + vocab * hidden * 4
    predicted = outputs + pred["bytes"]
    assert 0 <= tracked.peak - predicted <= 0.01 * predicted, (tracked.peak, predicted, pred)


@pytest.mark.parametrize("world, shard", [(4, 0), (64, 0), (64, 8)])
def test_state_bytes_equal_the_fsdp2_sharded_model(world, shard):
    from flexsp.dryrun import FakeWorld, build_sharded, model_state_bytes
    from flexsp.model import Transformer, model_config

    cfg = model_config("tiny", vocab_size=333)  # rows that do not divide the shard counts
    with torch.device("meta"):
        shapes = sizing.param_shapes(Transformer(cfg, device=torch.device("meta")))
    with FakeWorld(world):
        model, _, _ = build_sharded(cfg, "fp32", world, shard)
        measured = model_state_bytes(model, "fp32")
    states = measured["params"] + measured["grads"] + measured["optimizer"]
    assert sizing.state_bytes(shapes, shard or world) == states


def test_smallest_fit_grows_the_shard_groups_then_the_world():
    shapes = [(1024, 1024, 4)]  # one fp32 matrix: 16 MiB of states unsharded
    full = sizing.state_bytes(shapes, 1)
    assert full == 4 * 1024 * 1024 * 4
    act = 1000.0
    # 8 ranks, HSDP groups of 2: states 8 MiB; a 5 MiB device fits groups of 4 (4 MiB + room)
    s = sizing.smallest_fit(shapes, 0, act, 5 * 2**20, world_size=8, shard_size=2)
    assert s == {"world_size": 8, "shard_size": 4, "capacity_tokens": int((5 * 2**20 - full // 4) // act)}
    # no HSDP: 8 ranks hold 2 MiB each; a 1.5 MiB device needs 16 ranks (1 MiB of states)
    s = sizing.smallest_fit(shapes, 0, act, 3 * 2**19, world_size=8, shard_size=0)
    assert s["world_size"] == 16 and s["shard_size"] == 0
    # unsharded buffers larger than the device: nothing fits
    assert sizing.smallest_fit(shapes, 2**21, act, 2**20, world_size=8, shard_size=0) is None
