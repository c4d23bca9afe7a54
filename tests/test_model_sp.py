"""The decoder under sequence parallelism (2 gloo ranks) equals the single-device decoder: loss sum,
target count, logits and parameter gradients, for Ulysses and ring layouts, with and without activation
checkpointing (ring pads documents,
so this also checks that padding is kept out of the loss); plus q/k norm + biases + head_dim + dynamic RoPE
(Ulysses, ring) and a sliding window (Ulysses)."""

import pytest

pytest.importorskip("flexsp.attention")
from dist_harness import run_distributed  # noqa: E402

pytestmark = pytest.mark.slow


def _body(rank, world_size):
    import torch
    import torch.distributed as dist

    from flexsp.attention import unshard
    from flexsp.model import Transformer, model_config, shard_inputs

    torch.manual_seed(0)
    cfg = model_config("tiny")
    ids = torch.randint(0, cfg.vocab_size, (31,))
    cu = torch.tensor([0, 9, 26, 31], dtype=torch.int32)
    ref_model = Transformer(cfg)
    ref_model.init_weights(5)
    ref_inputs = shard_inputs(ids, cu)
    ref_sum, ref_count = ref_inputs.loss(ref_model)
    ref_sum.backward()
    ref_logits = ref_inputs.logits(ref_model).detach()
    out = {}
    for mode, ckpt in (("ulysses", False), ("ring", False), ("ring", True)):
        model = Transformer(model_config("tiny", activation_checkpointing=ckpt))
        model.init_weights(5)
        inputs = shard_inputs(ids, cu, dist.group.WORLD, mode)
        loss_sum, count = inputs.loss(model)
        loss_sum.backward()
        totals = torch.stack([loss_sum.detach(), count.float()])
        dist.all_reduce(totals)
        grad_err = 0.0
        for (name, p), (_, rp) in zip(model.named_parameters(), ref_model.named_parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)
            grad_err = max(grad_err, (g - rp.grad).abs().max().item())
        with torch.no_grad():
            logits = unshard(inputs.logits(model), inputs.attn_ctx.meta, dist.group.WORLD)
        out[f"{mode}{'+ckpt' if ckpt else ''}"] = dict(
            sum_err=abs(totals[0].item() - ref_sum.item()),
            count=int(totals[1].item()),
            ref_count=int(ref_count),
            grad_err=grad_err,
            logit_err=(logits - ref_logits).abs().max().item(),
            padded=bool((inputs.pad_mask).any()),
        )
    # the architecture extensions: q/k norm + biases + head_dim != hidden/heads + dynamic RoPE
    # (per-document lengths come from the global boundaries, not the local shard), and a
    # sliding window shorter than the 17-token document under Ulysses.
    ext = dict(
        qk_norm=True,
        attention_bias=True,
        head_dim=24,
        max_position_embeddings=8,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    for tag, kw, modes in (
        ("ext", ext, ("ulysses", "ring")),
        ("window", dict(sliding_window=6, attention_bias=True), ("ulysses",)),
    ):
        ref_m = Transformer(model_config("tiny", **kw))
        ref_m.init_weights(5)
        with torch.no_grad():  # biases / norms away from their 0 / 1 init
            g = torch.Generator().manual_seed(1)
            for n, p in ref_m.named_parameters():
                if n.endswith(("bias", "norm.weight")):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        state = {n: p.detach().clone() for n, p in ref_m.named_parameters()}
        rs, rc = ref_inputs.loss(ref_m)
        rs.backward()
        with torch.no_grad():
            rl = ref_inputs.logits(ref_m)
        for mode in modes:
            model = Transformer(model_config("tiny", **kw))
            model.load_state_dict(state)
            inputs = shard_inputs(ids, cu, dist.group.WORLD, mode)
            loss_sum, count = inputs.loss(model)
            loss_sum.backward()
            totals = torch.stack([loss_sum.detach(), count.float()])
            dist.all_reduce(totals)
            grad_err = 0.0
            for (_, p), (_, rp) in zip(model.named_parameters(), ref_m.named_parameters()):
                gr = p.grad.clone()
                dist.all_reduce(gr)
                grad_err = max(grad_err, (gr - rp.grad).abs().max().item())
            with torch.no_grad():
                logits = unshard(inputs.logits(model), inputs.attn_ctx.meta, dist.group.WORLD)
            out[f"{tag}:{mode}"] = dict(
                sum_err=abs(totals[0].item() - rs.item()),
                count=int(totals[1].item()),
                ref_count=int(rc),
                grad_err=grad_err,
                logit_err=(logits - rl).abs().max().item(),
                padded=False,
            )
    return out


def test_sp_model_matches_single_device():
    results = run_distributed(_body, world_size=2, timeout=120)
    for rank_out in results:
        for mode, r in rank_out.items():
            assert r["count"] == r["ref_count"] == 28, (mode, r)
            assert r["sum_err"] < 1e-3, (mode, r)
            assert r["grad_err"] < 1e-4, (mode, r)
            assert r["logit_err"] < 1e-4, (mode, r)
    assert results[0]["ring"]["padded"] or results[1]["ring"]["padded"]
