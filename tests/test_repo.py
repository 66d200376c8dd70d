"""The README's commands are the ones CI runs."""
from conftest import ROOT


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in ("pip install -r requirements.txt", "python -m pytest -q tests"):
        assert cmd in ci and f"\n{cmd}\n" in readme
