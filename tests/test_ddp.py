"""Issue 19: training under torchrun (DistributedDataParallel, gloo on the CPU, 2 processes) equals one process.

Tolerances. Gradients: the 2-rank gradient equals the single-process one to 1e-5 of the network's largest gradient
entry (float summation order differs). Losses: relative 1e-5. Weights after K Adam steps: Adam divides each
gradient entry by its own running magnitude, so an entry whose true gradient is ~0 (a bias followed by BatchNorm)
moves by up to +-lr per step on float rounding alone; the weights are therefore compared to 1e-4 where no such
entry exists (flow_matching: GroupNorm, no BatchNorm) and to the bound 2 lr K where one does (gan's generator);
the gradient test is the exact check."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import gan
from conftest import ROOT
from helpers import cli, losses, weights

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(script, *args, ok=True, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(TORCHRUN + [script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert (out.returncode == 0) == ok, f"torchrun {script} {args}: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


# ---- the mechanism: gradients of gan.py's G and D (BatchNorm in both, two optimisers, D called three times) ----
def _nets():
    torch.manual_seed(0)
    return gan.build_networks({**vars(gan.get_args(["--train", "--smoke"])), "d_norm": "batch"}).values()


def _step(gen, disc, x, c):
    """gan.py's D and G losses on one global batch; gradients of both networks (D's from the D loss only)."""
    g = torch.Generator().manual_seed(5)
    fc, z = c[torch.randperm(len(c), generator=g)], data.noise((len(x), gan.NOISE), g, "cpu")
    fake = gen(z, fc)
    real, fake_d = disc(x, c), disc(fake.detach(), fc)
    d_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
        F.binary_cross_entropy_with_logits(fake_d, torch.zeros_like(fake_d))
    d_loss.backward()
    grads = [p.grad.clone() for p in disc.parameters()]
    g_logit = disc(fake, fc)
    g_loss = F.binary_cross_entropy_with_logits(g_logit, torch.ones_like(g_logit))
    g_loss.backward()
    return [d_loss.item(), g_loss.item()], [p.grad.clone() for p in gen.parameters()] + grads


def _rank(rank, port, x, c, path):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = data.dist_init("cpu")
    gen, disc = _nets()
    result = _step(data.wrap_ddp(gen, dist), data.wrap_ddp(disc, dist), x, c)
    if rank == 0:
        torch.save(result, path)
    data.dist_close(dist)


def test_two_ranks_give_the_single_process_gradient(tmp_path):
    torch.manual_seed(1)
    x, c = torch.rand(30, 1, 44, 44), torch.randn(30, 9)          # 30: the shards are 15 + 15
    ref_losses, ref = _step(*_nets(), x, c)
    ctx = torch.multiprocessing.get_context("spawn")
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, port, x, c, tmp_path / "g.pt")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        assert p.exitcode == 0, "a rank failed or hung"
    got_losses, got = torch.load(tmp_path / "g.pt")
    torch.testing.assert_close(got_losses, ref_losses, rtol=1e-5, atol=0)
    scale = max(g.abs().max() for g in ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)
    assert all(torch.is_tensor(r) for r in ref)                    # every parameter received a gradient


# ---- the scripts under torchrun ----
def test_flow_matching_two_ranks_equal_one_and_resume_single_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--train", "--smoke", "--val-every", 1, "--steps", 1]
    cli("flow_matching.py", *common, "--out", one, "--max-steps", 4)
    torchrun("flow_matching.py", *common, "--out", two, "--max-steps", 2)
    torch.testing.assert_close(losses(two), losses(one)[:2], rtol=1e-5, atol=0)      # the first K = 2 steps
    cli("flow_matching.py", *common, "--out", two, "--max-steps", 4, "--resume")    # the 2-rank checkpoint, 1 process
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=0)
    for key in ("weights", "ema"):
        a, b = weights(one, key), weights(two, key)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


def test_gan_two_ranks_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--train", "--smoke", "--val-every", 1, "--max-steps", 2]
    cli("gan.py", *common, "--out", one)
    out = torchrun("gan.py", *common, "--out", two)
    assert out.stdout.count("step      2") == 1                       # rank 0 alone logs
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=0)
    lr = torch.load(one / "ckpt.pt", weights_only=True)["args"]["lr"]
    for key in ("weights", "disc"):
        a, b = weights(one, key), weights(two, key)
        assert a.keys() == b.keys()                                   # plain (unwrapped) names
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2 * lr * 2, msg=k)


def test_bad_data_ends_every_rank_with_the_clear_error(tmp_path):
    out = torchrun("flow_matching.py", "--train", "--smoke", "--data", tmp_path / "missing", "--out", tmp_path / "r",
                   ok=False, timeout=90)                              # a hang would raise TimeoutExpired
    assert "error:" in out.stderr and str(tmp_path / "missing") in out.stderr
    assert "DataError" not in out.stderr                             # the message, not a rank's traceback


def test_batch_not_divisible_by_the_world_size_is_a_clear_error():
    with pytest.raises(data.DataError, match="does not split into 2 equal shards"):
        data.check_batch(33, data.Dist(0, 2, 0, True, torch.device("cpu")))
    assert data.shard(torch.arange(6), data.Dist(1, 2, 1, False, torch.device("cpu"))).tolist() == [3, 4, 5]
