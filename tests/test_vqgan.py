"""vqgan.py through its command line, and its pieces directly."""
import json
import shutil

import pytest
import torch

import data
import vqgan as vq
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "vqgan.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, smoke_run):
    return request.param, smoke_run(S, "--detector", request.param)


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model"] == "vqgan" and ck["steps"] == {"1": 4, "2": 4}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s1 = [r for r in rows if r["stage"] == 1]
    assert s1 and all(1 <= r["perplexity"] <= 64 and 0 < r["usage"] <= 1 and r["rec_W"] >= 0 for r in s1)
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 40, "--out", out / "s.npz")   # no other flags
    check_samples(out / "s.npz", data.SHAPES[det], 40)
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2)
    assert "reconstruction Wasserstein" in e.stdout and "codebook perplexity" in e.stdout
    r = check_eval(out / "eval.json")
    assert r["reconstruction_W"] >= 0 and r["perplexity"] >= 1 and r["temperature"] == 1.2 and r["top_k"] == 128
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 30, "--reps", 1, "--sweep")
    sw = json.loads((out / "sweep.json").read_text())
    assert [(r["temperature"], r["top_k"]) for r in sw["rows"]] == [(t, k) for t in (1.0, 1.2, 1.4) for k in (0, 128, 64)]
    assert all(r["ms_per_sample"] > 0 for r in sw["rows"])


def test_stages_resume_determinism_and_errors(tmp_path):
    a, b, c, d = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", b, "--val-every", 2, "--stage", "1")        # stage 1 only ...
    assert "stage 2 is not trained yet" in cli(S, "--sample", "--ckpt", b / "ckpt.pt", ok=False).stderr
    shutil.copytree(b, d)
    cli(S, "--train", "--smoke", "--out", b, "--val-every", 2, "--stage", "2")        # ... then stage 2 on top
    assert losses(a) == losses(b) and len(losses(a)) == 4                             # same seed, same losses
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--max-steps", 3, "--stage", "1")  # interrupted
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")                         # finishes both
    cli(S, "--train", "--smoke", "--out", d, "--val-every", 2, "--max-steps", 3, "--stage", "2")   # in stage 2
    cli(S, "--train", "--smoke", "--out", d, "--val-every", 2, "--resume")
    for run in (c, d):
        for key in ("vqae", "disc", "gpt"):      # the codebook buffers and the adversarial part included
            assert_same_weights(weights(a, key), weights(run, key))
    assert torch.load(d / "ckpt.pt", weights_only=True)["steps"] == {"1": 4, "2": 4}
    assert "stage 1 is not finished" in cli(S, "--train", "--smoke", "--out", tmp_path / "e", "--stage", "2",
                                            ok=False).stderr
    (tmp_path / "junk.pt").write_text("junk")           # (wrong detector / model: data.load_checkpoint, tested elsewhere)
    assert "not a readable checkpoint" in cli(S, "--sample", "--ckpt", tmp_path / "junk.pt", ok=False).stderr
    assert "--temperature must be positive" in cli(S, "--sample", "--temperature", 0, ok=False).stderr
    assert "must be a multiple of heads" in cli(S, "--train", "--set", "embed=30", ok=False).stderr
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", a, ok=False).stderr
    ck = torch.load(a / "ckpt.pt", weights_only=True)                   # written before format numbers
    del ck["format"]
    torch.save(ck, tmp_path / "old.pt")
    err = cli(S, "--sample", "--ckpt", tmp_path / "old.pt", ok=False).stderr
    assert "trained by an older version of vqgan.py" in err and err.count("\n") == 1            # one clear line


def test_ema_update_hand_computed():
    cs, es = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z, idx = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), torch.tensor([0, 1, 0])
    new_cs, new_es, book = vq.ema_codebook(cs, es, z, idx, decay=0.5, eps=0.1)
    # counts 0.5 * 1 + 0.5 * (2, 1, 0); sums 0.5 * es + 0.5 * (z0 + z2, z1, 0)
    torch.testing.assert_close(new_cs, torch.tensor([1.5, 1.0, 0.5]))
    torch.testing.assert_close(new_es, torch.tensor([[1.3, 0.4], [0.0, 1.0], [0.5, 0.5]]))
    # Laplace smoothing: n = 3, (cs + 0.1) / (3 + 3 * 0.1) * 3 = (1.6, 1.1, 0.6) / 1.1
    smoothed = torch.tensor([1.6, 1.1, 0.6]) / 1.1
    torch.testing.assert_close(book, new_es / smoothed[:, None])
    torch.testing.assert_close(book[1], torch.tensor([0.0, 1.0]))


def test_quantizer_update_and_dead_code_restart():
    q = vq.Quantizer(codes=4, dim=2)
    q.cluster_size.copy_(torch.tensor([1.0, 1.0, 0.02, 1.0]))
    z = torch.nn.functional.normalize(torch.tensor([[3.0, 1.0], [1.0, 3.0]]), dim=1)[:, :, None, None]   # (2, 2, 1, 1)
    idx = torch.tensor([0, 1]).view(2, 1, 1)
    q.update(z, idx, decay=0.9, dead_below=0.03, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.0, 1.0, 1.0, 0.9]))    # code 2 restarted at count 1
    flat = z[:, :, 0, 0]
    assert any(torch.equal(q.codebook[2], v) for v in flat) and torch.equal(q.embed_sum[2], q.codebook[2])


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_shapes_and_kv_cache_equals_no_cache(shape):
    torch.manual_seed(0)
    det = "neutron" if shape == (44, 44) else "proton"
    vqae, disc, gpt = vq.build_model(dict(detector=det, ae_width=2, d_width=4, code_dim=8, codes=32, embed=16, heads=2,
                                          layers=2, prefix=3, mlp=32, dropout=0.1))
    gpt.eval()
    x = torch.rand(3, 1, *shape)
    tok = vqae.tokens(x)
    assert tok.shape == (3,) + vq.grid(shape) and tok.shape[1] * tok.shape[2] == (121 if det == "neutron" else 112)
    assert vqae.decode(vqae.vq.embed(tok), shape).shape == x.shape and disc(x).dim() == 4
    cond = torch.randn(6, 9)
    uniforms = lambda seed: torch.rand(6, gpt.n_tokens, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    with torch.no_grad():
        for k in (0, 5):
            a = vq.tokens_from(gpt, cond, uniforms(1), 1.2, k, kv_cache=True)
            b = vq.tokens_from(gpt, cond, uniforms(1), 1.2, k, kv_cache=False)
            assert a.shape == (6, gpt.n_tokens) and torch.equal(a, b)
        c = vq.tokens_from(gpt, cond, uniforms(2), 1.2, 5)
    assert not torch.equal(a, c) and len(set(a.flatten().tolist())) > 1
    out = vq.sample(vqae, gpt, cond, shape, torch.Generator().manual_seed(0))
    assert out.shape == (6,) + shape and torch.isfinite(out).all() and (out >= 0).all()


def test_top_k_and_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(1000, 1)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert set(vq.pick(logits, u, 1.0, 2).tolist()) == {0, 1}                     # only the two most likely
    assert set(vq.pick(logits, u, 1.0, 0).tolist()) == {0, 1, 2, 3}
    assert torch.equal(vq.pick(logits, u, 1e-4, 0), torch.zeros(1000, dtype=torch.long))   # T -> 0: argmax
    assert vq.pick(logits[:2], torch.tensor([0.0, 0.999999]), 1.0, 0).tolist() == [0, 3]        # CDF ends


def test_paper_is_the_published_setting_and_explicit_flags_win():
    a = vq.get_args(["--train", "--paper"])
    nets = vq.build_networks(vars(a))
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    assert count["tokenizer"] == vq.PUBLISHED["tokenizer"][0] == 59_924       # the reference tokenizer, exactly
    gpt = nets["gpt"]                                                          # faster_zdc gpt.py: 128, 4 heads, 6 layers, MLP 256
    assert (gpt.tok.embedding_dim, len(gpt.blocks), gpt.blocks[0].heads, gpt.prefix) == (128, 6, 4, 2)
    assert gpt.blocks[0].mlp[0].out_features == 256 and gpt.blocks[0].mlp[2].p == 0.1
    assert not any("bias" in k for k in gpt.state_dict() if not k.startswith("cond."))   # bias-free; tied output
    assert (a.epochs, a.epochs2, a.batch_size, a.lr, a.d_lr, a.lr2, a.clip, a.adv, a.dead_below) == \
        (50, 50, 256, 2.2e-4, 1.3e-6, 5.2e-3, 0.0, 1.0, 0.0)
    assert (a.betas, a.d_betas, a.betas2, a.eps2, a.wd2) == ([0.67, 0.9], [0.6, 0.55], [0.87, 0.998], 1e-5, 0.14)
    b = vq.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "embed=32", "--set",
                     "clip=2"])
    assert (b.batch_size, b.lr, b.embed, b.clip, b.layers) == (7, 0.123, 32, 2.0, 6)     # explicit > --paper
    c = vq.get_args(["--train", "--set", "embed=32"])
    assert (c.embed, c.layers, c.lr, c.clip, c.epochs) == (32, 4, 2e-3, 1.0, 1)            # explicit > default


def test_paper_prints_its_deviations_and_evaluates_as_the_authors(capsys, monkeypatch):
    """Issue 35 items 7-8: a --paper run starts with the list of what it still does differently (LPIPS and the
    pretrained VGG16 discriminator first); --eval --paper scores as faster_zdc's train_loop does: the whole
    test split, the 5 generations pooled into one W."""
    line = data.paper_line(vq)
    assert all(d in line for d in vq.DEVIATIONS) and "docs/fidelity/vqgan.md" in line
    assert "LPIPS" in vq.DEVIATIONS[0] and "VGG16" in vq.DEVIATIONS[1] and all(len(d) <= 100 for d in vq.DEVIATIONS)
    monkeypatch.setattr(vq, "train", lambda args: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit):
        data.main(vq, ["--train", "--paper", "--smoke"])
    assert capsys.readouterr().out.startswith("--paper differs from the publication in: no LPIPS")
    a = vq.get_args(["--eval", "--paper", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test, a.channels) == ("pooled", 0, "even")
    a = vq.get_args(["--eval", "--paper", "--ckpt", "x.pt", "--protocol", "mean-of-reps", "--max-test", "50"])
    assert (a.protocol, a.max_test) == ("mean-of-reps", 50)                       # an explicit flag wins
    a = vq.get_args(["--eval", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test, a.channels) == ("mean-of-reps", 10000, "even")


def test_one_cycle_schedule_known_values():
    """The reference schedule: 1/25 of the peak at step 0, the peak after the warm-up, 1/25000 at the end."""
    assert vq.one_cycle(0, 1000, 0.2) == pytest.approx(1 / 25)
    assert vq.one_cycle(100, 1000, 0.2) == pytest.approx((1 / 25 + 1) / 2)          # half-way up the cosine
    assert vq.one_cycle(200, 1000, 0.2) == pytest.approx(1.0)
    assert vq.one_cycle(600, 1000, 0.2) == pytest.approx((1 + 1 / 25_000) / 2)      # half-way down
    assert vq.one_cycle(1000, 1000, 0.2) == vq.one_cycle(5000, 1000, 0.2) == pytest.approx(1 / 25_000)


def test_grad_norm_rescales_only_the_gradient():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    c = torch.randn(3, 1, 4, 4)
    y = vq.GradNorm.apply(x, 0.1)
    assert torch.equal(y, x)
    (c * y).sum().backward()                                   # d/dx = c, rescaled to norm 0.1
    torch.testing.assert_close(x.grad, 0.1 * c / c.norm())


def test_each_network_is_clipped_on_its_own():
    """The tokenizer and D are separate optimisation problems: with one clip over both (the old code) a huge D
    gradient shrank the tokenizer's update ~1e6-fold; clipped separately it leaves it alone, and vice versa."""
    torch.manual_seed(0)
    nets = vq.build_networks(vars(vq.get_args(["--train", "--smoke"])))
    ae, d = nets["tokenizer"], nets["discriminator"]
    for huge, small in ((d, ae), (ae, d)):
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("huge", huge), ("small", small))}
        for p in small.parameters():
            p.grad = torch.full_like(p, 1e-3)                  # total norm well below the clip
        for p in huge.parameters():
            p.grad = torch.full_like(p, 1e3)
        g_small = [p.grad.clone() for p in small.parameters()]
        opts = [(m, torch.optim.SGD(m.parameters(), lr=1.0)) for m in (ae, d)]   # update = -(clipped) gradient
        vq.clip_and_step(opts, 1.0)
        for p, p0, g in zip(small.parameters(), before["small"], g_small):
            torch.testing.assert_close(p0 - p.detach(), g)      # not shrunk
        step = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(huge.parameters(), before["huge"])])
        assert step.norm() == pytest.approx(1.0, rel=1e-4)     # clipped to norm 1
        with torch.no_grad():
            for p, p0 in zip(small.parameters(), before["small"]):
                p.copy_(p0)
    for p in ae.parameters():                                  # the old joint clip, for contrast
        p.grad = torch.full_like(p, 1e-3)
    for p in d.parameters():
        p.grad = torch.full_like(p, 1e3)
    total = torch.nn.utils.clip_grad_norm_(list(ae.parameters()) + list(d.parameters()), 1.0)
    assert total > 1e4 and all(torch.allclose(p.grad, torch.full_like(p, 1e-3 / total)) for p in ae.parameters())


def test_discriminator_starts_neutral():
    """D's last layer starts at zero: D(x) = 0 and the adversarial gradient reaching the tokenizer is zero."""
    nets = vq.build_networks(vars(vq.get_args(["--train", "--smoke"])))
    assert torch.equal(nets["discriminator"](torch.rand(2, 1, 44, 44)), torch.zeros(2, 1, 11, 11))
