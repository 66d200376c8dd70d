"""sae_ng.py through its command line, its Sinkhorn divergence and schedules against known answers, and its pieces."""
import json
import math

import pytest
import torch

import data
import sae_ng
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "sae_ng.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "sae_ng" and ck["data"]["detector"] == det and ck["step"] == 5   # end to end only
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 5)]
    assert all(r["val_match"] >= -1e-4 and r["rec_W"] >= 0 and r["val_W"] >= 0 and r["code_std"] >= 0 for r in rows)
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 50, "--out", out / "s.npz")   # no other flags
    resp = check_samples(out / "s.npz", data.SHAPES[det], 50)
    assert data.load(det, out / "s.npz").images.shape == resp.shape    # sample files load like data
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2)
    assert "reconstruction Wasserstein" in e.stdout
    r = check_eval(out / "eval.json")
    assert r["detector"] == det and r["reps"] == 2 and r["n_test"] == 100 and r["reconstruction_W"] >= 0
    assert r["matching"] == "sinkhorn"


def test_wrong_checkpoints_give_clear_errors(run, tmp_path):
    det, out = run
    other = "proton" if det == "neutron" else "neutron"
    assert f"trained on the {det} detector" in cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--detector", other, ok=False).stderr
    if det == "proton":                                        # the rest does not depend on the detector
        return
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["model"] = "vae"
    torch.save(ck, tmp_path / "other.pt")
    assert "a checkpoint of vae.py, not of sae_ng.py" in cli(S, "--sample", "--ckpt", tmp_path / "other.pt", ok=False).stderr
    ck["model"] = "sae_ng"                                     # a checkpoint from before format numbers
    del ck["format"]
    (tmp_path / "old").mkdir()
    torch.save(ck, tmp_path / "old" / "ckpt.pt")
    older = "trained by an older version of sae_ng.py (checkpoint format 0"
    assert older in cli(S, "--eval", "--ckpt", tmp_path / "old" / "ckpt.pt", ok=False).stderr
    assert older in cli(S, "--train", "--smoke", "--out", tmp_path / "old", "--resume", ok=False).stderr
    assert "checkpoint not found" in cli(S, "--sample", "--ckpt", tmp_path / "none.pt", ok=False).stderr
    (tmp_path / "junk.pt").write_text("junk")
    assert "not a readable checkpoint" in cli(S, "--eval", "--ckpt", tmp_path / "junk.pt", ok=False).stderr
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", out, ok=False).stderr


def test_same_seed_same_losses_resume_in_both_stages_stage_2_added_later_and_l2_variant(tmp_path):
    a, b, d, e = (tmp_path / k for k in "abde")
    two = ("--val-every", 2, "--set", "ng_steps=3")
    cli(S, "--train", "--smoke", "--out", a, *two)
    cli(S, "--train", "--smoke", "--out", b, *two)
    assert losses(a) == losses(b) and len(losses(a)) == 5                 # steps 2, 4, 5 of stage 1; 6, 8 of stage 2
    for kill in (3, 6):                                                    # "killed" in stage 1, then in stage 2
        out = tmp_path / f"kill{kill}"
        cli(S, "--train", "--smoke", "--out", out, *two, "--max-steps", kill)
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == kill
        cli(S, "--train", "--smoke", "--out", out, *two, "--resume")      # continues to step 8
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 8
        assert_same_weights(weights(a), weights(out))
    assert losses(tmp_path / "kill3")[-1] == pytest.approx(losses(a)[-1], rel=1e-5)
    cli(S, "--train", "--smoke", "--out", e, "--val-every", 2)             # the default: no stage 2, 5 steps
    stage1 = weights(e)
    cli(S, "--train", "--smoke", "--out", e, "--resume", "--set", "ng_steps=3")   # stage 2 added to the finished run
    assert torch.load(e / "ckpt.pt", weights_only=True)["step"] == 8
    moved = {k for k, v in weights(e).items() if not torch.equal(v, stage1[k])}
    assert moved and all(k.startswith("ng.") for k in moved)               # stage 2 trains the noise generator only
    assert_same_weights(weights(a), weights(e))                            # = stage 2 planned from the start
    cli(S, "--train", "--smoke", "--out", d, "--val-every", 2, "--matching", "l2")
    assert torch.load(d / "ckpt.pt", weights_only=True)["args"]["matching"] == "l2"
    assert losses(d) != losses(e)[:len(losses(d))] and all(l > 0 for l in losses(d))


@pytest.mark.parametrize("flags, message", [(["--set", "blur=0.1"], "need 0 < blur < diameter"),
                                            (["--set", "scaling=1"], "need 0 < scaling < 1"),
                                            (["--matching", "l1"], "invalid choice"),
                                            (["--set", "matching=l1"], "matching: sinkhorn or l2"),
                                            (["--set", "arch=resnet"], "arch: one of cnn, vdvae, vit"),
                                            (["--set", "onecycle=0.5,0.5,10"], "both DIVs >= 1"),
                                            (["--set", "onecycle=0.5,10"], "onecycle takes WARMUP,DIV,FINAL_DIV"),
                                            (["--set", "betas=1,0.9"], "betas takes b1,b2 in [0, 1)"),
                                            (["--set", "ng_steps=-1"], "ng_steps must be >= 0"),
                                            (["--set", "ng_batch=-1"], "ng_batch must be positive"),
                                            (["--set", "ng_stepz=1"], "unknown setting 'ng_stepz'"),
                                            (["--arch", "vit", "--set", "width=10"], "need a multiple of 4")])
def test_bad_flags_give_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        sae_ng.get_args(["--train", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_precedence_flag_over_paper_over_default_and_paper_size():
    a = sae_ng.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "scaling=0.5"])
    assert (a.batch_size, a.lr, a.scaling) == (7, 0.123, 0.5)                            # explicit flags win
    assert (a.epochs, a.betas, a.weight_decay, a.onecycle) == (100, [0.64, 0.73], 0.068, [0.32, 35, 770])  # Table A.1
    d = sae_ng.get_args(["--train"])
    assert (d.batch_size, d.lr, d.scaling, d.clip) == (256, 1e-3, 0.5, 10.0)             # CPU default
    p = sae_ng.get_args(["--train", "--paper"])
    assert (p.scaling, p.blur, p.diameter, p.beta, p.clip, p.ng_steps) == (0.95, 1e-5, 1e-2, 20.0, 0.0, 0)
    n = {k: sum(q.numel() for q in m.parameters()) for k, m in sae_ng.build_networks(vars(p)).items()}
    assert 0.95e6 < n["encoder"] + n["decoder"] < 1.1e6            # "approximately one million" (Section 4.4)
    assert n == {k: v for k, (v, _) in sae_ng.PUBLISHED.items()}  # the authors' ViT AE + NG, layer for layer
    c = sae_ng.get_args(["--train", "--paper", "--arch", "cnn"])                        # Table A.1, CNN column
    assert (c.lr, c.betas, c.adam_eps, c.weight_decay, c.nesterov) == (1.4e-3, [0.76, 0.88], 6.1e-8, 0.0, True)
    assert all(sae_ng.one_cycle(s, 100, *c.onecycle) == 1.0 for s in (0, 50, 100))        # constant rate
    assert not p.nesterov and not d.nesterov and sae_ng.get_args(["--train", "--set", "nesterov=true"]).nesterov
    w = sae_ng.get_args(["--train", "--paper", "--arch", "cnn", "--set", "width=12", "--set", "betas=0.5,0.6"])
    assert (w.width, w.hidden, w.betas, w.lr) == (12, 64, [0.5, 0.6], 1.4e-3)    # explicit beats Table A.1's column
    s = sae_ng.get_args(["--train", "--smoke", "--paper"])                      # --smoke sizes beat --paper's
    assert (s.arch, s.width, s.hidden, s.blocks, s.ng_batch, s.lr) == ("vit", 16, 8, 1, 64, 3.5e-3)
    assert sae_ng.get_args(["--train", "--matching", "l2"]).ng_batch == 512


def test_eps_schedule_and_one_cycle_known_values():
    e = sae_ng.eps_schedule(1e-2, 1e-5, 0.95)                 # the authors' code: 1e-4 (twice), x 0.9025, ..., 1e-10
    assert len(e) == 137 and e[0] == e[1] == pytest.approx(1e-4) and e[2] == pytest.approx(1e-4 * 0.9025)
    assert e[-1] == pytest.approx(1e-10) and e[-2] > 1e-10 and all(u > v for u, v in zip(e[1:], e[2:]))
    assert len(sae_ng.eps_schedule(1e-2, 1e-5, 0.5)) == 12
    f = [sae_ng.one_cycle(s, 100, 0.32, 35, 770) for s in (0, 16, 32, 66, 100, 200)]
    assert f == pytest.approx([1 / 35, (1 + 1 / 35) / 2, 1, (1 + 1 / 26950) / 2, 1 / 26950, 1 / 26950])


@pytest.mark.parametrize("scaling", [0.95, 0.5])
def test_sinkhorn_divergence_known_answers(scaling):
    eps = sae_ng.eps_schedule(1e-2, 1e-5, scaling)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    shift = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5], requires_grad=True)
    y = x[torch.randperm(64, generator=g)] + shift            # same cloud, reordered and shifted
    assert abs(sae_ng.sinkhorn_divergence(x, x, eps).item()) < 1e-6
    s = sae_ng.sinkhorn_divergence(x, y, eps)                 # cost |x - y|^2 / 2: S = |d|^2 / 2 = 0.195
    assert s.item() == pytest.approx(0.195, rel=1e-4)
    s.backward()                                              # d(|d|^2 / 2) / dd = d
    torch.testing.assert_close(shift.grad, shift.detach(), rtol=1e-3, atol=1e-4)
    big = sae_ng.sinkhorn_divergence(30 * x, 30 * y.detach(), eps)    # raw codes of size ~30: costs ~1e3 at eps 1e-10
    assert big.item() == pytest.approx(900 * 0.195, rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):         # runs in float32 under autocast
        assert sae_ng.sinkhorn_divergence(x, y.detach(), eps).item() == pytest.approx(0.195, rel=1e-4)
    far = sae_ng.sinkhorn_divergence(x, torch.randn(64, 5, generator=g) * 3, eps)
    assert far.item() > 1.0                                   # a different cloud is far


def test_matching_trains_the_encoder_and_is_half_the_l2_term_when_conditions_pair_the_points():
    torch.manual_seed(0)
    args = sae_ng.get_args(["--train", "--paper"])
    model = sae_ng.SAE((44, 44), width=4, hidden=16, ng_hidden=8)
    x, cond = torch.rand(32, 1, 44, 44), 3 * torch.randn(32, 9)    # distinct particles, ~13 apart
    loss, rec, match, (code, fake) = sae_ng.sae_loss(model, x, cond, torch.Generator().manual_seed(1), args)
    assert loss.item() == pytest.approx(rec.item() + 20 * match.item(), rel=1e-5)
    half_l2 = (code - fake).pow(2).sum(1).mean() / 2                # the optimal plan pairs i with i
    assert match.item() == pytest.approx(half_l2.item(), rel=1e-4)
    g_code, g_fake = torch.autograd.grad(match, (code, fake), retain_graph=True)
    torch.testing.assert_close(g_code, (code - fake).detach() / 32)   # gradient into the encoder's code
    torch.testing.assert_close(g_fake, (fake - code).detach() / 32)
    grads = torch.autograd.grad(match, list(model.enc.parameters()), allow_unused=True)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)   # end to end: the encoder learns from it
    assert all(gr is None for gr in torch.autograd.grad(match, list(model.dec.parameters()), allow_unused=True))


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_shapes_seeds_and_non_negativity(shape):
    torch.manual_seed(0)
    model = sae_ng.SAE(shape, width=4, hidden=16, ng_hidden=8).eval()
    x, cond = torch.rand(5, 1, *shape), torch.randn(5, 9)
    code = model.encode(x)
    assert code.shape == (5, sae_ng.CODE) and (code >= 0).all()
    assert model.decode(code).shape == x.shape and (model.decode(code) >= 0).all()
    fake = model.generate_code(torch.randn(5, sae_ng.NOISE), cond)
    assert fake.shape == (5, sae_ng.CODE) and (fake >= 0).all()
    s = sae_ng.sample(model, cond, torch.Generator().manual_seed(1))
    assert s.shape == (5,) + shape and torch.isfinite(s).all() and (s >= 0).all()
    assert torch.equal(s, sae_ng.sample(model, cond, torch.Generator().manual_seed(1)))
    assert sae_ng.reconstruct(model, x).shape == (5,) + shape


def test_a_decoder_output_dead_everywhere_still_gets_reconstruction_gradient():
    """The CNN decoder's output ReLU passes the gradient straight through (either matching; the default's plain one
    died in its 2026-12-06 rerun): with its last bias at -100 every pixel is exactly 0, and the reconstruction
    error still moves that bias up; the authors' plain ReLU (straight_through=false, --paper) gives it zero
    gradient, and both give the same outputs."""
    torch.manual_seed(0)
    code, target = torch.rand(3, sae_ng.CODE), torch.rand(3, 1, 44, 44)
    grads = {}
    for matching, st in (("l2", True), ("sinkhorn", True), ("sinkhorn", False)):
        model = sae_ng.build_model({**sae_ng.DEFAULTS, "detector": "neutron", "width": 4, "hidden": 16,
                                    "ng_hidden": 8, "matching": matching, "straight_through": st})
        torch.manual_seed(1)
        model.dec.load_state_dict(sae_ng.Decoder((44, 44), width=4, hidden=16).state_dict())
        with torch.no_grad():
            model.dec.net[-1].bias.fill_(-100.0)
        out = model.dec(code)
        assert torch.equal(out, torch.zeros_like(out))
        (out - target).pow(2).sum().backward()
        grads[matching, st] = model.dec.net[-1].bias.grad.item()
    assert grads["l2", True] < 0 and grads["sinkhorn", True] < 0    # descent raises the bias only through ST
    assert grads["sinkhorn", False] == 0


def test_the_vit_code_and_output_pass_gradient_when_dead():
    """--arch vit (either matching): the ViT's code ReLU and output ReLU are straight-through. A plain ReLU pair died
    within 25 steps of the default run (every code and pixel 0, no gradient left: docs/models/sae_ng.md).
    With both biases at -100 the code and the image are exactly 0, and the reconstruction error still reaches the
    encoder's last layer and the decoder's last bias."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 44, 44)
    model = sae_ng.build_model(dict(detector="neutron", width=16, hidden=8, ng_hidden=8, matching="sinkhorn",
                                    arch="vit", blocks=1))
    with torch.no_grad():
        model.enc[2].bias.fill_(-100.0)
        model.dec[2].unpatch.bias.fill_(-100.0)
    code = model.encode(x)
    out = model.decode(code)
    assert torch.equal(code, torch.zeros_like(code)) and torch.equal(out, torch.zeros_like(out))
    (out - x).pow(2).sum().backward()
    assert model.dec[2].unpatch.bias.grad.item() < 0 and model.enc[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("argv", [["--paper"], ["--paper", "--matching", "l2"], ["--paper", "--arch", "cnn"]])
def test_paper_builds_the_authors_plain_relus(argv):
    """--paper builds the authors' network (m-wojnar/zdc noise_generator_mse.py, architectures/vit.py): plain
    ReLUs on the code, the decoder's output and the noise generator's output, no straight-through gradient. With
    every input of the three below 0, all three outputs are exactly 0 and no gradient reaches the layers before
    them; the CPU default's ViT (either matching) passes it straight through, as its noise generator does."""
    torch.manual_seed(0)
    x, c, z = torch.rand(3, 1, 44, 44), torch.randn(3, 9), torch.randn(3, sae_ng.NOISE)
    for paper in (True, False):
        a = sae_ng.get_args(["--train", "--smoke", *(argv if paper else ["--arch", "vit"] + argv[1:])])
        assert a.straight_through is not paper
        model = sae_ng.build_model(vars(a))
        last_enc = [m for m in model.enc.modules() if isinstance(m, torch.nn.Linear)][-1]
        last_dec = [m for m in model.dec.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
        with torch.no_grad():
            for layer in (last_enc, last_dec, model.ng.out[-1]):
                layer.bias.fill_(-100.0)
        code, fake = model.encode(x), model.generate_code(z, c)
        out = model.decode(torch.rand(3, sae_ng.CODE))
        assert all(torch.equal(t, torch.zeros_like(t)) for t in (code, out, fake))
        grads = torch.autograd.grad([code.sum(), out.sum(), fake.sum()],
                                    [last_enc.weight, last_dec.weight, model.ng.out[-1].weight])
        st = [g.abs().sum().item() > 0 for g in grads]
        if paper:
            assert st == [False, False, False]
        elif a.arch == "vit":
            assert st == [True, True, True]


def test_paper_evaluates_as_the_thesis_and_names_its_deviations():
    """--eval --paper: the authors' train_loop scores the whole test split with the 5 generations pooled; an explicit
    flag wins; the CPU default keeps the project's protocol. The --paper line names every deviation."""
    a = sae_ng.get_args(["--eval", "--paper", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test, a.channels) == ("pooled", 0, "even")
    a = sae_ng.get_args(["--eval", "--paper", "--ckpt", "x.pt", "--protocol", "mean-of-reps"])
    assert (a.protocol, a.max_test) == ("mean-of-reps", 0)
    a = sae_ng.get_args(["--eval", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test, a.straight_through) == ("mean-of-reps", 10000, True)
    line = data.paper_line(sae_ng)
    assert sae_ng.DEVIATIONS and all(d in line for d in sae_ng.DEVIATIONS) and "docs/fidelity/sae_ng.md" in line
