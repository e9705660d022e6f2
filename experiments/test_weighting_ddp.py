"""The weightings under DistributedDataParallel (issue 30 item 2): two gloo processes on the CPU, each with its half of
every batch, body and heads wrapped in DDP, the wrapped body handed to the weighting."""
import gc
import os
import warnings

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


def teardown():
    """Collects what is left of the DDP wrappers (their reducers use the process group) while the group is alive, and
    waits for the other rank before the group goes: once in a CI run a rank aborted at exit ("terminate called
    without an active exception"), the kind of abort a group torn down under a live reducer or peer gives."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def worker(rank, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    torch.save({meta: train(meta, rank, WORLD) for meta in (False, True)}, os.path.join(out, f"{rank}.pt"))
    teardown()


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


class Skipping(torch.nn.Module):
    """A body whose second layer this rank may skip (LayerDrop, a mixture of experts, a data-dependent branch)."""

    def __init__(self, use_extra: bool):
        super().__init__()
        self.first, self.extra, self.use_extra = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), use_extra

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return h + torch.tanh(self.extra(h)) if self.use_extra else h


def one_step(rank, world, mode):
    """One optimizer step of rank's half of a batch; rank 1 skips the body's second layer. Returns its gradient on
    this rank and the body's parameters after the step."""
    torch.manual_seed(0)
    body, (_, heads, plain) = Skipping(use_extra=rank == 0), setup(True, grad_accum=1)
    ddp_body, ddp_heads = DDP(body, find_unused_parameters=True), [DDP(h) for h in heads]
    weighting = None if mode == "DDP" else tartan.MTWeighting(ddp_body, 2) if mode == "MT" else \
        tartan.MetaWeighting(ddp_body, 2, 2, plain.cfg)
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=1e-2)
    torch.manual_seed(7)
    x, y, y_aux = (t[rank::world] for t in data(0, 0, n=16))
    features = ddp_body(x)
    losses = [ddp_heads[0](features, y)[1], ddp_heads[1](ddp_body(x), y_aux)[1]]
    if weighting is None:  # plain DDP, Eq. 3 with w = (1/2, 1/2): the gradient MT must give
        (losses[0] / 2 + losses[1] / 2).backward()
    else:
        xv, yv = (t[rank::world] for t in val_batch(0))
        weighting.backward(losses, head_data=(features, y), val=(xv, yv)) if mode == "META" else \
            weighting.backward(losses)
    grad = body.extra.weight.grad
    opt.step()
    return grad is not None and grad.clone(), torch.cat([p.detach().reshape(-1) for p in body.parameters()])


def compiled_or_inner(rank, world, wrap):
    """Two META steps with the weighting given torch.compile(DDP(body)) or, wrongly, DDP's inner module; returns w,
    the body's parameters and the warnings."""
    body, heads, plain = setup(True, grad_accum=1)
    ddp_body, ddp_heads = DDP(body), [DDP(h) for h in heads]
    given = torch.compile(ddp_body, backend="eager") if wrap == "compiled" else ddp_body.module
    weighting = tartan.MetaWeighting(given, 2, 2, plain.cfg)
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=1e-2)
    torch.manual_seed(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            x, y, y_aux = (t[rank::world] for t in data(step, 0, n=16))
            features = given(x)
            xv, yv = (t[rank::world] for t in val_batch(step))
            weighting.backward([ddp_heads[0](features, y)[1], ddp_heads[1](given(x), y_aux)[1]],
                               head_data=(features, y), val=(xv, yv))
            opt.step(), opt.zero_grad()
    params = torch.cat([p.detach().reshape(-1) for p in body.parameters()])
    return weighting.w.clone(), params, [str(w.message) for w in caught if "DistributedDataParallel" in str(w.message)]


def worker_more(rank, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    results = {mode: one_step(rank, WORLD, mode) for mode in ("DDP", "MT", "META")}
    results.update({wrap: compiled_or_inner(rank, WORLD, wrap) for wrap in ("compiled", "inner")})
    torch.save(results, os.path.join(out, f"{rank}.pt"))
    teardown()


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
def test_ddp_a_layer_one_rank_skips_compiled_ddp_and_an_unwrapped_body(tmp_path):
    """A body layer that one rank used and the other skipped kept its gradient on one rank only (MT: the mean copied
    back only where .grad existed; META: which parameters the tasks reached, per rank), and the replicas drifted
    apart 1e-2 in one step; torch.compile(DDP(body)) hid DDP from the weighting, and META's w drifted per rank. Now
    both ranks get the layer's mean gradient, as DDP gives it, and a compiled DDP body is seen through; a body
    given without its DDP wrapper is warned about at the first step."""
    mp.spawn(worker_more, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD)]
    ddp_grad = ranks[0]["DDP"][0]
    for mode in ("MT", "META"):
        (grad0, params0), (grad1, params1) = ranks[0][mode], ranks[1][mode]
        assert torch.equal(params0, params1) and torch.equal(grad0, grad1), mode
    torch.testing.assert_close(ranks[0]["MT"][0], ddp_grad)  # MT's w = (1/2, 1/2): DDP's own gradient
    (w0, params0, warned0), (w1, params1, warned1) = ranks[0]["compiled"], ranks[1]["compiled"]
    assert torch.equal(w0, w1) and torch.equal(params0, params1) and not warned0 and not warned1
    (w0, _, warned0), (w1, _, warned1) = ranks[0]["inner"], ranks[1]["inner"]
    assert not torch.equal(w0, w1) and len(warned0) == len(warned1) == 1
    assert "2 ranks but META's body is not wrapped in DistributedDataParallel" in warned0[0]
