"""Data-parallel training (milotile.nn.ddp) on 2 CPU processes with the gloo backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milotile.nn import ddp

GLOBAL_BATCH = 8
STEPS = 4


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(STEPS, GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randn(STEPS, GLOBAL_BATCH, 3, generator=g)


def _train_steps() -> dict:
    """SGD steps on the global batches; inside a group each rank sees only its shard."""
    model = _tiny_model()
    net = ddp.wrap(model, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = _data()
    grads = []
    for x, y in zip(xs, ys, strict=True):
        loss = torch.nn.functional.mse_loss(net(ddp.shard(x)), ddp.shard(y))
        opt.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        opt.step()
    rank, world = ddp.rank_world()
    return {"rank": rank, "world": world, "grads": grads,
            "params": [p.detach().clone() for p in model.parameters()], "n_local": ddp.shard(xs[0]).shape[0]}


def test_shard_outside_a_group_is_the_whole_batch():
    x = torch.arange(10)
    assert ddp.rank_world() == (0, 1) and not ddp.is_distributed() and ddp.is_main()
    assert torch.equal(ddp.shard(x), x) and ddp.all_mean(3.0) == 3.0


@pytest.mark.slow
def test_two_gloo_processes_sync_gradients_and_match_single_process():
    single = _train_steps()
    r0, r1 = ddp.launch(_train_steps, 2, backend="gloo")
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["n_local"] == r1["n_local"] == GLOBAL_BATCH // 2  # each rank saw half of every batch
    for g0, g1, gs in zip(r0["grads"], r1["grads"], single["grads"], strict=True):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # all-reduced: identical on every rank
        torch.testing.assert_close(g0, gs, rtol=1e-5, atol=1e-6)  # = the gradient of the whole batch
    for p0, p1, ps in zip(r0["params"], r1["params"], single["params"], strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)
        torch.testing.assert_close(p0, ps, rtol=1e-5, atol=1e-6)
    # the shards differ, so without the all-reduce the ranks' own gradients would differ
    assert not torch.allclose(r0["grads"][0], _local_grad(0))


def _local_grad(rank: int) -> torch.Tensor:
    model = _tiny_model()
    xs, ys = _data()
    lo, hi = rank * GLOBAL_BATCH // 2, (rank + 1) * GLOBAL_BATCH // 2
    torch.nn.functional.mse_loss(model(xs[0][lo:hi]), ys[0][lo:hi]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _explore_rank(store: str, out: str) -> dict:
    from milotile.explore import train

    enc = train(store, epochs=1, batch_size=16, device="cpu", out=out,
                model_config={"widths": [8, 16, 32], "blocks": [1, 1, 1]})
    return {name: p.detach().clone() for name, p in enc.model.named_parameters()}


@pytest.mark.slow
def test_explore_train_runs_data_parallel(tmp_path):
    from test_explore import write_bank

    write_bank(tmp_path / "s.zarr", n=32)
    r0, r1 = ddp.launch(_explore_rank, 2, str(tmp_path / "s.zarr"), str(tmp_path / "run"), backend="gloo")
    assert r0.keys() == r1.keys() and len(r0) > 10
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)  # the ranks stay in lockstep
    assert (tmp_path / "run" / "last.pt").is_file()
    recs = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(recs) == 1  # only rank 0 writes the run log
    assert np.isfinite(__import__("json").loads(recs[0])["loss"])
