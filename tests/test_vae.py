"""vae.py through its command line, and its pieces directly."""
import json

import pytest
import torch

import data
import vae
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "vae.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"vae_{request.param}")
    cli(S, "--train", "--smoke", "--detector", request.param, "--out", out)
    return request.param, out


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "vae" and ck["data"]["detector"] == det and ck["step"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["val_kl"] >= 0 and 0 <= rows[-1]["val_active"] <= vae.LATENT
    assert rows[-1]["val_W"] >= 0 and rows[-1]["rec_W"] >= 0 and rows[-1]["train_kl"] >= 0
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 50, "--out", out / "s.npz")   # no other flags
    resp = check_samples(out / "s.npz", data.SHAPES[det], 50)
    assert data.load(det, out / "s.npz").images.shape == resp.shape    # sample files load like data
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2)
    assert "reconstruction Wasserstein" in e.stdout
    r = check_eval(out / "eval.json")
    assert r["detector"] == det and r["reps"] == 2 and r["n_test"] == 100 and r["train_steps"] == 6
    assert r["reconstruction_W"] >= 0 and r["n_params"] == ck["n_params"] > 0
    assert r["model"]["div_err"][0] >= 0


def test_wrong_checkpoints_give_clear_errors(run, tmp_path):
    det, out = run
    other = "proton" if det == "neutron" else "neutron"
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--detector", other, ok=False)
    assert f"trained on the {det} detector" in e.stderr
    if det == "proton":                                                 # the rest does not depend on the detector
        return
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["model"] = "sae_ng"
    torch.save(ck, tmp_path / "sae.pt")
    assert "a checkpoint of sae_ng.py, not of vae.py" in cli(S, "--sample", "--ckpt", tmp_path / "sae.pt", ok=False).stderr
    assert "checkpoint not found" in cli(S, "--sample", "--ckpt", tmp_path / "none.pt", ok=False).stderr
    (tmp_path / "junk.pt").write_text("junk")
    assert "not a readable checkpoint" in cli(S, "--eval", "--ckpt", tmp_path / "junk.pt", ok=False).stderr
    assert "--kl must be >= 0" in cli(S, "--train", "--kl", -1, ok=False).stderr
    assert "invalid choice" in cli(S, "--train", "--reduction", "max", ok=False).stderr
    assert "--width must be positive" in cli(S, "--train", "--width", 0, ok=False).stderr
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


@pytest.mark.parametrize("det", ["neutron", "proton"])
def test_shapes_seeds_and_loss(det):
    torch.manual_seed(0)
    shape = data.SHAPES[det]
    model = vae.build_model(dict(detector=det, width=4, hidden=16)).eval()
    x, cond = torch.rand(5, 1, *shape), torch.randn(5, 9)
    mu, logvar = model.encode(x, cond)
    assert mu.shape == logvar.shape == (5, vae.LATENT)
    dec = model.decode(mu, cond)
    assert dec.shape == x.shape and (dec >= 0).all()                          # ReLU output
    a = vae.sample(model, cond, torch.Generator().manual_seed(1))
    b = vae.sample(model, cond, torch.Generator().manual_seed(1))
    c = vae.sample(model, cond, torch.Generator().manual_seed(2))
    assert a.shape == (5,) + shape and torch.isfinite(a).all() and (a >= 0).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert vae.reconstruct(model, x, cond).shape == (5,) + shape
    loss, rec, kl = vae.vae_loss(model, x, cond, None, 0.7)
    assert kl.shape == (vae.LATENT,) and (kl >= 0).all()
    torch.testing.assert_close(loss, rec + 0.7 * kl.sum())
    _, rec_sum, _ = vae.vae_loss(model, x, cond, None, 0.7, "sum")        # summed over pixels instead of averaged
    torch.testing.assert_close(rec_sum, rec * shape[0] * shape[1])


def test_kl_is_the_gaussian_formula():
    class Fixed(torch.nn.Module):             # q(z | x, c) = N(1, e^1) in every dimension; decoder returns x
        def encode(self, x, cond):
            return torch.ones(len(x), vae.LATENT), torch.ones(len(x), vae.LATENT)

        def decode(self, z, cond):
            return torch.zeros(len(z), 1, 2, 2)
    x = torch.zeros(3, 1, 2, 2)
    loss, rec, kl = vae.vae_loss(Fixed(), x, torch.zeros(3, 9), None, 0.7)
    expected = 0.5 * (1 + torch.e - 1 - 1)   # 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) per dimension
    torch.testing.assert_close(kl, torch.full((vae.LATENT,), expected))
    assert rec.item() == 0
