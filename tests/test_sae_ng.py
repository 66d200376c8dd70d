"""sae_ng.py through its command line, its Sinkhorn divergence against known answers, and its pieces."""
import json

import pytest
import torch

import data
import sae_ng
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "sae_ng.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"sae_{request.param}")
    cli(S, "--train", "--smoke", "--detector", request.param, "--out", out)
    return request.param, out


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)               # loadable without pickle
    assert ck["model"] == "sae_ng" and ck["data"]["detector"] == det and ck["step"] == 5 + 3   # stage 1 + stage 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_match"] >= -1e-4 and r["rec_W"] >= 0 and r["val_W"] >= 0 for r in rows)
    assert [r["stage"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [5, 8]
    assert rows[0]["rec_W"] == rows[1]["rec_W"]                  # stage 2 leaves the autoencoder alone
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
    assert "checkpoint not found" in cli(S, "--sample", "--ckpt", tmp_path / "none.pt", ok=False).stderr
    (tmp_path / "junk.pt").write_text("junk")
    assert "not a readable checkpoint" in cli(S, "--eval", "--ckpt", tmp_path / "junk.pt", ok=False).stderr
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", out, ok=False).stderr


def test_same_seed_same_losses_resume_in_both_stages_and_l2_variant(tmp_path):
    a, b, d, e = (tmp_path / k for k in "abde")
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", b, "--val-every", 2)
    assert losses(a) == losses(b) and len(losses(a)) == 5                 # steps 2, 4, 5 of stage 1; 7, 8 of stage 2
    for kill in (3, 6):                                                    # "killed" in stage 1, then in stage 2
        out = tmp_path / f"kill{kill}"
        cli(S, "--train", "--smoke", "--out", out, "--val-every", 2, "--max-steps", kill)
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == kill
        if kill == 6:                                                      # stage 2 trains the noise generator only
            moved = {k for k, v in weights(out).items() if not torch.equal(v, weights(a)[k])}
            assert moved and all(k.startswith("ng.") for k in moved)
        cli(S, "--train", "--smoke", "--out", out, "--val-every", 2, "--resume")     # continues to step 8
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 8
        assert_same_weights(weights(a), weights(out))
    assert losses(tmp_path / "kill3")[-1] == pytest.approx(losses(a)[-1], rel=1e-5)
    cli(S, "--train", "--smoke", "--out", d, "--val-every", 2, "--matching", "l2")
    assert torch.load(d / "ckpt.pt", weights_only=True)["args"]["matching"] == "l2"
    assert losses(d) != losses(a) and all(l > 0 for l in losses(d))
    cli(S, "--train", "--smoke", "--out", e, "--max-steps", 5)
    ck = torch.load(e / "ckpt.pt", weights_only=True)                      # a checkpoint from before stage 2
    for k in ("opt_ng", "sched_ng"):                                       # existed resumes into it
        del ck[k]
    del ck["rng"]["pick"]
    for k in ("ng_steps", "ng_batch", "ng_lr"):
        del ck["args"][k]
    torch.save(ck, e / "ckpt.pt")
    cli(S, "--train", "--smoke", "--out", e, "--resume")
    assert torch.load(e / "ckpt.pt", weights_only=True)["step"] == 8


@pytest.mark.parametrize("flags, message", [(["--eps-end", "0"], "--eps-start and --eps-end positive"),
                                            (["--matching", "l1"], "invalid choice"),
                                            (["--sinkhorn-iters", "0"], "--sinkhorn-iters must be positive"),
                                            (["--ng-steps", "-1"], "--ng-steps must be >= 0"),
                                            (["--ng-batch", "0"], "--ng-batch must be positive")])
def test_bad_flags_give_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        sae_ng.get_args(["--train", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_sinkhorn_divergence_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    shift = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5], requires_grad=True)
    y = x[torch.randperm(64, generator=g)] + shift            # same cloud, reordered and shifted
    for eps in (0.01, 0.5, 10.0):                              # cost |x - y|^2 (no 1/2): S = |d|^2 = 0.39
        assert abs(sae_ng.sinkhorn_divergence(x, x, eps).item()) < 1e-5
        assert sae_ng.sinkhorn_divergence(x, y, eps, iters=200).item() == pytest.approx(0.39, rel=5e-3)
    s = sae_ng.sinkhorn_divergence(x, y, 0.05, iters=200)
    s.backward()                                               # d|d|^2 / dd = 2d through the dual objective
    torch.testing.assert_close(shift.grad, 2 * shift.detach(), rtol=1e-2, atol=1e-3)
    far = sae_ng.sinkhorn_divergence(x, torch.randn(64, 5, generator=g) * 3, 0.5)
    assert far.item() > 1.0                                    # a different cloud is far


def test_eps_schedule_is_geometric():
    a = sae_ng.get_args(["--train", "--eps-start", "8", "--eps-end", "0.5"])
    assert [sae_ng.annealed_eps(a, s, 5) for s in (0, 2, 4, 9)] == pytest.approx([8, 2, 0.5, 0.5])


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_shapes_seeds_and_non_negativity(shape):
    torch.manual_seed(0)
    model = sae_ng.SAE(shape, width=4, hidden=16, ng_hidden=16).eval()
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
