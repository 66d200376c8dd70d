"""corrvae.py through its command line, and its pieces (mask pooling, predictor inversion, steering) directly."""
import json

import numpy as np
import pytest
import torch

import corrvae
import data
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "corrvae.py"


def is_rho(r):
    """A Spearman correlation; NaN where a tiny smoke model gives constant responses."""
    return np.isnan(r) or -1 <= r <= 1


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


def test_smoke_train_sample_props_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "corrvae" and ck["data"]["detector"] == det and ck["step"] == 6
    assert len(ck["prop_mean"]) == len(ck["prop_std"]) == 4 and min(ck["prop_std"]) > 0
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["step"] == 6 and row["val_W"] >= 0 and row["val_kl"] >= 0 and is_rho(row["ctrl_rho"])
    assert len(row["mask_dims"]) == 4 and min(row["mask_dims"]) >= 1   # no property left without a w dimension
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 40, "--out", out / "s.npz")   # no other flags
    free = check_samples(out / "s.npz", data.SHAPES[det], 40)
    assert data.load(det, out / "s.npz").images.shape == free.shape     # sample files load like data
    s = cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 40, "--props", "cog_x=10, sum=500", "--out", out / "t.npz")
    assert "requested: cog_x=10, sum=500" in s.stdout
    steered = check_samples(out / "t.npz", data.SHAPES[det], 40)
    with np.load(out / "s.npz") as a, np.load(out / "t.npz") as b:
        assert np.array_equal(a["particles"], b["particles"])         # the same particles, steered responses
    assert not np.array_equal(free, steered)
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2, "--plot")
    assert "control accuracy" in e.stdout and (out / "eval.traversal.png").stat().st_size > 0
    r = check_eval(out / "eval.json")
    assert r["detector"] == det and r["reps"] == 2 and r["n_test"] == 100 and r["train_steps"] == 6
    assert r["n_control"] == 100 and set(r["control"]) == set(corrvae.PROPS) and "auc" in r["model"]
    for c in r["control"].values():
        assert is_rho(c["rho"]) and is_rho(c["rho_free"]) and c["mae"] >= 0 and c["mae_free"] >= 0
    assert all(sum(m) >= 1 for m in r["mask"].values())


def test_bad_input_gives_clear_errors(run, tmp_path):
    det, out = run
    if det == "proton":                                                 # the checks do not depend on the detector
        assert "must lie in [0, 29]" in cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--props", "cog_y=30",
                                            "--out", tmp_path / "x.npz", ok=False).stderr
        return
    ck = out / "ckpt.pt"
    e = cli(S, "--sample", "--ckpt", ck, "--props", "speed=3", "--out", tmp_path / "x.npz", ok=False)
    assert "--props 'speed=3': expected NAME=VALUE with NAME one of cog_x, cog_y, sum, n_lit" in e.stderr
    for bad, msg in [("cog_x=left", "'left' is not a number"), ("sum=-5", "must be finite and >= 0"),
                     ("cog_x", "NAME=VALUE"), (",", "empty"), ("cog_x=nan", "must be finite")]:
        with pytest.raises(ValueError, match=msg):
            corrvae.parse_props(bad)
    assert corrvae.parse_props(" cog_x=10, sum=5e2 ,") == {"cog_x": 10.0, "sum": 500.0}
    assert "must lie in [0, 43]" in cli(S, "--sample", "--ckpt", ck, "--props", "cog_x=44", "--out", tmp_path / "x.npz",
                                        ok=False).stderr
    assert "--props goes with --sample" in cli(S, "--eval", "--ckpt", ck, "--props", "sum=5", ok=False).stderr
    assert "--props goes with --sample" in cli(S, "--sample", "--export", tmp_path / "s.onnx", "--ckpt", ck,
                                               "--props", "sum=5", ok=False).stderr   # the export is unsteered
    assert "w_dim must be positive" in cli(S, "--train", "--set", "w_dim=0", ok=False).stderr
    assert "prop must be >= 0" in cli(S, "--train", "--set", "prop=-1", ok=False).stderr
    assert "schedule is cosine or step" in cli(S, "--train", "--set", "schedule=linear", ok=False).stderr
    assert "unknown setting 'cog_x'" in cli(S, "--sample", "--ckpt", ck, "--set", "cog_x=10", ok=False).stderr
    old = torch.load(ck, weights_only=True)
    del old["format"]                                                   # a checkpoint from before format numbers
    torch.save(old, tmp_path / "old.pt")
    assert "trained by an older version of corrvae.py" in cli(S, "--sample", "--ckpt", tmp_path / "old.pt",
                                                               "--out", tmp_path / "x.npz", ok=False).stderr
    assert "a checkpoint of corrvae.py, not of vae.py" in cli("vae.py", "--sample", "--ckpt", ck, ok=False).stderr
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


def predictor(mask_rows):
    """A Predictor whose mask mode is the given 0/1 rows (logits +-5)."""
    p = corrvae.Predictor(len(mask_rows), len(mask_rows[0]))
    with torch.no_grad():
        p.logits.copy_(torch.tensor(mask_rows, dtype=torch.float32) * 10 - 5)
    return p


def test_mask_pooling_shapes_and_a_hard_mask_selects_its_dimensions():
    torch.manual_seed(0)
    rows = [[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]]
    p = predictor(rows)
    m = p.mask()
    expected = torch.tensor(rows, dtype=torch.float32)
    expected[3, 0] = 1                                 # an empty row keeps its most likely dimension (all tie: first)
    assert torch.equal(m, expected)
    w = torch.randn(5, 6)
    u, y = p.pool(w, m), p(w, m)
    assert u.shape == y.shape == (5, 4)
    for j in range(4):                                  # property j reads exactly its masked dimensions
        for k in range(6):
            w2 = w.clone()
            w2[:, k] += 3.0
            moved = not torch.allclose(p.pool(w2, m)[:, j], u[:, j])
            assert moved == bool(m[j, k]), (j, k)
    p(w, p.mask(torch.Generator().manual_seed(0), tau=0.5)).sum().backward()
    assert p.logits.grad is not None and p.logits.grad.abs().sum() > 0   # straight-through gradient reaches L
    with torch.no_grad():                              # confident logits: every Gumbel sample is the mode
        p.logits.mul_(10)
    assert torch.equal(p.mask(torch.Generator().manual_seed(0), tau=0.5).detach(), (p.logits > 0).float())


def test_the_predictor_inverts_a_hand_made_linear_case():
    p = predictor([[1, 1, 0], [0, 0, 1]])
    p.g = lambda u: 0.4 * u + 1.0                      # f(u) = 1.4 u + 1, Lipschitz 0.4 < 1
    y = torch.tensor([[2.4, -1.8], [1.0, 8.0]])
    torch.testing.assert_close(p.invert(y), (y - 1.0) / 1.4)
    with torch.no_grad():
        p.a.copy_(torch.tensor([[2.0, -1.0, 5.0], [7.0, 7.0, 0.5]]))
        p.b.copy_(torch.tensor([0.5, -0.5]))

    class Model:
        predictor = p
    w0 = torch.tensor([[0.3, -0.2, 1.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[2.4, float("nan")], [-3.0, float("nan")]])   # set property 0, leave 1 free
    w = corrvae.steer(Model, w0, target)
    # u_0 = (y - 1) / 1.4 = 2 a_0 . (w0 + d) + ... : the minimum-norm change d runs along (2, -1, 0)
    u = (target[:, 0] - 1.0) / 1.4
    d = ((u - (w0 @ torch.tensor([2.0, -1.0, 0.0]) + 0.5)) / 5.0)[:, None] * torch.tensor([2.0, -1.0, 0.0])
    torch.testing.assert_close(w, w0 + d)
    torch.testing.assert_close(p(w, p.mask())[:, 0], target[:, 0])
    assert torch.equal(w[:, 2], w0[:, 2])             # the unmasked dimension does not move


def test_steering_round_trip_with_the_real_predictor():
    torch.manual_seed(1)
    model = corrvae.build_model(dict(detector="neutron", width=4, hidden=16, z_dim=3, w_dim=8)).eval()
    cond = torch.randn(6, 9)
    target = torch.randn(6, 4)
    w0 = model.prior_w(cond)[0]
    with torch.no_grad():
        w = corrvae.steer(model, w0, target)
        torch.testing.assert_close(model.predictor(w, model.predictor.mask()), target, atol=1e-4, rtol=1e-4)
        counts = corrvae.sample(model, cond, torch.Generator().manual_seed(0), target)
    assert counts.shape == (6, 44, 44) and torch.isfinite(counts).all() and (counts >= 0).all()
    with pytest.raises(ValueError, match="fully set or fully NaN"):
        corrvae.steer(model, w0, torch.where(torch.arange(6)[:, None] == 0, float("nan"), target))


def test_properties_kl_and_scaling_known_answers():
    img = np.zeros((2, 44, 44))
    img[0, 3, 5] = 10
    img[1, 10, 20], img[1, 12, 20] = 1, 3
    y = corrvae.properties(img)
    np.testing.assert_allclose(y, [[3, 5, 10, 1], [11.5, 20, 4, 2]])
    mean, std = [1.0, 2.0, 0.5, 0.2], [2.0, 3.0, 1.5, 0.7]
    np.testing.assert_allclose(corrvae.unscale(corrvae.scale(y, mean, std), mean, std), y)
    np.testing.assert_allclose(corrvae.scale(y, mean, std)[0, 2], (np.log1p(10) - 0.5) / 1.5)
    mu, lv = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.0]])
    torch.testing.assert_close(corrvae.gaussian_kl(mu, lv, mu, lv), torch.zeros(1, 2))
    torch.testing.assert_close(corrvae.gaussian_kl(mu, lv), 0.5 * (mu ** 2 + lv.exp() - 1 - lv))


def test_decoded_image_properties_equal_the_counted_ones_and_have_gradients():
    img = np.zeros((3, 44, 44))
    img[0, 3, 5] = 10
    img[1, 10, 20], img[1, 12, 20] = 1, 3                       # third image empty: centre, sum 0, no lit pixel
    mean, std = np.array([1.0, 2.0, 0.5, 0.2]), np.array([2.0, 3.0, 1.5, 0.7])
    dec = torch.log1p(torch.tensor(img, dtype=torch.float32)).unsqueeze(1).requires_grad_()
    got = corrvae.image_properties(dec, torch.tensor(mean), torch.tensor(std))
    want = corrvae.scale(corrvae.properties(img), mean, std)
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-3)   # soft lit-pixel count: within 0.1 pixel
    got[:2].sum().backward()
    assert dec.grad[:2].abs().sum() > 0 and torch.isfinite(dec.grad).all()


def test_total_correlations_known_answers():
    g = torch.Generator().manual_seed(0)
    n, lv = 256, torch.full((256, 1), -2.4)            # posteriors of std 0.3 around N(0, 1) spread means
    a, b, c = (torch.randn(n, 1, generator=g) for _ in range(3))
    same = torch.zeros(n, 3)                           # identical posteriors: the aggregate is a product, TC = 0
    for tc in corrvae.total_correlations(torch.randn(n, 2, generator=g), (same[:, :2], same[:, :2]), a.repeat(1, 3), (same, same)):
        assert abs(tc.item()) < 1e-5
    bb, bc = torch.cat([b, b], 1), torch.cat([b, c], 1)
    tc_copy, _ = corrvae.total_correlations(a, (a, lv), bb, (bb, lv.repeat(1, 2)))
    tc_indep, zw_indep = corrvae.total_correlations(a, (a, lv), bc, (bc, lv.repeat(1, 2)))
    _, zw_copy = corrvae.total_correlations(b, (b, lv), bc, (bc, lv.repeat(1, 2)))
    assert tc_copy > 1.0 and tc_indep < 0.3           # w = (b, b): one variable twice
    assert zw_copy > 1.0 and zw_indep < 0.6           # z = b repeats a w dimension; z = a does not


def test_paper_preset_and_explicit_flags():
    paper, cpu = corrvae.get_args(["--train", "--paper"]), corrvae.get_args(["--train"])
    assert (paper.epochs, paper.batch_size, paper.lr, paper.schedule) == (250, 64, 1e-4, "step")
    assert (cpu.epochs, cpu.batch_size, cpu.schedule) == (2, 128, "cosine")
    a = corrvae.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "width=5"])
    assert (a.batch_size, a.lr, a.width, a.hidden) == (7, 0.123, 5, 128)
    assert (cpu.beta, cpu.tc, cpu.prop, cpu.consist, cpu.consist_prior, cpu.mask, cpu.tau) == (4, 1, 100, 10, 10, 1, 0.2)
    s = corrvae.get_args(["--sample", "--ckpt", "x.pt", "--set", "beta=2", "--props", "sum=5"])   # two flags, no clash
    assert s.beta == 2.0 and s.props == {"sum": 5.0}
    nets = corrvae.build_networks(vars(paper))
    assert set(nets) == {"encoder", "decoder", "prior", "predictor"} and corrvae.PUBLISHED == {}


def test_consist_prior_trains_the_decoder_on_prior_draws_against_the_predictors_promise():
    """--consist-prior: the decoded-property error on images drawn from the prior enters the loss with its weight;
    only the decoder learns from it (the prior's w and the predictor's promise are targets, detached); validation
    (generator None) leaves it out."""
    torch.manual_seed(0)
    cfg = dict(detector="neutron", width=4, hidden=16, z_dim=4, w_dim=6, beta=1.0, tc=0.0, prop=1.0, mask=1.0,
               consist=0.0, consist_prior=0.0)
    model = corrvae.build_model(cfg)
    with torch.no_grad():
        model.decoder.up[-1].bias.fill_(0.5)          # a live output ReLU, as after a few training steps
    x = torch.log1p(torch.rand(8, 1, 44, 44) * 5)
    cond, y = torch.randn(8, 9), torch.randn(8, 4)
    stats = (torch.zeros(4), torch.ones(4))
    base, _ = corrvae.corrvae_loss(model, x, cond, y, torch.Generator().manual_seed(1), cfg, stats=stats)
    loss, terms = corrvae.corrvae_loss(model, x, cond, y, torch.Generator().manual_seed(1),
                                       dict(cfg, consist_prior=10.0), stats=stats)
    assert terms["consist_prior"] > 0
    torch.testing.assert_close(loss, base + 10.0 * terms["consist_prior"])
    model.zero_grad()
    terms["consist_prior"].backward()
    grads = {name: sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None)
             for name, part in model.named_children()}
    assert grads["decoder"] > 0 and grads["prior"] == 0 and grads["predictor"] == 0 and grads["encoder"] == 0
    _, val = corrvae.corrvae_loss(model, x, cond, y, None, dict(cfg, consist_prior=10.0), stats=stats)
    assert val["consist_prior"] == 0


def authors_kl_weight(steps):
    """The KL weight of the authors' code (utils/loss.py with train.ipynb's loop) at 0-based steps 0..steps-1, in
    our units: idx_kl counts batches from 1; while idx_kl <= 100000 there is no KL term; after, their w_kl
    (from 100) grows by 1 below 1e5 before each use. Their reconstruction is 1e6 x the squared error summed / 64,
    ours the sum: one of their units is 64 / 1e6 of ours."""
    out, idx_kl, w_kl = [], 0, 100
    for _ in range(steps):
        idx_kl += 1
        if idx_kl <= 100000:
            out.append(0.0)
            continue
        if w_kl < 100000:
            w_kl += 1
        out.append(w_kl * 64 / 1e6)
    return out


def test_paper_kl_weight_and_mask_term_follow_the_authors_schedule():
    paper, cpu = vars(corrvae.get_args(["--train", "--paper"])), vars(corrvae.get_args(["--train"]))
    assert (paper["beta"], paper["kl_schedule"], paper["mask"]) == (6.4, "ramp", 1.0)
    want = authors_kl_weight(210_001)
    for step in (0, 50_000, 99_999, 100_000, 100_001, 150_000, 199_898, 199_899, 199_900, 210_000):
        beta, mask = corrvae.loss_weights(paper, step)
        assert beta == pytest.approx(want[step], rel=1e-12, abs=0), step
        assert mask == (1.0 if step < 100_000 else 0.0), step          # the mask L1 only while the KL is off
    assert corrvae.loss_weights(paper, 100_000)[0] == pytest.approx(6.4 * 101 / 1e5)   # first KL step: w_kl 101
    assert corrvae.loss_weights(paper, 150_000)[0] == pytest.approx(6.4 * 50_101 / 1e5)  # mid-ramp
    assert corrvae.loss_weights(paper)[0] == 6.4                          # after training (validation)
    for step in (0, 100_000, 10**6, None):                               # the CPU default: constant
        assert corrvae.loss_weights(cpu, step) == (4.0, 1.0)


def test_paper_objective_is_the_authors_terms_only():
    """--paper: two controlled properties (the centre of gravity), no decoded-property terms, TC at the authors'
    1 / 15,625 of the reconstruction, the scheduled KL and mask weights, no gradient clipping."""
    paper = vars(corrvae.get_args(["--train", "--paper"]))
    assert paper["controlled"] == ["cog_x", "cog_y"] and paper["consist"] == paper["consist_prior"] == 0
    assert paper["tc"] == pytest.approx(64 / 1e6) and paper["clip"] == 0
    torch.manual_seed(0)
    cfg = dict(paper, detector="neutron", width=4, hidden=16)
    model = corrvae.build_model(cfg)
    assert model.predictor.logits.shape == (2, 8) and model.cols == [0, 1]
    x, cond, y = torch.log1p(torch.rand(8, 1, 44, 44) * 5), torch.randn(8, 9), torch.randn(8, 2)
    for step, beta, mask in ((0, 0.0, 1.0), (150_000, 6.4 * 50_101 / 1e5, 0.0)):
        loss, t = corrvae.corrvae_loss(model, x, cond, y, torch.Generator().manual_seed(1), cfg, 0.2, None, step)
        assert t["consist"] == 0 and t["consist_prior"] == 0 and t["kl"] > 0
        want = t["rec"] + beta * t["kl"] + cfg["tc"] * t["tc"] + cfg["prop"] * t["prop"] + mask * t["sparsity"]
        torch.testing.assert_close(loss, want)


def test_paper_trains_without_clipping_and_controls_its_two_properties(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: calls.append(max_norm))
    corrvae.train(corrvae.get_args(["--train", "--smoke", "--out", str(tmp_path / "cpu"), "--max-steps", "2"]))
    assert calls == [100.0, 100.0]                                        # the CPU default clips at norm 100
    calls.clear()
    out = tmp_path / "paper"
    corrvae.train(corrvae.get_args(["--train", "--smoke", "--paper", "--out", str(out), "--max-steps", "2"]))
    assert calls == []                                                    # the authors' code does not clip
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 60, "--reps", 2, "--n-control", 50)
    r = check_eval(out / "eval.json")
    assert set(r["control"]) == {"cog_x", "cog_y"} and r["properties"] == ["cog_x", "cog_y"]
    e = cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--props", "sum=500", "--out", tmp_path / "x.npz", ok=False)
    assert "this checkpoint controls cog_x, cog_y only" in e.stderr
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 10, "--props", "cog_y=12", "--out", tmp_path / "y.npz")
    check_samples(tmp_path / "y.npz", (44, 44), 10)


def test_paper_evaluates_as_the_authors_notebook_and_names_its_deviations():
    """evaluation_metrics.ipynb: W per channel averaged over 3 generations of the whole test set, channels 1-4 on
    (i + j)-even pixels (utils/helpers.py sum_channels_parallel)."""
    a = corrvae.get_args(["--eval", "--paper", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test, a.channels, a.reps) == ("mean-of-reps", 0, "even", 3)
    assert corrvae.get_args(["--eval", "--paper", "--ckpt", "x.pt", "--reps", "5"]).reps == 5
    assert corrvae.DEVIATIONS and all(0 < len(d) <= 100 for d in corrvae.DEVIATIONS)
    line = data.paper_line(corrvae)
    assert "docs/fidelity/corrvae.md" in line and all(d in line for d in corrvae.DEVIATIONS)
