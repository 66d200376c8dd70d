"""vae.py through its command line, and its pieces directly."""
import json
import math

import pytest
import torch

import data
import vae
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "vae.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


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
    assert "kl must be >= 0" in cli(S, "--train", "--set", "kl=-1", ok=False).stderr
    assert "beta must be >= 0" in cli(S, "--train", "--set", "beta=-1", ok=False).stderr
    assert "width, hidden, blocks: positive" in cli(S, "--train", "--set", "width=0", ok=False).stderr
    assert "arch is one of cnn, vdvae, vit" in cli(S, "--train", "--set", "arch=mlp", ok=False).stderr
    assert "invalid choice" in cli(S, "--train", "--variant", "gan", ok=False).stderr
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", out, ok=False).stderr


@pytest.mark.parametrize("flag", [["--reduction", "mean"], ["--cond", "every"], ["--enc-cond", "image"],
                                  ["--kl-anneal", "300"], ["--width", "12"]])
def test_flags_of_finished_experiments_are_gone(flag, capsys):
    """--reduction, --cond, --enc-cond and --kl-anneal ran at commit 75efdae (docs/models/vae.md); the sizes are
    settings (--set width=12)."""
    with pytest.raises(SystemExit):
        vae.get_args(["--train", *flag])
    assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


def test_a_checkpoint_without_a_format_number_is_refused_with_one_clear_line(run, tmp_path):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["format"] == data.FORMAT
    del ck["format"]                                                     # as written before the redesign
    torch.save(ck, tmp_path / "old.pt")
    e = cli(S, "--sample", "--ckpt", tmp_path / "old.pt", "--n", 5, "--out", tmp_path / "s.npz", ok=False)
    assert "trained by an older version of vae.py" in e.stderr and len(e.stderr.strip().splitlines()) == 1


def test_same_seed_same_losses_and_resume_equals_uninterrupted(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", b, "--set", "val_every=2")              # the same setting by --set
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
    model = vae.build_model({**vae.DEFAULTS, "detector": det, "width": 4, "hidden": 16}).eval()
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
    loss, rec, kl = vae.vae_loss(model, x, cond, None, 0.7)                 # summed over pixels
    assert kl.shape == (vae.LATENT,) and (kl >= 0).all()
    torch.testing.assert_close(loss, rec + 0.7 * kl.sum())
    torch.testing.assert_close(rec, (dec - x).pow(2).sum((1, 2, 3)).mean())


class Fixed(torch.nn.Module):
    """q(z | x, c) and the decoder's output set by hand."""
    supervised = False

    def __init__(self, mu, logvar, out):
        super().__init__()
        self.mu, self.logvar, self.out = mu, logvar, out

    def encode(self, x, cond):
        return self.mu, self.logvar

    def decode(self, z, cond):
        return self.out


def test_summed_reconstruction_and_kl_by_hand():
    # two 2x2 images; the decoder returns zeros, so the squared errors are 1 + 4 = 5 and 9: batch mean 7
    x = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 3.0]]]])
    mu, logvar = torch.zeros(2, vae.LATENT), torch.zeros(2, vae.LATENT)
    mu[0, 0] = 1.0                      # KL 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) = 0.5 (1 + 1 - 1 - 0) = 0.5
    logvar[1, 1] = math.log(2.0)        # KL 0.5 (0 + 2 - 1 - ln 2) = 0.153426
    model = Fixed(mu, logvar, torch.zeros(2, 1, 2, 2))
    loss, rec, kl = vae.vae_loss(model, x, torch.zeros(2, 9), None, 0.7)
    assert rec.item() == pytest.approx(7.0)
    expected_kl = [0.25, 0.5 * (1 - math.log(2.0)) / 2] + [0.0] * (vae.LATENT - 2)   # per dimension, batch mean
    torch.testing.assert_close(kl, torch.tensor(expected_kl))
    assert loss.item() == pytest.approx(7.0 + 0.7 * (0.25 + 0.076713), abs=1e-5)


def test_kl_is_the_gaussian_formula():
    x = torch.zeros(3, 1, 2, 2)             # q = N(1, e^1) in every dimension; the decoder returns x
    model = Fixed(torch.ones(3, vae.LATENT), torch.ones(3, vae.LATENT), torch.zeros(3, 1, 2, 2))
    loss, rec, kl = vae.vae_loss(model, x, torch.zeros(3, 9), None, 0.7)
    expected = 0.5 * (1 + torch.e - 1 - 1)   # 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) per dimension
    torch.testing.assert_close(kl, torch.full((vae.LATENT,), expected))
    assert rec.item() == 0


def test_optimiser_is_the_references_nesterov_adam():
    # optax.adam(1.4e-3, b1=0.76, b2=0.88, nesterov=True), first step on f(p) = p^2 at p = 1 (gradient 2):
    # m = (1 - b1) g, v = (1 - b2) g^2; update = lr [b1 m / (1 - b1^2) + (1 - b1) g / (1 - b1)] / (sqrt(v / (1 - b2)) + eps)
    #        = lr (1 + b1 / (1 + b1)) g / (|g| + eps) = 1.4e-3 x 1.431818...
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.NAdam([p], lr=1.4e-3, betas=vae.BETAS, eps=vae.EPS, momentum_decay=1e9)   # as train() builds it
    (p ** 2).sum().backward()
    opt.step()
    assert p.item() == pytest.approx(1 - 1.4e-3 * (1 + 0.76 / 1.76), abs=1e-7)


def test_paper_preset_and_precedence():
    a = vae.get_args(["--train", "--paper"])
    assert (a.batch_size, a.epochs, a.lr, a.kl, a.arch) == (256, 100, 3.5e-3, 0.7, "vit")    # Table 4.2, A.1 (ViT)
    b = vae.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "width=12"])
    assert (b.batch_size, b.lr, b.width, b.epochs) == (7, 0.123, 12, 100)                   # explicit flag wins
    d = vae.get_args(["--train"])
    assert (d.batch_size, d.kl, d.arch, d.width, d.hidden) == (vae.DEFAULTS["batch_size"], 0.7, "cnn", 8, 64)
    # each backbone's sizes lie over the presets, and explicit settings (flag, --set KEY=VALUE) over them
    v = vae.get_args(["--train", "--smoke", "--arch", "vit", "--set", "hidden=12", "--lr=0.01"])
    assert (v.width, v.hidden, v.blocks, v.lr, v.batch_size) == (16, 12, 1, 0.01, 32)
    assert vae.get_args(["--train", "--smoke", "--set=width=6"]).width == 6
    assert vae.get_args(["--train", "--set", "arch=vdvae"]).width == 16                   # the same as --arch
    assert vae.get_args(["--train", "--paper", "--arch", "cnn"]).hidden == 128
    n = sum(p.numel() for p in vae.build_networks(vars(a))["vae"].parameters())
    assert 0.9e6 < n < 1.2e6 and a.arch == "vit"                                            # "about one million"
    assert n == pytest.approx(vae.PUBLISHED["vae"][0], rel=1e-3)    # the authors' ViT VAE (+ decoder condition token)

