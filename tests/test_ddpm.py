"""ddpm.py through its command line, and its samplers directly."""
import json
import math
import zlib

import pytest
import torch

import data
import ddpm
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "ddpm.py"


def tiny(**kw):
    """A small ddpm network: the CPU default's settings, width 2, changed by `kw`."""
    return ddpm.build_model({**ddpm.DEFAULTS, "width": 2, **kw})


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "ddpm" and ck["data"]["detector"] == det and ck["step"] == 6
    fresh = ddpm.build_model(ck["args"])                                # the EMA averages parameters, not the schedule
    assert torch.equal(ck["ema"]["alphas_cumprod"], fresh.alphas_cumprod)
    assert torch.equal(ck["weights"]["alphas_cumprod"], fresh.alphas_cumprod)
    assert ck["ema"]["x_max"] == ck["weights"]["x_max"] < ddpm.X_MAX                  # set from the training data
    assert ck["ema"]["x_std"] == ck["weights"]["x_std"] != fresh.x_std
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 20, "--out", out / "s.npz")   # no other flags
    resp = check_samples(out / "s.npz", data.SHAPES[det], 20)
    assert data.load(det, out / "s.npz").images.shape == resp.shape    # sample files load like data
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1, "--steps", 3, "--eta", 0)
    r = check_eval(out / "eval_steps3_eta0.json")
    assert r["detector"] == det and (r["steps"], r["eta"]) == (3, 0) and r["reps"] == 1 and r["n_test"] == 60
    if det == "neutron":
        cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 1, "--sweep", "1,2", "--plot")
        rows = json.loads((out / "sweep.json").read_text())["rows"]
        assert [(r["eta"], r["steps"]) for r in rows] == [(e, n) for e in (0.0, 0.7, 1.0) for n in (1, 2)]
        assert all(r["ms_per_sample"] > 0 and r["W"][0] >= 0 for r in rows)
        assert len({r["ms_per_sample"] for r in rows if r["steps"] == 2}) == 1    # eta does not change the cost: timed once
        assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_are_channels_last_and_sample_as_contiguous_ones(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    model = ddpm.load_sampler(ck, ddpm.get_args(["--sample"]), torch.device("cpu")).model.eval()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)                   # (1-channel and 1x1 kernels are both)
    flat = ddpm.build_model(ck["args"])
    flat.load_state_dict(ck["ema"])
    shape, g = data.SHAPES[det], lambda: torch.Generator().manual_seed(3)
    cond = torch.randn(4, 9, generator=g())
    a, b = ddpm.sample(model, cond, shape, g(), 3, 0.0), ddpm.sample(flat.eval(), cond, shape, g(), 3, 0.0)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)                  # the same arithmetic in another layout


def test_wrong_checkpoints_give_clear_errors(run, tmp_path):
    det, out = run
    other = "proton" if det == "neutron" else "neutron"
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--detector", other, ok=False)
    assert f"trained on the {det} detector" in e.stderr
    if det == "proton":
        return
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", out, ok=False).stderr
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["model"] = "flow_matching"
    torch.save(ck, tmp_path / "fm.pt")
    assert "a checkpoint of flow_matching.py, not of ddpm.py" in cli(S, "--sample", "--ckpt", tmp_path / "fm.pt", ok=False).stderr
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    del ck["format"]                                                   # written before checkpoint format numbers
    torch.save(ck, tmp_path / "old.pt")
    e = cli(S, "--sample", "--ckpt", tmp_path / "old.pt", ok=False).stderr
    assert "trained by an older version of ddpm.py" in e and "retrain, or check out commit" in e
    (tmp_path / "junk.pt").write_text("junk")                          # the same errors, in-process (faster)
    for name, msg in [("none.pt", "checkpoint not found"), ("junk.pt", "not a readable checkpoint")]:
        with pytest.raises(data.DataError, match=msg):
            data.load_checkpoint(tmp_path / name, ddpm.NAME)


@pytest.mark.parametrize("flags,msg", [(("--steps", 0), "--steps must be between 1 and 1000"),
                                       (("--steps", 1001), "--steps must be between 1 and 1000"),
                                       (("--eta", -0.1), "--eta must be in [0, 1]"), (("--eta", 1.5), "--eta must be in [0, 1]"),
                                       (("--eta", "nan"), "--eta must be in [0, 1]"), (("--sweep", "5,0"), "argument --sweep"),
                                       (("--sweep", "5,1001"), "--sweep takes"),
                                       (("--set", "mults=2,x"), "not a value of the setting's type (list"),
                                       (("--set", "mults=2,0"), "mults: 1-5 positive"),
                                       (("--set", "heads=3"), "heads must divide"), (("--set", "warmup=5 %"), "warmup takes"),
                                       (("--set", "betas=0.9,1"), "betas takes"), (("--set", "adam_eps=0"), "adam_eps"),
                                       (("--set", "weight_decay=-1"), "weight_decay"),
                                       (("--set", "steps=3"), "unknown setting 'steps'"),
                                       (("--set", "unet=diffusers"), "unet: compact or published"),
                                       (("--set", "spacing=leading"), "spacing takes linspace or trailing"),
                                       (("--set", "x0_clip=-1"), "x0_clip must be >= 0")])
def test_bad_flags_are_argparse_errors(flags, msg, capsys):
    with pytest.raises(SystemExit) as e:
        ddpm.get_args(["--sample", *map(str, flags)])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_sampler_rejects_bad_steps_and_eta():
    with pytest.raises(ValueError, match="steps must be between"):
        ddpm.ddim_timesteps(1001)
    with pytest.raises(ValueError, match="eta must be in"):
        ddpm.sample(tiny(mults=[2], attn_levels=0), torch.zeros(1, 9), (8, 8), steps=2, eta=2.0)


def test_same_seed_same_losses_and_resume_equals_uninterrupted(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    cli(S, "--train", "--smoke", "--out", a, "--set", "val_every=2")                  # the setting by --set
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--max-steps", 4)       # "killed" at step 4
    assert losses(c) == losses(a)[:2]                                                  # same seed, same losses
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")             # continues to step 6
    assert torch.load(c / "ckpt.pt", weights_only=True)["step"] == 6 and len(losses(a)) == 3
    assert losses(c) == pytest.approx(losses(a), rel=1e-5)
    assert_same_weights(weights(a), weights(c))
    assert_same_weights(weights(a, "ema"), weights(c, "ema"))


def test_schedule_and_timesteps():
    m = tiny()
    assert [n for n, _ in m.named_buffers()] == ["alphas_cumprod", "x_max", "x_std"]  # buffers, not parameters
    abar = m.alphas_cumprod.double()
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    torch.testing.assert_close(betas, torch.linspace(1e-4, 2e-2, 1000, dtype=abar.dtype), rtol=1e-3, atol=1e-7)
    assert m.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)           # prod(1 - beta): x_999 ~ noise
    assert ddpm.ddim_timesteps(1) == [999]
    assert ddpm.ddim_timesteps(5) == [999, 749, 500, 250, 0]
    assert ddpm.ddim_timesteps(1000) == list(range(999, -1, -1))
    for n in (2, 7, 50, 333, 999):
        ts = ddpm.ddim_timesteps(n)
        assert len(ts) == n and ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))


class TinyEps(torch.nn.Module):
    """A tiny untrained noise predictor with ddpm's buffers: the eps that makes a one-conv denoiser D(x) the x0
    prediction, plus a t- and condition-dependent error (large x0 errors at high t, which clipping catches)."""

    def __init__(self, x_max=3.0):
        super().__init__()
        for k, v in tiny(mults=[2], attn_levels=0).named_buffers():
            self.register_buffer(k, v)
        self.x_max.fill_(x_max)
        self.x0_clip, self.spacing = 0.0, "linspace"                 # the CPU default's sampling
        self.conv, self.lin = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Linear(9, 1)

    def forward(self, x, t, c):
        a = self.alphas_cumprod[t][:, None, None, None]
        err = (torch.sin(t / 50.0)[:, None] + self.lin(c))[:, :, None, None]
        return (x - a.sqrt() * (1.5 + torch.tanh(self.conv(x)))) / (1 - a).sqrt() + 0.05 * err


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_1000_steps_eta_1_is_ancestral_ddpm(clip):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)                       # float64 throughout: equal to rounding error
    try:
        model, cond = TinyEps().double(), torch.randn(3, 9)

        def run(fn, **kw):
            return torch.log1p(fn(model, cond, (8, 12), torch.Generator().manual_seed(7), clip=clip, **kw))
        ref = run(ddpm.ddpm_ancestral)
        ddim = run(ddpm.sample, steps=1000, eta=1.0)
        eta0 = run(ddpm.sample, steps=1000, eta=0.0)
    finally:
        torch.set_default_dtype(default)
    inside = ((ref > 0.01) & (ref < 2.99)).float().mean()       # not all clipped to 0 or x_max = 3
    assert torch.isfinite(ref).all() and inside > 0.5 and ref.std() > 0.05
    torch.testing.assert_close(ddim, ref, rtol=1e-6, atol=1e-6)            # float32 counts of a float64 sampler
    assert (ddim - eta0).abs().max() > 0.005                     # the noise draws matter


class Oracle(torch.nn.Module):
    """The exact noise predictor for a data set of one image x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def __init__(self, x0, x0_clip=0.0, spacing="linspace"):
        super().__init__()
        self.x0, self.x0_clip, self.spacing = x0, x0_clip, spacing
        for k, v in tiny(mults=[2], attn_levels=0).named_buffers():
            self.register_buffer(k, v)

    def forward(self, x, t, c):
        a = self.alphas_cumprod[t][:, None, None, None]
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("steps,eta,spacing", [(1, 0.0, "linspace"), (5, 0.0, "linspace"), (5, 0.7, "linspace"),
                                               (50, 1.0, "linspace"), (1000, 0.3, "linspace"), (5, 0.7, "trailing"),
                                               (50, 0.7, "trailing"), (7, 1.0, "trailing")])
def test_ddim_returns_the_data_point_for_an_exact_noise_predictor(steps, eta, spacing):
    x0 = torch.rand(1, 1, 6, 5) * 4                          # any t-indexing slip gives a different result
    out = ddpm.sample(Oracle(x0, spacing=spacing), torch.zeros(2, 9), (6, 5), torch.Generator().manual_seed(0),
                      steps, eta)
    torch.testing.assert_close(out, torch.expm1(x0[:, 0]).expand(2, 6, 5), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_sampler_shapes_seeds_and_etas(shape):
    torch.manual_seed(0)
    model = tiny(attn_levels=2).eval()
    cond = torch.randn(5, 9)
    x = ddpm.sample(model, cond, shape, torch.Generator().manual_seed(1), steps=3)
    y = ddpm.sample(model, cond, shape, torch.Generator().manual_seed(1), steps=3)
    z = ddpm.sample(model, cond, shape, torch.Generator().manual_seed(1), steps=3, eta=0.0)
    assert x.shape == (5,) + shape and torch.isfinite(x).all() and (x >= 0).all()
    assert torch.equal(x, y) and not torch.equal(x, z)


def test_reference_size_and_the_thesis_optimiser():
    a = ddpm.get_args(["--train", "--paper"])
    model = ddpm.build_networks(vars(a))["unet"]
    n = sum(p.numel() for p in model.parameters())
    assert type(model) is ddpm.PublishedUNet and n == 4_255_585 == ddpm.PUBLISHED["unet"][0]   # diffusers' count
    assert [m.heads for m in model.modules() if isinstance(m, ddpm.XAttention)] == [4] * 12      # 6 Transformers
    assert (a.lr, a.betas, a.adam_eps, a.weight_decay, a.schedule, a.warmup) == (2.8e-5, [0.87, 0.82], 2.5e-5, 5.5e-4, "cosine", "10%")
    assert (a.batch_size, a.epochs, a.grad_clip, a.width, a.mults, a.ema) == (256, 100, 1.0, 16, [1, 2, 4, 8], 0.0)
    assert (a.eps_skip, a.x0_clip, a.spacing, a.protocol, a.max_test) == (False, 7.0, "trailing", "pooled", 0)
    with torch.no_grad():                                      # unpadded: ZP 56x30 -> 28x15 -> 14x8 -> 7x4 and back
        assert model(torch.zeros(1, 1, 56, 30), torch.tensor([999]), torch.zeros(1, 9)).shape == (1, 1, 56, 30)


def test_explicit_flags_beat_paper_and_the_cpu_default_is_unchanged():
    a = ddpm.get_args(["--train", "--paper", "--set", "width=8", "--batch-size", "7", "--lr", "0.123",
                       "--set", "attn_levels=1"])
    assert (a.width, a.batch_size, a.lr, a.attn_levels, a.mults, a.heads) == (8, 7, 0.123, 1, [1, 2, 4, 8], 4)
    d = ddpm.get_args(["--train"])
    assert (d.width, d.mults, d.attn_levels, d.heads, d.lr, d.betas, d.weight_decay, d.warmup) == (
        4, [2, 3, 4], 1, 1, 2e-3, [0.9, 0.999], 0.0, "100")
    assert (d.unet, d.eps_skip, d.x0_clip, d.spacing, d.ema, d.max_test) == ("compact", True, 0.0, "linspace",
                                                                          0.999, 10000)
    assert (d.steps, d.eta, d.val_every, d.epochs) == (50, 0.7, 1000, 1)
    assert sum(p.numel() for p in ddpm.build_model(vars(d)).parameters()) == 89_289   # the CPU default


def test_warmup_percentage_then_cosine():
    f = ddpm.lr_factor("cosine", "10%", 2000)                   # 200 warm-up steps, then cosine to 0 at step 2000
    assert f(0) == pytest.approx(1 / 200) and f(99) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 99 / 2000)))
    assert f(1000) == pytest.approx(0.5) and f(2000) == pytest.approx(0.0, abs=1e-12)
    assert ddpm.lr_factor("constant", "0", 10)(7) == 1.0


def paper_net(**kw):
    """The --paper network at a small width (4: channels 4/8/16/32, 4 heads), fresh weights."""
    torch.manual_seed(0)
    return ddpm.build_model({**vars(ddpm.get_args(["--train", "--paper"])), "width": 4, **kw}).eval()


def test_paper_trains_without_an_ema_and_samples_its_weights(tmp_path):
    cli(S, "--train", "--paper", "--smoke", "--out", tmp_path)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["args"]["ema"] == 0.0 and ck["args"]["unet"] == "published" and ck["step"] == 6
    w, e = ck["weights"], ck["ema"]
    assert set(w) == set(e) and all(torch.equal(w[k], e[k]) for k in w)     # the sampled weights are the trained ones
    assert e["x_std"] != 0.5 and e["x_max"] < ddpm.X_MAX                       # with the data's range and scale
    cli(S, "--sample", "--ckpt", tmp_path / "ckpt.pt", "--n", 6, "--out", tmp_path / "s.npz")
    check_samples(tmp_path / "s.npz", data.SHAPES["neutron"], 6)


def test_paper_eps_is_the_networks_output_exactly():
    got = {}
    for skip in (False, True):                                # --paper: plain eps (eq. 3.30); the CPU default's skip
        model = paper_net(eps_skip=skip)
        model.out.register_forward_hook(lambda m, i, o: got.update(out=o))
        x, t, c = torch.randn(3, 1, 44, 44), torch.tensor([0, 500, 999]), torch.randn(3, 9)
        with torch.no_grad():
            eps = model(x, t, c)
        assert torch.equal(eps, got["out"]) != skip
    assert paper_net().eps_skip is False and tiny().eps_skip is True


def test_the_condition_reaches_the_paper_network_only_through_cross_attention():
    full = ddpm.build_model(vars(ddpm.get_args(["--train", "--paper"])))
    blocks = [m for m in full.modules() if isinstance(m, ddpm.Transformer)]
    assert sorted(b.proj_in.in_channels for b in blocks) == [64] * 5 + [128]     # 64-channel level, the middle
    assert all(b.attn2.kv.in_features == 32 for b in blocks) and full.ctx.in_features == 9
    model, t = paper_net(), torch.tensor([10, 700])
    x, c1, c2 = torch.randn(2, 1, 44, 44), torch.randn(2, 9), torch.randn(2, 9)
    with torch.no_grad():
        assert torch.equal(model.embed(t, c1)[0], model.embed(t, c2)[0])      # the time embedding has no condition
        assert not torch.allclose(model(x, t, c1), model(x, t, c2))
        hooks = [m.attn2.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
                 for m in model.modules() if isinstance(m, ddpm.Transformer)]
        assert torch.equal(model(x, t, c1), model(x, t, c2))                   # cross-attention off: no condition
        for h in hooks:
            h.remove()


def test_x0_clip_the_authors_range_and_the_data_range():
    x0 = torch.tensor([-3.0, 2.0, 10.0]).reshape(1, 1, 1, 3)
    xt, cond = torch.randn(1, 1, 1, 3), torch.zeros(1, 9)
    paper = Oracle(x0, x0_clip=7.0)                          # the authors' [-7, 7]
    got, _ = ddpm.predict_x0(paper, Oracle(x0).alphas_cumprod.sqrt()[500] * x0 + xt, 500, cond, True)
    torch.testing.assert_close(got.flatten(), torch.tensor([-3.0, 2.0, 7.0]))
    default = Oracle(x0)
    default.x_max.fill_(3.0)                                 # the CPU default: [0, the data's largest value]
    got, _ = ddpm.predict_x0(default, default.alphas_cumprod.sqrt()[500] * x0 + xt, 500, cond, True)
    torch.testing.assert_close(got.flatten(), torch.tensor([0.0, 2.0, 3.0]))
    five = Oracle(torch.full((1, 1, 2, 2), 5.0), x0_clip=7.0)
    five.x_max.fill_(3.0)                                    # the authors' samples end in a ReLU, not at x_max
    out = ddpm.sample(five, torch.zeros(1, 9), (2, 2), torch.Generator().manual_seed(0), 5, 0.0)
    torch.testing.assert_close(out, torch.full((1, 2, 2), math.expm1(5.0)), rtol=1e-4, atol=1e-3)
    assert paper_net().x0_clip == 7.0 and tiny().x0_clip == 0.0


def test_trailing_timesteps_as_diffusers():
    assert ddpm.ddim_timesteps(50, "trailing") == list(range(999, 0, -20))        # 999, 979, ..., 19
    assert ddpm.ddim_timesteps(5, "trailing") == [999, 799, 599, 399, 199]
    assert ddpm.ddim_timesteps(3, "trailing") == [999, 666, 332]                  # np.round(arange(1000, 0, -1000/3)) - 1
    assert ddpm.ddim_timesteps(1000, "trailing") == ddpm.ddim_timesteps(1000) == list(range(999, -1, -1))
    assert ddpm.Sampler(paper_net(), (44, 44), 50).ts[-1] == 19 and ddpm.Sampler(tiny(), (44, 44), 50).ts[-1] == 0


def fill(model):
    """Weights from each parameter's name alone, so that another program can rebuild them: N(0, 1 / fan-in),
    1-d parameters N(0, 0.01)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.1))


def test_the_paper_network_computes_what_diffusers_does():
    """Golden values from diffusers 0.27.2's UNet2DConditionModel configured as m-wojnar/zdc diffusion.py, with
    fill()'s weights copied over by a name map (to_k and to_v are kv's halves; docs/fidelity/ddpm.md): outputs on
    ZN and ZP inputs, and how much swapping the conditions changes them."""
    model = ddpm.build_model(vars(ddpm.get_args(["--train", "--paper"]))).eval()
    fill(model)
    g, t = torch.Generator().manual_seed(5), torch.tensor([3, 900])
    x, c = torch.randn(2, 1, 44, 44, generator=g), torch.randn(2, 9, generator=g)
    xp, cp = torch.randn(2, 1, 56, 30, generator=g), torch.randn(2, 9, generator=g)
    with torch.no_grad():
        out, swapped, zp = model(x, t, c), model(x, t, c.flip(0)), model(xp, t, cp)
    assert (out.sum().item(), out.abs().sum().item()) == pytest.approx((-619.01892, 620.86481), rel=1e-5)
    torch.testing.assert_close(out[0, 0, 0, :6], torch.tensor([-0.157175, -0.108445, -0.1237, -0.195531, -0.178572,
                                                               -0.091873]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1, 0, 20, 20:26], torch.tensor([-0.241248, -0.192256, -0.177786, -0.169147,
                                                                   -0.154816, -0.166197]), rtol=1e-4, atol=1e-5)
    assert (out - swapped).abs().sum().item() == pytest.approx(26.361069, rel=1e-4)
    assert (zp.sum().item(), zp.abs().sum().item()) == pytest.approx((-531.26019, 533.10889), rel=1e-5)
