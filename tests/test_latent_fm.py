"""latent_fm.py through its command line, and its pieces directly."""
import argparse
import json

import pytest
import torch

import data
import latent_fm as lfm
from helpers import assert_same_weights, check_eval, check_samples, cli, weights

S = "latent_fm.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model"] == "latent_fm" and ck["steps"] == {"1": 4, "2": 4}
    assert ck["scale"] > 0
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 40, "--out", out / "s.npz")
    check_samples(out / "s.npz", data.SHAPES[det], 40)
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2)
    assert "reconstruction Wasserstein" in e.stdout
    r = check_eval(out / "eval.json")
    assert r["reconstruction_W"] >= 0 and (r["steps"], r["solver"], r["rounding"]) == lfm.SAMPLER["default"]
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1, "--sweep", "1,2")
    assert [(r["solver"], r["steps"]) for r in json.loads((out / "sweep.json").read_text())["rows"]] == [
        ("euler", 1), ("euler", 2), ("midpoint", 1), ("midpoint", 2)]


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
    assert "a multiple of heads" in cli(S, "--train", "--set", "width=3", ok=False).stderr


def test_an_older_checkpoint_is_refused_with_one_clear_line(run, tmp_path):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    del ck["format"]                                            # as written before checkpoint format numbers
    torch.save(ck, tmp_path / "old.pt")
    e = cli(S, "--sample", "--ckpt", tmp_path / "old.pt", "--out", tmp_path / "s.npz", ok=False)
    assert "trained by an older version of latent_fm.py" in e.stderr and len(e.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_shapes(shape):
    vae, unet = lfm.build_model({**lfm.DEFAULTS, "vae_width": 4, "width": 4})
    x = torch.rand(3, 1, *shape)
    mu, logvar = vae.encode(x)
    assert mu.shape == (3,) + lfm.latent_shape(shape) and logvar.shape == mu.shape
    assert vae.decode(mu, shape).shape == x.shape
    assert unet(mu, torch.rand(3), torch.randn(3, 9)).shape == mu.shape
    out = lfm.sample(vae, unet, torch.randn(3, 9), shape, 1.0, torch.Generator().manual_seed(0), steps=2)
    assert out.shape == (3,) + shape and torch.isfinite(out).all() and (out >= 0).all()


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_counts_optimisers_and_precedence():
    a = lfm.get_args(["--train", "--paper"])
    nets = lfm.build_networks(vars(a))
    assert (n_params(nets["vae"]), n_params(nets["unet"])) == (58_473, 127_824)  # published 59,348; 127,824
    assert (a.epochs, a.epochs2, a.batch_size, a.lr, a.lr2) == (50, 50, 256, 2.3e-3, 1.3e-3)
    assert (a.betas, a.betas2) == ([0.58, 0.75], [0.9, 0.6])
    assert (a.schedule, a.warmup, a.weight_decay, a.grad_clip, a.ema, a.t_max) == ("onecycle", "20%", 0.0, 0.0, 0.0, 0.99)
    b = lfm.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "width=12"])
    assert (b.batch_size, b.lr, b.lr2, b.width, b.vae_width, b.unet) == (7, 0.123, 1.3e-3, 12, 21, "published")
    d = lfm.get_args(["--train", "--lr", "0.01"])                                # the CPU default: --lr sets both stages
    assert (d.lr, d.lr2, d.betas2, d.weight_decay, d.schedule, d.epochs2) == (0.01, 0.01, [0.9, 0.999], 0.01, "cosine", 6)
    assert [n_params(m) for m in lfm.build_model(vars(d))] == [53_169, 129_344]
    e = lfm.get_args(["--train", "--set", "lr2=0.01", "--set", "betas2=0.5,0.6", "--set", "epochs2=2"])
    assert (e.lr, e.lr2, e.betas, e.betas2, e.epochs2) == (2e-3, 0.01, [0.9, 0.999], [0.5, 0.6], 2)


def test_paper_builds_the_authors_latent_unet():
    """faster_zdc's LatentFMUnet is its pixel UNet at width 8, mults 1/2/4, one block per level, 2 heads, on the
    4 latent channels: 127,824 parameters (--paper built a 129,344-parameter compact UNet before), and the same
    function as flow_matching.py's published UNet at those settings, weight for weight."""
    import flow_matching
    unet = lfm.build_networks(vars(lfm.get_args(["--train", "--paper"])))["unet"]
    assert type(unet) is lfm.PublishedLatentUNet and n_params(unet) == 127_824
    attn = [(m.qkv.in_features, m.qkv.out_features // 3) for m in unet.modules() if isinstance(m, lfm.PubAttention)]
    assert attn == [(8, 16), (32, 32), (48, 16)]            # (d, qkv features): down level 2, middle, up level 2
    ref = flow_matching.PublishedUNet(width=8, mults=(1, 2, 4), n_res=1, heads=2, attn_levels=2, cin=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), unet.parameters(), strict=True):
            assert p.shape == q.shape
            q.copy_(p.normal_(0, 0.3))
    for shape in [(11, 11), (14, 8)]:                                           # ZN and ZP latents
        z, t, c = torch.randn(3, 4, *shape), torch.rand(3), torch.randn(3, 9)
        assert torch.allclose(unet(z, t, c), ref(z, t, c), atol=1e-5)
    default = lfm.build_networks(vars(lfm.get_args(["--train"])))["unet"]
    assert type(default) is lfm.LatentUNet and n_params(default) == 129_344   # the CPU default is unchanged


def test_paper_prints_its_deviations_and_evaluates_as_the_authors(tmp_path):
    line = data.paper_line(lfm)
    assert all(d in line for d in lfm.DEVIATIONS) and "docs/fidelity/latent_fm.md" in line
    assert all(len(d) <= 100 for d in lfm.DEVIATIONS) and any("LPIPS" in d for d in lfm.DEVIATIONS)
    a = lfm.get_args(["--eval", "--paper", "--ckpt", "x.pt"])               # faster_zdc train_loop: the whole
    assert (a.protocol, a.max_test, a.channels) == ("pooled", 0, "even")   # test split, 5 generations pooled
    a = lfm.get_args(["--eval", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test) == ("mean-of-reps", 10000)
    t = cli(S, "--train", "--paper", "--smoke", "--out", tmp_path)          # the published UNet end to end
    assert t.stdout.startswith("--paper differs from the publication in: ")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["args"]["unet"] == "published" and "inp.weight" in ck["ema"]
    cli(S, "--eval", "--ckpt", tmp_path / "ckpt.pt", "--max-test", 60, "--reps", 2)
    r = check_eval(tmp_path / "eval.json")
    assert (r["steps"], r["solver"], r["rounding"]) == lfm.SAMPLER["paper"]


def test_onecycle_schedule_is_optax_cosine_onecycle():
    f = lfm.lr_factor("onecycle", "20%", 1000)                                  # peak/25 -> peak at 20 % -> peak/25,000
    assert f(0) == pytest.approx(1 / 25) and f(100) == pytest.approx((1 + 1 / 25) / 2) and f(200) == pytest.approx(1.0)
    assert f(600) == pytest.approx((1 + 1 / 25_000) / 2) and f(1000) == pytest.approx(1 / 25_000)
    g = lfm.lr_factor("cosine", "100", 1000)                                     # the CPU default: unchanged
    assert g(0) == pytest.approx(0.01) and g(500) == pytest.approx(0.5)


def test_stage2_times_lie_in_0_t_max():
    class Recorder(torch.nn.Module):
        def forward(self, z, t, c):
            self.t = t
            return torch.zeros_like(z)
    rec = Recorder()
    lfm.fm_loss(rec, torch.zeros(20_000, 4, 2, 2), torch.zeros(20_000, 9), torch.Generator().manual_seed(0), t_max=0.99)
    assert rec.t.min() >= 0 and 0.985 < rec.t.max() < 0.99


def test_poisson_counts_by_default_the_paper_keeps_the_decoder_output(run, tmp_path):
    det, out = run
    shape = data.SHAPES[det]
    vae, unet = lfm.build_model({**lfm.DEFAULTS, "vae_width": 4, "width": 4})
    s = lfm.Sampler(vae, unet, shape, 1.0, 2)
    assert list(s.noise_shapes(3)) == ["z0", "u_counts", "z_counts"] and s.meta["rounding"] == "poisson"
    assert list(lfm.Sampler(vae, unet, shape, 1.0, 2, "none").noise_shapes(3)) == ["z0"]
    with pytest.raises(ValueError, match="rounding must be one of"):
        lfm.Sampler(vae, unet, shape, 1.0, 2, "floor")
    cond, g = torch.randn(4, 9), lambda: torch.Generator().manual_seed(1)
    for rounding in ("poisson", "nearest"):
        c = lfm.sample(vae, unet, cond, shape, 1.0, g(), 2, rounding)
        assert torch.equal(c, c.round())
    mean = lfm.sample(vae, unet, cond, shape, 1.0, g(), 2, "none")
    assert not torch.equal(mean, mean.round())
    assert torch.equal(lfm.sample(vae, unet, cond, shape, 1.0, g(), 2, "nearest"), mean.round())   # same z0 first
    none = argparse.Namespace(rounding=None)
    assert (lfm.sampler_for(none, False)[2], lfm.sampler_for(none, True)[2]) == ("poisson", "none")
    assert lfm.sampler_for(argparse.Namespace(rounding="nearest"), True)[2] == "nearest"   # an explicit flag wins
    a = lfm.get_args(["--eval", "--ckpt", str(out / "ckpt.pt")])
    lfm.load_sampler(data.load_checkpoint(out / "ckpt.pt", "latent_fm"), a, torch.device("cpu"))
    assert (a.steps, a.solver, a.rounding) == lfm.SAMPLER["default"] == (2, "midpoint", "poisson")   # CPU default
    assert lfm.sampler_for(none, True) == (8, "euler", "none")         # the paper's sampler
    assert lfm.sampler_for(argparse.Namespace(rounding=None, steps=3, solver="euler"), False)[:2] == (3, "euler")
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1, "--rounding", "none")
    steps, solver, _ = lfm.SAMPLER["default"]
    r = check_eval(out / f"eval_{solver}{steps}_none.json")           # not the default: its own file
    assert r["rounding"] == "none" and f"({solver} {steps})" in r["name"]
    assert "invalid choice: 'floor'" in cli(S, "--eval", "--rounding", "floor", ok=False).stderr


def test_midpoint_solver_integrates_a_linear_velocity_exactly_euler_does_not():
    class Ramp(torch.nn.Module):                       # dz/dt = t: z(1) = z(0) + 1/2
        def forward(self, z, t, c):
            return t.view(-1, 1, 1, 1).expand_as(z)
    vae, _ = lfm.build_model({**lfm.DEFAULTS, "vae_width": 4, "width": 4})
    cond, z0 = torch.zeros(3, 9), torch.zeros(3, 4, 11, 11)
    mid = lfm.Sampler(vae, Ramp(), data.SHAPES["neutron"], 1.0, 2, solver="midpoint")
    euler = lfm.Sampler(vae, Ramp(), data.SHAPES["neutron"], 1.0, 2, solver="euler")
    assert torch.allclose(mid.integrate(cond, z0), torch.full_like(z0, 0.5))
    assert torch.allclose(euler.integrate(cond, z0), torch.full_like(z0, 0.25))
    assert (mid.meta["nfe"], euler.meta["nfe"]) == (4, 2)
    with pytest.raises(ValueError, match="solver one of"):
        lfm.Sampler(vae, Ramp(), data.SHAPES["neutron"], 1.0, 2, solver="rk4")
