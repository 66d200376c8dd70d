"""Issue 34: every model script reads as a teaching file with one shared skeleton.

- the skeleton lines (section markers and the calls into data.py's run plumbing) are the same, in the same order,
  in every script, so `diff flow_matching.py ddpm.py` shows the method;
- the teaching targets (docstring, --help, where the loss starts, lines before the appendices, file length,
  long lines) hold: tools/teach_table.py;
- the move was a pure refactor: every script's `--train --smoke` gives the recorded losses and weights
  (tools/smoke_trace.py; record anew with `python tools/smoke_trace.py --out tests/data/smoke_trace.json`
  when a change is meant to alter the training numbers, and say so in the commit)."""
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import smoke_trace  # noqa: E402
import teach_table  # noqa: E402

SCRIPTS = smoke_trace.SCRIPTS
# (pattern, required): a skeleton line starts with the pattern; the list is the order a reader meets them
SKELETON = [
    ('"""', True),
    ("# Configuration. Precedence: an explicit flag or --set > --smoke > --paper > CPU default", True),
    ("NAME = ", True), ("DEFAULTS = dict(", True), ("PAPER = dict(", True), ("SMOKE = dict(", True),
    ("PUBLISHED = ", True), ("DEVIATIONS = (", True),
    ("# The default network", True),
    ("def build_networks(cfg):", True),
    ("# The method", True),
    ("class Sampler(data.Sampler):", True),
    ("# Training", True),
    ("def train(args):", True),
    ("    run = data.Run(args, NAME", True),
    ("    return run.finish()", True),
    ("# Appendix A. ", False),
    ("# Appendix B. The command line", True),
    ("def get_args(argv=None):", True),
    ("    p = data.parser(__doc__, NAME", True),
    ("    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)", True),
    ("def load_sampler(ck, args, device):", True),
    ("def evaluate(args, ck, sampler, device):", True),
    ('if __name__ == "__main__":', True),
    ("    data.main(sys.modules[__name__])", True),
]


def skeleton(name):
    """The skeleton lines of a script, in file order: the first line matching each pattern."""
    lines = (ROOT / f"{name}.py").read_text().splitlines()
    found, at = [], -1
    for pattern, required in SKELETON:
        hit = next((i for i in range(at + 1, len(lines)) if lines[i].startswith(pattern)), None)
        if hit is None:
            assert not required, f"{name}.py: no line starting {pattern!r} after line {at + 1}"
            continue
        found.append(pattern)
        at = hit
    return found


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_the_skeleton_in_order(name):
    assert [p for p in skeleton(name) if not p.startswith("# Appendix A")] == \
        [p for p, req in SKELETON if req]


def test_a_skeleton_check_catches_a_script_out_of_order(tmp_path, monkeypatch):
    text = (ROOT / "flow_matching.py").read_text()
    moved = text.replace("def train(args):", "def _train(args):").replace("# Appendix B. The command line",
                                                                      "# Appendix B. The command line\ndef train(args):")
    (tmp_path / "moved.py").write_text(moved)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="run = data.Run"):
        skeleton("moved")


@pytest.mark.parametrize("name", SCRIPTS)
def test_deviations_are_a_line_a_user_can_read(name):
    """What --paper still does differently (issue 35): a tuple of short, distinct strings, printed at the start
    of every --paper run together with the script's fidelity page."""
    mod = __import__(name)
    dev = mod.DEVIATIONS
    assert isinstance(dev, tuple) and all(isinstance(d, str) and 0 < len(d) <= 110 for d in dev), dev
    assert len(set(dev)) == len(dev) and (ROOT / "docs" / "fidelity" / f"{name}.md").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_teaching_targets(name):
    m = teach_table.measure(name)
    assert not teach_table.misses(m), f"{name}.py: {teach_table.misses(m)}"


def test_a_long_docstring_misses_its_target():
    m = dict(teach_table.measure("flow_matching"), docstring=31)
    assert teach_table.misses(m) == ["docstring 31 lines > 30"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_runs_train_exactly_as_recorded(name, smoke_run):
    """Pure refactor: the same seed gives the recorded losses and weights (default settings of each script;
    the run is the model tests' own smoke run, `python tools/smoke_trace.py --check` trains it afresh)."""
    want = json.loads((ROOT / "tests" / "data" / "smoke_trace.json").read_text())
    bad = smoke_trace.compare(smoke_trace.fingerprint(smoke_run(f"{name}.py")), want[name])
    assert not bad, bad[:5]


def test_the_trace_comparison_sees_a_changed_loss_and_weight():
    want = json.loads((ROOT / "tests" / "data" / "smoke_trace.json").read_text())["flow_matching"]
    got = json.loads(json.dumps(want))
    got["log"][0]["train_loss"] *= 1.05                  # 5 %: ten times what another CPU's rounding gives
    first = next(iter(got["weights"]["weights"]))
    got["weights"]["weights"][first][1] *= 1.05
    bad = smoke_trace.compare(got, want)
    assert any("train_loss" in b for b in bad) and any(first in b for b in bad)
    assert smoke_trace.compare(want, want) == []
    rounding = json.loads(json.dumps(want))               # another CPU's rounding (3.6e-3, gan) passes
    rounding["weights"]["weights"][first][0] += 4e-3 * want["weights"]["weights"][first][1]
    rounding["log"][0]["train_loss"] *= 1.004
    assert smoke_trace.compare(rounding, want) == []
