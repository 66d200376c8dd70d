"""gan.py through its command line, and its pieces directly."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import data
import gan
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "gan.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "gan" and ck["data"]["detector"] == det and ck["step"] == 6
    assert 0.9 <= ck["scale"] <= 1.1 and {"disc", "opt_g", "opt_d"} <= ck.keys()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0 <= r["d_real"] <= 1 and 0 <= r["d_fake"] <= 1 and r["d_loss"] > 0 and r["g_loss"] > 0
                        and r["val_W"] >= 0 for r in rows)
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 50, "--out", out / "s.npz")   # no other flags
    pp = check_samples(out / "s.npz", data.SHAPES[det], 50)
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 50, "--out", out / "raw.npz", "--no-postprocess")
    raw = check_samples(out / "raw.npz", data.SHAPES[det], 50)
    np.testing.assert_allclose(pp, ck["scale"] * raw, rtol=1e-5, atol=1e-4)   # the scale multiplies raw counts
    assert data.load(det, out / "s.npz").images.shape == pp.shape          # sample files load like data
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2)
    r = check_eval(out / "eval.json")
    assert r["detector"] == det and r["reps"] == 2 and r["n_test"] == 100 and r["scale"] == ck["scale"] and r["postprocess"]
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2, "--no-postprocess")
    r = check_eval(out / "eval_nopp.json")
    assert r["scale"] == 1.0 and not r["postprocess"]
    other = "proton" if det == "neutron" else "neutron"
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--detector", other, ok=False)
    assert f"trained on the {det} detector" in e.stderr


def assert_same_optimizer(a, b):
    assert a["state"].keys() == b["state"].keys() and a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        assert_same_weights(a["state"][k], b["state"][k])


def test_same_seed_same_losses_resume_equals_uninterrupted_and_clear_errors(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--max-steps", 4)       # "killed" at step 4
    assert losses(c) == losses(a)[:2]                                                  # same seed, same losses
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")             # continues to step 6
    ka, kc = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, c))
    assert kc["step"] == 6 and len(losses(a)) == 3 and losses(c) == pytest.approx(losses(a), rel=1e-5)
    assert_same_weights(weights(a), weights(c))
    assert_same_weights(weights(a, "disc"), weights(c, "disc"))
    assert_same_optimizer(ka["opt_g"], kc["opt_g"])
    assert_same_optimizer(ka["opt_d"], kc["opt_d"])
    assert ka["scale"] == pytest.approx(kc["scale"], abs=1e-6)
    val = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]   # the best-by-validation G
    want = min(val, key=lambda r: r["val_W"])
    assert ka["best"]["step"] == kc["best"]["step"] == want["step"] and ka["best"]["val_W"] == want["val_W"]
    assert_same_weights(ka["best"]["weights"], kc["best"]["weights"])
    assert 0.9 <= ka["best"]["scale"] <= 1.1 and ka["best"]["scale"] == pytest.approx(kc["best"]["scale"], abs=1e-6)
    if want["step"] == 6:
        assert ka["best"]["scale"] == ka["scale"]
    planted = dict(ka, best=dict(data.track_best(None, 3, 0.0, gan.build_model(ka["args"])), scale=1.05))
    torch.save(planted, tmp_path / "planted.pt")                      # a different generator with its own scale
    ck = data.load_checkpoint(tmp_path / "planted.pt", "gan")
    for argv, label, scale, state in (([], "best validation, step 3 of 6", 1.05, planted["best"]["weights"]),
                                      (["--weights", "last"], "last, step 6", ka["scale"], ka["weights"]),
                                      (["--no-postprocess"], "best validation, step 3 of 6", 1.0, planted["best"]["weights"])):
        args = gan.get_args(["--eval", "--ckpt", str(tmp_path / "planted.pt"), *argv])
        sampler = gan.load_sampler(ck, args, torch.device("cpu"))
        assert sampler.weights == label and sampler.scale == scale
        assert_same_weights(sampler.gen.state_dict(), state)
    ka["model"] = "vae"
    torch.save(ka, tmp_path / "vae.pt")
    assert "a checkpoint of vae.py, not of gan.py" in cli(S, "--sample", "--ckpt", tmp_path / "vae.pt", ok=False).stderr
    assert "checkpoint not found" in cli(S, "--sample", "--ckpt", tmp_path / "none.pt", ok=False).stderr
    (tmp_path / "junk.pt").write_text("junk")
    assert "not a readable checkpoint" in cli(S, "--eval", "--ckpt", tmp_path / "junk.pt", ok=False).stderr
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", a, ok=False).stderr
    old = tmp_path / "old"               # a checkpoint written before format numbers (commit 75efdae) is refused
    old.mkdir()
    torch.save({k: v for k, v in dict(ka, model="gan").items() if k != "format"}, old / "ckpt.pt")
    for argv in (["--sample", "--ckpt", old / "ckpt.pt", "--n", 10, "--out", old / "s.npz"],
                 ["--train", "--out", old, "--resume", "--max-steps", 6]):
        e = cli(S, *argv, ok=False).stderr
        assert "trained by an older version of gan.py" in e and "check out commit 75efdae" in e
    assert not (old / "s.npz").exists()


@pytest.mark.parametrize("argv, message", [(["--set", "d_lr=0"], "d_lr must be positive"),
                                           (["--set", "g_betas=0.5,1.5"], "Adam betas in [0, 1)"),
                                           (["--set", "d_betas=0.5"], "Adam betas in [0, 1)"),
                                           (["--set", "width=0"], "width, d_width, blocks: positive"),
                                           (["--set", "dropout=1"], "dropout must be in [0, 1)"),
                                           (["--set", "arch=mlp"], "arch is one of cnn, vdvae, vit"),
                                           (["--set", "d_norm=layer"], "d_norm is batch or none"),
                                           (["--arch", "vit", "--set", "width=10"], "need multiples of 4"),
                                           (["--set", "g_sched=0.3,10"], "g_sched and d_sched take"),
                                           (["--set", "d_widht=4"], "unknown setting 'd_widht'"),
                                           (["--g-width", "6"], "unrecognized arguments: --g-width")])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gan.get_args(["--train"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_fit_scale_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    def draw(n):                                     # images with varied photon sums
        return rng.poisson(rng.uniform(5, 50, (n, 1, 1)) * np.ones((1, 8, 8))).astype(float)
    true = draw(4000)
    for s in (0.93, 1.0, 1.062):
        assert gan.fit_scale(true / s, true) == pytest.approx(s, abs=2e-4)
    assert gan.fit_scale(true / 1.3, true) == pytest.approx(1.1, abs=2e-4)       # the best scale is out of range
    assert gan.fit_scale(draw(4000) / 1.05, true) == pytest.approx(1.05, abs=0.02)   # an independent sample


@pytest.mark.parametrize("det", ["neutron", "proton"])
def test_sampler_shapes_seeds_and_scale(det):
    torch.manual_seed(0)
    g = gan.build_model({**gan.DEFAULTS, "detector": det, "width": 4, "dropout": 0.2}).eval()
    cond = torch.randn(5, 9)
    x = gan.sample(g, cond, torch.Generator().manual_seed(1))
    y = gan.sample(g, cond, torch.Generator().manual_seed(1), scale=1.05)
    z = gan.sample(g, cond, torch.Generator().manual_seed(2))
    assert x.shape == (5,) + data.SHAPES[det] and torch.isfinite(x).all() and (x >= 0).all()
    torch.testing.assert_close(y, 1.05 * x)
    assert not torch.equal(x, z)
    d = gan.build_discriminator({**gan.DEFAULTS, "detector": det, "d_width": 4, "dropout": 0.2})
    assert d(data.to_log(x.numpy()), cond).shape == (5,)


def test_batchnorm_discriminator_is_blind_to_the_brightness_of_a_batch():
    """Why the CPU default has d_norm none: D sees real and fake batches separately, and with BatchNorm (train
    mode) its output on a batch does not change when every image in it is made 3x brighter, so D cannot punish a
    generator whose images are all too faint; without BatchNorm it can."""
    torch.manual_seed(0)
    x, cond = torch.rand(64, 1, 44, 44), torch.randn(64, 9)
    for norm, blind in (("batch", True), (None, False)):
        d = gan.build_discriminator({**gan.DEFAULTS, "detector": "neutron", "d_width": 4, "d_norm": norm}).train()
        with torch.no_grad():
            same = torch.allclose(d(x, cond), d(3 * x, cond), atol=1e-3)
        assert same == blind, norm


def test_paper_is_the_thesis_setting_and_explicit_flags_win():
    a = gan.get_args(["--train", "--paper"])
    for name, net in gan.build_networks(vars(a)).items():          # within 2 % of the reference sizes
        assert sum(p.numel() for p in net.parameters()) == pytest.approx(gan.PUBLISHED[name][0], rel=0.02)
    # thesis Table 4.2: 100 epochs, batch 256; Table A.4: D lr 1.4e-5, betas .97/.96, eps 3.7e-5, one-cycle 43 %,
    # div 41, final div 1700; G lr 1e-4, betas .76/.54, eps 1.8e-2, Nesterov, 34 %, 260, 9500; no weight decay
    assert (a.epochs, a.batch_size, a.lr, a.d_lr, a.g_betas, a.d_betas, a.g_eps, a.d_eps, a.g_nesterov) == \
        (100, 256, 1e-4, 1.4e-5, [0.76, 0.54], [0.97, 0.96], 1.8e-2, 3.7e-5, True)
    assert (a.g_sched, a.d_sched, a.d_norm, a.dropout) == ([0.34, 260.0, 9500.0], [0.43, 41.0, 1700.0], "batch", 0.2)
    # m-wojnar/zdc: simultaneous D and G steps (gan.py step_fn), the scale fitted on every training event
    # (postprocessing.py), the test scored on the whole split with the 5 generations pooled (train_loop)
    assert (a.simultaneous, a.pp_samples, a.protocol, a.max_test, a.channels) == (True, 0, "pooled", 0, "even")
    e = gan.get_args(["--eval", "--paper", "--ckpt", "x.pt", "--max-test", "50"])
    assert (e.protocol, e.max_test) == ("pooled", 50)
    line = data.paper_line(gan)
    assert all(d in line for d in gan.DEVIATIONS) and len(gan.DEVIATIONS) == 3 and "docs/fidelity/gan.md" in line
    b = gan.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "width=12",
                      "--set", "d_norm=none"])
    assert (b.batch_size, b.lr, b.width, b.d_norm, b.d_lr) == (7, 0.123, 12, None, 1.4e-5)  # explicit > --paper
    c = gan.get_args(["--train"])
    assert (c.width, c.d_width, c.batch_size, c.d_norm, c.g_sched, c.g_nesterov) == (14, 8, 128, None, None, False)
    assert (c.val_every, c.pp_samples, c.simultaneous, c.protocol, c.max_test) == (250, 20000, False, "mean-of-reps", 10000)
    s = gan.get_args(["--train", "--smoke", "--set", "width=6"])          # --smoke's sizes, an explicit one wins
    assert (s.width, s.d_width, s.batch_size, s.max_steps, s.pp_samples) == (6, 4, 32, 6, 300)
    v = gan.get_args(["--train", "--smoke", "--arch", "vit"])
    assert (v.width, v.d_width, v.blocks) == (16, 16, 1)
    p = gan.get_args(["--train", "--paper", "--arch", "cnn", "--set", "g_sched=none"])
    assert (p.width, p.d_width, p.g_sched, p.d_sched) == (14, 44, None, [0.43, 41.0, 1700.0])


def test_optimizers_and_one_cycle_schedule():
    """Nesterov (NAdam) for G under --paper; the one-cycle cosine: lr/div at step 0, lr after the warm-up,
    lr/(div * final div) at the end; the CPU default keeps a constant learning rate."""
    net = torch.nn.Linear(2, 2)
    opt, sched = gan.optimizer(net, 1e-4, [0.76, 0.54], 1.8e-2, True, [0.34, 260.0, 9500.0], 1000)
    assert isinstance(opt, torch.optim.NAdam) and opt.param_groups[0]["eps"] == 1.8e-2
    lrs = []
    for _ in range(1001):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] == pytest.approx(1e-4 / 260) and lrs[340] == pytest.approx(1e-4)
    assert lrs[170] == pytest.approx(1e-4 * (1 / 260 + 1) / 2) and lrs[1000] == pytest.approx(1e-4 / 260 / 9500)
    opt, sched = gan.optimizer(net, 2e-4, [0.5, 0.9], 1e-8, False, None, 1000)
    for _ in range(10):
        opt.step(), sched.step()
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 2e-4


def test_paper_generator_optimiser_is_optax_nesterov_adam():
    """Table A.4's "Adam with Nesterov momentum" is optax.adam(nesterov=True) (optax 0.1.9 scale_by_adam, the
    authors' pinned version): mu_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t), update = lr mu_hat /
    (sqrt(v_t / (1 - b2^t)) + eps): a constant momentum b1. torch's NAdam with its default momentum_decay
    starts at mu = 0.38 for b1 = 0.76 and moves by about 0.4 lr on this tensor."""
    lr, (b1, b2), eps = 1e-2, (0.76, 0.54), 1.8e-2
    a = gan.get_args(["--train", "--paper"])
    assert (a.g_betas, a.g_eps, a.g_nesterov) == ([b1, b2], eps, True)          # Table A.4 (lr: 1e-4)
    p0 = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    grads = [torch.tensor(g, dtype=torch.float64) for g in ([0.5, -0.2, 1.0], [0.1, 0.4, -2.0], [-0.3, 0.0, 0.7])]
    want, m, v = p0.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, g in enumerate(grads, 1):                               # the optax formula, by hand
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        mu_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
        want = want - lr * mu_hat / ((v / (1 - b2 ** t)).sqrt() + eps)
    net = torch.nn.Linear(3, 1, bias=False).double()
    opt, sched = gan.optimizer(net, lr, a.g_betas, a.g_eps, a.g_nesterov, None, 10)
    with torch.no_grad():
        net.weight.copy_(p0[None])
    for g in grads:
        net.weight.grad = g[None].clone()
        opt.step(), sched.step()
    torch.testing.assert_close(net.weight[0].detach(), want, rtol=1e-8, atol=1e-10)   # mu in float32
    old = torch.optim.NAdam([p := p0.clone().requires_grad_()], lr=lr, betas=(b1, b2), eps=eps)   # momentum decay on
    for g in grads:
        p.grad = g.clone()
        old.step()
    assert (p.detach() - want).abs().max() > 1e-3


def _one_step_gradients(monkeypatch, tmp_path, argv):
    """One training step of gan.train(): the gradients each optimiser steps with, and the gradients of D's and G's
    losses computed by hand through a copy of D's weights from before its update (the same fakes, conditions)."""
    import copy
    nets, seen, steps = {}, {}, []
    build, d_loss, g_loss = gan.build_networks, gan.discriminator_loss, gan.generator_loss
    monkeypatch.setattr(gan, "build_networks", lambda cfg: nets.update(build(cfg)) or nets)

    def spy_d(disc, x, cond, fake, fake_cond):
        seen["d0"] = copy.deepcopy(disc)                           # D before its update
        out = d_loss(disc, x, cond, fake, fake_cond)
        seen["d_grad"] = torch.autograd.grad(out[0], list(disc.parameters()), retain_graph=True)
        return out

    def spy_g(disc, fake, fake_cond, logit=None):
        logit0 = seen["d0"](fake, fake_cond)
        ref = F.binary_cross_entropy_with_logits(logit0, torch.ones_like(logit0))
        seen["g_grad"] = torch.autograd.grad(ref, list(nets["generator"].parameters()), retain_graph=True)
        return g_loss(disc, fake, fake_cond) if logit is None else g_loss(disc, fake, fake_cond, logit)
    monkeypatch.setattr(gan, "discriminator_loss", spy_d)
    monkeypatch.setattr(gan, "generator_loss", spy_g)
    hook = register_optimizer_step_pre_hook(
        lambda opt, *_: steps.append([p.grad.clone() for p in opt.param_groups[0]["params"]]))
    try:
        gan.train(gan.get_args(["--train", "--smoke", "--max-steps", "1", "--out", str(tmp_path), *argv]))
    finally:
        hook.remove()
    return steps[:2], seen                                         # [D's, G's] (the schedulers do not step)


@pytest.mark.parametrize("paper", [True, False])
def test_paper_updates_d_and_g_simultaneously_from_the_old_weights(paper, monkeypatch, tmp_path):
    """--paper, as m-wojnar/zdc gan.py step_fn: D's and G's gradients both come from the same forward pass with
    the weights before this step (G's loss goes through D before D's update; D's gradient is its own loss's
    only). The CPU default (alternating) takes G's gradient through the updated D."""
    argv = ["--arch", "cnn", "--set", "dropout=0"] + (["--paper"] if paper else ["--set", "d_norm=batch"])
    (d_step, g_step), seen = _one_step_gradients(monkeypatch, tmp_path, argv)
    for got, want in zip(d_step, seen["d_grad"]):
        torch.testing.assert_close(got, want)
    same = [torch.allclose(got, want, rtol=1e-5, atol=1e-7) for got, want in zip(g_step, seen["g_grad"])]
    assert all(same) if paper else not all(same)


def test_postprocessing_fits_on_every_training_event_with_pp_samples_0(capsys):
    """--paper's pp_samples=0: the scale is fitted on the whole training split (m-wojnar/zdc postprocessing.py)."""
    class Split:                                                   # 40 training events
        def cond(self, part):
            return torch.randn(40, 9, generator=torch.Generator().manual_seed(0))

        def counts(self, part):
            return np.random.default_rng(0).poisson(2.0, (40, 44, 44)).astype(np.float32)
    torch.manual_seed(0)
    g = gan.build_model({**gan.DEFAULTS, "detector": "neutron", "width": 4})
    for n, used in ((0, 40), (25, 25)):
        assert 0.9 <= gan.postprocess_fit(g, Split(), n, "cpu", 0) <= 1.1
        assert f"train W on {used} events" in capsys.readouterr().out
