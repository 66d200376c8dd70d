"""latent_fm.py through its command line, and its pieces directly."""
import json

import pytest
import torch

import data
import latent_fm as lfm
from helpers import assert_same_weights, check_eval, check_samples, cli, weights

S = "latent_fm.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"lfm_{request.param}")
    cli(S, "--train", "--smoke", "--detector", request.param, "--out", out)
    return request.param, out


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model"] == "latent_fm" and ck["state"]["stage1"]["step"] == 4 and ck["state"]["stage2"]["step"] == 4
    assert ck["state"]["scale"] > 0
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 40, "--out", out / "s.npz")
    check_samples(out / "s.npz", data.SHAPES[det], 40)
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2)
    assert "reconstruction Wasserstein" in e.stdout
    r = check_eval(out / "eval.json")
    assert r["reconstruction_W"] >= 0 and r["steps"] == 8
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1, "--sweep", "1,2")
    assert [r["steps"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == [1, 2]


def test_stages_resume_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli(S, "--train", "--smoke", "--out", a)
    cli(S, "--train", "--smoke", "--out", b, "--stage", "1")                 # stage 1 only ...
    e = cli(S, "--sample", "--ckpt", b / "ckpt.pt", ok=False)
    assert "stage 2 is not trained yet" in e.stderr
    cli(S, "--train", "--smoke", "--out", b, "--stage", "2")                 # ... then stage 2 on top
    for key in ("vae", "unet", "ema"):
        assert_same_weights(weights(a, key), weights(b, key))
    c = tmp_path / "c"
    cli(S, "--train", "--smoke", "--out", c, "--max-steps", 3, "--stage", "1")  # interrupted in stage 1
    cli(S, "--train", "--smoke", "--out", c, "--resume")                      # finishes both stages
    for key in ("vae", "unet", "ema"):
        assert_same_weights(weights(a, key), weights(c, key))
    assert "must be positive and even" in cli(S, "--train", "--width", 3, ok=False).stderr


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_shapes(shape):
    vae, unet = lfm.build_model(dict(vae_width=4, width=4))
    x = torch.rand(3, 1, *shape)
    mu, logvar = vae.encode(x)
    assert mu.shape == (3,) + lfm.latent_shape(shape) and logvar.shape == mu.shape
    assert vae.decode(mu, shape).shape == x.shape
    assert unet(mu, torch.rand(3), torch.randn(3, 9)).shape == mu.shape
    out = lfm.sample(vae, unet, torch.randn(3, 9), shape, 1.0, torch.Generator().manual_seed(0), steps=2)
    assert out.shape == (3,) + shape and torch.isfinite(out).all() and (out >= 0).all()
