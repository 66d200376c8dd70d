"""flow_matching.py through its command line, and its sampler directly."""
import json

import pytest
import torch

import data
import flow_matching as fm
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "flow_matching.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fm_{request.param}")
    cli(S, "--train", "--smoke", "--detector", request.param, "--out", out)
    return request.param, out


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "flow_matching" and ck["data"]["detector"] == det and ck["step"] == 6
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 50, "--out", out / "s.npz")   # no other flags
    resp = check_samples(out / "s.npz", data.SHAPES[det], 50)
    assert data.load(det, out / "s.npz").images.shape == resp.shape    # sample files load like data
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2, "--steps", 3, "--solver", "midpoint")
    r = check_eval(out / "eval_midpoint3.json")
    assert r["detector"] == det and r["steps"] == 3 and r["reps"] == 2 and r["n_test"] == 100
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1, "--sweep", "1,3")
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["solver"], r["steps"]) for r in rows] == [("euler", 1), ("euler", 3), ("midpoint", 1), ("midpoint", 3)]
    assert all(r["ms_per_sample"] > 0 and r["W"][0] >= 0 for r in rows)


def test_wrong_checkpoints_give_clear_errors(run, tmp_path):
    det, out = run
    other = "proton" if det == "neutron" else "neutron"
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--detector", other, ok=False)
    assert f"trained on the {det} detector" in e.stderr
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["model"] = "vae"
    torch.save(ck, tmp_path / "vae.pt")
    assert "a checkpoint of vae.py, not of flow_matching.py" in cli(S, "--sample", "--ckpt", tmp_path / "vae.pt", ok=False).stderr
    assert "checkpoint not found" in cli(S, "--sample", "--ckpt", tmp_path / "none.pt", ok=False).stderr
    (tmp_path / "junk.pt").write_text("junk")
    assert "not a readable checkpoint" in cli(S, "--eval", "--ckpt", tmp_path / "junk.pt", ok=False).stderr
    assert "--steps must be positive" in cli(S, "--sample", "--steps", 0, ok=False).stderr
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", out, ok=False).stderr


def test_same_seed_same_losses_and_resume_equals_uninterrupted(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", b, "--val-every", 2)
    assert losses(a) == losses(b) and len(losses(a)) == 3
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--max-steps", 4)       # "killed" at step 4
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")             # continues to step 6
    assert torch.load(c / "ckpt.pt", weights_only=True)["step"] == 6
    assert losses(c) == pytest.approx(losses(a), rel=1e-5)
    assert_same_weights(weights(a), weights(c))
    assert_same_weights(weights(a, "ema"), weights(c, "ema"))


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_sampler_shapes_seeds_and_solvers(shape):
    torch.manual_seed(0)
    model = fm.build_model(dict(width=2, attn_levels=2)).eval()
    cond = torch.randn(5, 9)
    x = fm.sample(model, cond, shape, torch.Generator().manual_seed(1), steps=3)
    y = fm.sample(model, cond, shape, torch.Generator().manual_seed(1), steps=3)
    z = fm.sample(model, cond, shape, torch.Generator().manual_seed(1), steps=2, solver="midpoint")
    assert x.shape == (5,) + shape and torch.isfinite(x).all() and (x >= 0).all()
    assert torch.equal(x, y) and not torch.equal(x, z)


def test_euler_integrates_a_known_velocity_field():
    class Constant(torch.nn.Module):           # v = 1 everywhere: x(1) = x(0) + 1 for any solver
        def forward(self, x, t, c):
            return torch.ones_like(x)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((4, 1, 44, 44), generator=torch.Generator().manual_seed(0))
    out = fm.sample(Constant(), torch.zeros(4, 9), (44, 44), g, steps=7)
    torch.testing.assert_close(out, torch.expm1(torch.relu(x0[:, 0] + 1)))
