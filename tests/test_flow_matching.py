"""flow_matching.py through its command line, and its sampler directly."""
import json
import math

import pytest
import torch

import data
import flow_matching as fm
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "flow_matching.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "flow_matching" and ck["data"]["detector"] == det and ck["step"] == 6
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 50, "--out", out / "s.npz")   # no other flags
    resp = check_samples(out / "s.npz", data.SHAPES[det], 50)
    assert data.load(det, out / "s.npz").images.shape == resp.shape    # sample files load like data
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2, "--steps", 3, "--solver", "midpoint")
    r = check_eval(out / "eval_midpoint3.json")
    assert r["detector"] == det and r["steps"] == 3 and r["reps"] == 2 and r["n_test"] == 100 and not r["amp"]
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2, "--steps", 3, "--solver", "midpoint",
        "--amp")
    a = check_eval(out / "eval_midpoint3_amp.json")                   # bf16 on a CPU, beside (not over) the fp32 file
    assert a["amp"] and a["name"].endswith(" amp") and check_eval(out / "eval_midpoint3.json") == r
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1, "--sweep", "1,3")
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["solver"], r["steps"]) for r in rows] == [("euler", 1), ("euler", 3), ("midpoint", 1), ("midpoint", 3)]
    assert all(r["ms_per_sample"] > 0 and r["W"][0] >= 0 for r in rows)
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1)          # no sampler flags: the default
    d = check_eval(out / "eval.json")
    assert (d["steps"], d["solver"], d["rounding"]) == (4, "midpoint", "nearest")
    assert d["name"] == "flow_matching (midpoint 4, whole photons)"


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
    cli(S, "--train", "--smoke", "--out", b, "--set", "val_every=2")              # the same setting by --set
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
    model = fm.build_model({**fm.DEFAULTS, "width": 2, "attn_levels": 2}).eval()
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
    want = torch.expm1(torch.relu(x0[:, 0] + 1))
    for solver in ("euler", "midpoint"):
        out = fm.sample(Constant(), torch.zeros(4, 9), (44, 44), torch.Generator().manual_seed(0), 7, solver, "none")
        torch.testing.assert_close(out, want)
    torch.testing.assert_close(fm.sample(Constant(), torch.zeros(4, 9), (44, 44), g, steps=7), want.round())  # default


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_is_the_published_setting_and_explicit_flags_win():
    a = fm.get_args(["--train", "--paper"])
    nets = fm.build_networks(vars(a))
    assert n_params(nets["unet"]) == 77_372 == fm.PUBLISHED["unet"][0]          # the published count, exactly
    assert (a.unet, a.width, a.mults, a.n_res, a.heads, a.attn_levels) == ("published", 4, [2, 3, 4], 2, 2, 2)
    assert (a.lr, a.betas, a.schedule, a.warmup, a.batch_size, a.epochs) == (4.4e-4, [0.7, 0.88], "constant", "0", 256, 50)
    assert (a.t_max, a.grad_clip, a.ema) == (0.99, 0.0, 0.0)
    b = fm.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "width=8", "--set", "heads=1"])
    assert (b.batch_size, b.lr, b.width, b.heads, b.unet, b.epochs) == (7, 0.123, 8, 1, "published", 50)
    d = fm.get_args(["--train"])                                                  # the measured CPU default
    assert (d.unet, d.width, d.attn_levels, d.heads, d.lr, d.epochs, d.t_max, d.ema) == ("compact", 4, 1, 1, 2e-3, 2, 1.0, 0.999)
    assert n_params(fm.build_model(vars(d))) == 89_289


@pytest.mark.parametrize("unet", ["compact", "published"])
@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_four_level_unets_run_on_both_detectors(unet, shape):
    model = fm.build_model(dict(unet=unet, width=2, mults=[1, 2, 3, 4], n_res=1, heads=2, attn_levels=2)).eval()
    x, t, c = torch.randn(3, 1, *shape), torch.rand(3), torch.randn(3, 9)
    with torch.no_grad():
        out = model(x, t, c)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, model(x, t, torch.randn(3, 9)))            # the condition reaches the output


def test_published_attention_keeps_each_pixel_in_place():
    """With a zero output projection the block is the identity: the token is dropped, no pixel moves (the
    authors' code drops the first pixel instead and shifts the map by one)."""
    att = fm.PubAttention(6, 4, 8, heads=2)
    x, c = torch.randn(2, 6, 5, 7), torch.randn(2, 8)
    torch.nn.init.zeros_(att.out.weight)
    torch.testing.assert_close(att(x, c), x)
    torch.nn.init.normal_(att.out.weight)
    y = att(x, c)
    assert y.shape == x.shape and not torch.allclose(y, x) and not torch.allclose(y, att(x, torch.randn(2, 8)))


def test_training_times_lie_in_0_t_max():
    class Recorder(torch.nn.Module):
        def forward(self, x, t, c):
            self.t = t
            return torch.zeros_like(x)
    rec, g = Recorder(), torch.Generator().manual_seed(0)
    fm.fm_loss(rec, torch.zeros(20_000, 1, 2, 2), torch.zeros(20_000, 9), g, t_max=0.99)
    assert rec.t.min() >= 0 and rec.t.max() < 0.99
    assert rec.t.max() > 0.985 and rec.t.min() < 0.005 and abs(rec.t.mean().item() - 0.495) < 0.01


def test_lr_schedules():
    const = fm.lr_factor("constant", "0", 1000)
    assert [const(s) for s in (0, 500, 999, 5000)] == [1.0] * 4                 # the paper: constant, no warm-up
    cos = fm.lr_factor("cosine", "10%", 1000)                                      # 100 warm-up steps
    assert cos(0) == pytest.approx(0.01) and cos(99) == pytest.approx(math.cos(math.pi * 0.099) / 2 + 0.5)
    assert cos(500) == pytest.approx(0.5) and cos(1000) == pytest.approx(0.0, abs=1e-12)
    assert fm.lr_factor("cosine", "100", 1000)(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.049)) / 2)


@pytest.mark.parametrize("flags,msg", [(("--set", "heads=3"), "heads must divide"), (("--set", "warmup=ten"), "warmup takes"),
                                       (("--set", "betas=0.9"), "betas takes"), (("--set", "mults=2,0"), "mults: 1-5 positive"),
                                       (("--set", "t_max=1.5"), "t_max must be in"), (("--set", "attn_levels=4"), "attn_levels"),
                                       (("--set", "t_maxx=1"), "unknown setting 't_maxx'"),
                                       (("--set", "width=wide"), "not a value of the setting's type (int"),
                                       (("--set", "lr=1", "--lr", "2"), "also given as a flag")])
def test_bad_network_flags_are_argparse_errors(flags, msg, capsys):
    with pytest.raises(SystemExit) as e:
        fm.get_args(["--train", *flags])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_paper_smoke_trains_the_published_unet(tmp_path, smoke_run):
    smoke_run(S, "--paper", to=tmp_path / "p")
    ck = torch.load(tmp_path / "p" / "ckpt.pt", weights_only=True)
    assert ck["args"]["unet"] == "published" and ck["args"]["t_max"] == 0.99 and ck["step"] == 6
    assert ck["n_params"] == n_params(fm.build_model(ck["args"]))
    cli(S, "--sample", "--ckpt", tmp_path / "p" / "ckpt.pt", "--n", 20, "--out", tmp_path / "s.npz")
    check_samples(tmp_path / "s.npz", (44, 44), 20)


def test_default_sampler_is_midpoint_4_and_the_paper_keeps_euler_11():
    assert fm.sampler_for(fm.get_args(["--sample"]), False) == (4, "midpoint", "nearest")   # CPU default: 8 calls
    assert fm.sampler_for(fm.get_args(["--sample"]), True) == (11, "euler", "none")          # a --paper checkpoint
    assert fm.sampler_for(fm.get_args(["--sample", "--steps", "7"]), True) == (7, "euler", "none")   # flags win
    assert fm.sampler_for(fm.get_args(["--sample", "--solver", "euler", "--rounding", "none"]), False) == (4, "euler", "none")
    a, p = fm.get_args(["--train"]), fm.get_args(["--train", "--paper"])             # validation samples the same way
    assert (a.steps, a.solver, a.rounding, p.steps, p.solver, p.rounding) == (4, "midpoint", "nearest", 11, "euler", "none")
    s = fm.Sampler(torch.nn.Identity(), (44, 44))
    assert (s.meta["steps"], s.meta["solver"], s.meta["nfe"]) == (4, "midpoint", 8)  # bench.py's NFE column


class Ramp(torch.nn.Module):                   # v = a fixed image of fractional log counts: x(1) = x(0) + ramp
    def forward(self, x, t, cond):
        return torch.linspace(0, 3, x[0].numel()).reshape(x.shape[1:]).expand_as(x)


def test_rounding_gives_whole_photons_and_none_keeps_the_continuous_counts():
    cond, g = torch.zeros(3, 9), lambda: torch.Generator().manual_seed(0)
    c = fm.sample(Ramp(), cond, (4, 5), g(), steps=2, solver="euler", rounding="none")
    r = fm.sample(Ramp(), cond, (4, 5), g(), steps=2, solver="euler")                # default: nearest
    assert (c != c.round()).any() and torch.equal(r, c.round()) and (r >= 0).all()


def test_amp_on_a_cpu_samples_with_contiguous_weights(run):
    """bf16 autocast is slow on channels-last weights on a CPU (oneDNN): --amp loads them contiguous, fp32 NHWC."""
    det, out = run
    is_nhwc = lambda m: all(p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() == 4)
    is_flat = lambda m: all(p.is_contiguous() for p in m.parameters())
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    load = lambda *flags: fm.load_sampler(ck, fm.get_args(["--sample", *flags]), torch.device("cpu")).model
    assert is_nhwc(load()) and not is_flat(load())
    assert is_flat(load("--amp"))


@pytest.mark.parametrize("amp", [False, True])
def test_channel_norm_is_layer_norm_over_the_channels_of_each_pixel(amp):
    """The one-reduction ChannelNorm (issue 37) computes what nn.LayerNorm over channels-last pixels does, also
    under bf16 autocast (to bf16 rounding; the output keeps the input's dtype), for NCHW and channels-last."""
    torch.manual_seed(0)
    norm, ref = fm.ChannelNorm(12), torch.nn.LayerNorm(12, eps=1e-6)
    for p in (norm.weight, norm.bias):
        torch.nn.init.normal_(p)
    ref.load_state_dict(norm.state_dict())                               # the same parameter names
    x = 3 * torch.randn(4, 12, 7, 5) + 1
    for inp in (x, x.to(memory_format=torch.channels_last)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            h = torch.nn.functional.conv2d(inp, torch.eye(12)[:, :, None, None])   # bf16 under autocast
            got, want = norm(h), ref(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert got.dtype == h.dtype == (torch.bfloat16 if amp else torch.float32)
        tol = 2e-2 if amp else 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert not torch.allclose(norm(x), ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + 1e-3)   # the check can fail
