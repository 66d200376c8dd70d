"""Results are data: RESULTS.md is what `python metrics.py --results results/` generates from the committed
eval.json files, so a typed number cannot creep in."""
import json
import subprocess
import sys

import metrics
from conftest import ROOT


def test_results_md_is_generated_from_the_committed_json():
    out = subprocess.run([sys.executable, "metrics.py", "--results", "results/"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "RESULTS.md").read_text(), \
        "RESULTS.md is stale: run `python metrics.py --results results/ > RESULTS.md`"


def test_variants_readme_is_generated_from_the_committed_json():
    out = subprocess.run([sys.executable, "metrics.py", "--results", "results/variants"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "results" / "variants" / "README.md").read_text(), \
        "results/variants/README.md is stale: run `python metrics.py --results results/variants > results/variants/README.md`"


def test_table43_md_is_generated_from_the_committed_json():
    assert metrics.table43(ROOT / "results") == (ROOT / "docs" / "table43.md").read_text().replace(
        "--results results ", f"--results {(ROOT / 'results').as_posix()} "), \
        "docs/table43.md is stale: run `python metrics.py --results results --table43 > docs/table43.md`"


def row(w, auc=None):
    r = {"W": [w, 0.1], "MAE": [10.0, 0.0], "empty": [0.0, 0.0]}
    return {**r, "auc": [auc, 0.01]} if auc is not None else r


def test_results_tables_from_hand_made_files(tmp_path):
    base = dict(floor=row(2.0, 0.5), lookup=row(3.0, 0.52), detector="neutron", split="random", n_test=2000)
    (tmp_path / "b_neutron_random.json").write_text(json.dumps(dict(base, name="model b", model=row(8.0, 0.9),
                                                                    command="python b.py --eval", n_params=1234)))
    (tmp_path / "a_neutron_random.json").write_text(json.dumps(dict(base, name="model a", model=row(4.0, 0.7),
                                                                    command="python a.py --eval")))
    (tmp_path / "a_proton_random.json").write_text(json.dumps(dict(base, detector="proton", model=row(1.0),
                                                                   command="python a.py --eval")))
    (tmp_path / "bench.json").write_text(json.dumps({"rows": []}))                   # not an eval.json: skipped
    md = metrics.results_markdown(str(tmp_path))
    assert md.index("## neutron, random split, 2,000 test events") < md.index("## proton, random split")
    lines = md.splitlines()
    a, b = (next(i for i, s in enumerate(lines) if s.startswith(f"| model {k} |")) for k in "ab")
    assert a < b                                                                    # sorted by W
    assert "| 2.00 |" in lines[a] and "0.700 ± 0.010" in lines[a] and "1,234" in lines[b]
    assert "| a_proton_random |" in md and "`python b.py --eval`" in md


def test_summary_table_from_hand_made_files(tmp_path):
    base = dict(floor=row(2.0, 0.5), lookup=row(3.0, 0.52), detector="neutron", n_test=2000, command="x")
    for split, w in (("random", 4.0), ("disjoint", 10.0)):
        (tmp_path / f"flow_matching_neutron_{split}.json").write_text(json.dumps(dict(base, split=split, model=row(w, 0.7))))
    (tmp_path / "bench_cpu.json").write_text(json.dumps({"rows": [
        dict(model="flow_matching", mode="eager", ms_per_sample=9.0, batch=256),
        dict(model="flow_matching", mode="inference", ms_per_sample=8.0, batch=256)]}))
    md = metrics.results_summary(str(tmp_path)).splitlines()
    fm = next(s for s in md if s.startswith("| `flow_matching.py`"))
    assert "| 2.00 | 5.00 | 0.70 ± 0.01 | 8.000 (batch 256) |" in fm
    lk = [s for s in md if s.startswith("| lookup")]
    assert len(lk) == 1 and "| 1.50 | 1.50 | 0.52 ± 0.01 |" in lk[0]
    assert md[0].startswith("protocol 1 (before issue 36)")                     # no protocol block: labelled old
    assert "only metric here that checks conditioning" in md[-1]


def test_summary_shows_no_table_for_a_protocol_with_only_variant_rows(tmp_path):
    # every script row is protocol 2; a protocol-1 variant file (no script of that name) left beside them must not
    # produce a second table of nothing but its lookup row, nor the sentence about protocol-1 cells
    base = dict(floor=row(2.0, 0.5), lookup=row(3.0, 0.52), detector="neutron", split="random", n_test=2000,
                protocol=metrics.protocol_block("mean-of-reps", 2000, 5, 200))
    (tmp_path / "vae_neutron_random.json").write_text(json.dumps(dict(base, model=row(8.0, 0.9))))
    old = {k: v for k, v in base.items() if k != "protocol"}
    (tmp_path / "vae_vit_neutron_random.json").write_text(json.dumps(dict(old, model=row(6.0, 0.9))))
    md = metrics.results_summary(str(tmp_path))
    assert md.startswith("protocol 2") and "protocol 1" not in md and "Protocol-1 cells" not in md
    assert md.count("| lookup") == 1 and md.count("| `vae.py`") == 1
    (tmp_path / "gan_neutron_random.json").write_text(json.dumps(dict(old, model=row(9.0, 0.9))))   # a script row
    md = metrics.results_summary(str(tmp_path))
    assert "\n\nprotocol 1 (before issue 36)" in md and "| `gan.py`" in md and "Protocol-1 cells" in md


def test_summary_skips_files_that_are_not_eval_json(tmp_path):
    (tmp_path / "vqgan_neutron_random_stage1_check.json").write_text(json.dumps({"rows": [1]}))
    assert metrics.results_summary(str(tmp_path)).count("\n") == 2               # the header only


def test_readme_summary_is_generated_from_the_committed_json():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- summary: generated by")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- end of summary -->")]
    out = subprocess.run([sys.executable, "metrics.py", "--results", "results/", "--summary"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert block == out.stdout, \
        "README's summary table is stale: paste `python metrics.py --results results/ --summary` between its markers"


def test_separate_models_of_a_joint_eval_get_their_own_rows(tmp_path):
    """sdigan_joint --compare-ckpt writes the separate models' scores under "separate": each becomes a row of the
    same table (same test events), with the fraction of the particles it saw in training."""
    sep = dict(row(5.0, 0.8), seen_in_training=[0.631, 0.0])
    (tmp_path / "j_neutron_random.json").write_text(json.dumps(dict(
        floor=row(2.0, 0.5), lookup=row(3.0, 0.52), detector="neutron", split="random", n_test=2000, name="joint",
        model=row(8.0, 0.9), separate={"gan (separate)": sep}, command="python j.py --eval")))
    lines = metrics.results_markdown(str(tmp_path)).splitlines()
    r = next(s for s in lines if s.startswith("| gan (separate), 63 % of these particles seen in training |"))
    assert "| 2.50 |" in r and "0.800 ± 0.010" in r


def test_latent_fm_sweep_tables_in_the_run_notes_are_generated_from_the_committed_json(monkeypatch):
    monkeypatch.chdir(ROOT)                            # the tables name the files relative to the repository
    table = metrics.sweep_markdown([f"results/variants/latent_fm_sweep_neutron_{s}.json" for s in ("random", "disjoint")])
    assert table in (ROOT / "docs" / "models" / "latent_fm.md").read_text(), (
        "docs/models/latent_fm.md's sweep tables are stale: rerun `python metrics.py --sweep-table ...` (see there)")
