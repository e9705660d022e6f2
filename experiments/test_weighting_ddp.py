"""The weightings under DistributedDataParallel (issue 30 item 2): two gloo processes on the CPU, each with its half of
every batch, body and heads wrapped in DDP, the wrapped body handed to the weighting."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import tartan
from experiments.test_weighting_loops import data, setup, val_batch

WORLD, STEPS = 2, 3


def train(meta, rank=0, world=1):
    """STEPS optimizer steps of 2 micro-batches on this rank's rows of each batch (all rows with world=1); returns
    the body's and heads' parameters, flat, and the weighting's w."""
    body, heads, plain = setup(meta)  # the same initialisation on every rank
    wrap = (lambda m: DDP(m)) if world > 1 else (lambda m: m)  # noqa: E731
    ddp_body, ddp_heads = wrap(body), [wrap(h) for h in heads]
    weighting = tartan.MetaWeighting(ddp_body, 2, 2, plain.cfg) if meta else \
        tartan.MTWeighting(ddp_body, 2, grad_accum=2)
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=1e-2)
    torch.manual_seed(7)  # phi*'s initialisations (DDP: rank 0's phi* is used everywhere)
    for step in range(STEPS):
        for micro in range(2):
            x, y, y_aux = (t[rank::world] for t in data(step, micro, n=16))
            features = ddp_body(x)
            losses = [ddp_heads[0](features, y)[1], ddp_heads[1](ddp_body(x), y_aux)[1]]
            xv, yv = (t[rank::world] for t in val_batch(step))
            info = weighting.backward(losses, head_data=(features, y), val=(xv, yv)) if meta else \
                weighting.backward(losses)
        opt.step(), opt.zero_grad()
    params = torch.cat([p.detach().reshape(-1) for p in [*body.parameters(), *heads.parameters()]])
    return {"params": params, "w": weighting.w.clone(), "alpha": info["alpha"], "losses": info["losses"]}


def worker(rank, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    torch.save({meta: train(meta, rank, WORLD) for meta in (False, True)}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
def test_ddp_keeps_every_rank_identical_for_mt_and_meta(tmp_path):
    """DDP-wrapped body and heads with per-micro-batch backwards left the replicas about 9e-3 apart after 5 steps and
    META's w differing per rank, without an error. Now the weighting turns off the body's per-backward all-reduce
    and averages once per step what it needs (MT: the body's gradient; META: G, g_meta through the first rank's
    phi*): parameters, w and the step's info are identical on both ranks, and MT's equal those of one process on
    the whole batches (the mean of equal halves' gradients is the whole batch's)."""
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD)]
    for meta in (False, True):
        a, b = ranks[0][meta], ranks[1][meta]
        assert torch.equal(a["params"], b["params"]) and torch.equal(a["w"], b["w"]), meta
        assert a["alpha"] == b["alpha"] and a["losses"] == b["losses"]
    assert ranks[0][True]["alpha"] != pytest.approx([0.5, 0.5])
    whole = train(False)
    torch.testing.assert_close(ranks[0][False]["params"], whole["params"], rtol=1e-5, atol=1e-6)
    assert ranks[0][False]["losses"] == pytest.approx(whole["losses"], rel=1e-5)


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
@pytest.mark.parametrize("meta", [False, True])
def test_an_fsdp_body_is_refused_by_name(meta, tmp_path):
    """FSDP shards each parameter, and so each task's gradient, over the ranks: under fully_shard the weighting said
    "requires_grad of a body parameter changed", under FullyShardedDataParallel META died in torch ("size mismatch")
    and with use_orig_params it blamed a backward of the user's own. Now the weighting refuses FSDP when it is built,
    naming DDP, whether FSDP wraps the body or a layer inside it."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for shard in (fully_shard, lambda m: FullyShardedDataParallel(m, device_id=torch.device("cpu"))):
            for inner in (False, True):
                body, heads, plain = setup(meta)
                if inner:
                    body[0] = shard(body[0])
                else:
                    body = shard(body)
                with pytest.raises(TypeError, match="an FSDP body .* wrap the body in DistributedDataParallel"):
                    tartan.MetaWeighting(body, 2, 2, plain.cfg) if meta else tartan.MTWeighting(body, 2)
    finally:
        dist.destroy_process_group()
