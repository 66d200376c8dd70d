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
    assert md[-1].startswith("| lookup") and "| 1.50 | 1.50 | 0.52 ± 0.01 |" in md[-1]
