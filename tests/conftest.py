import importlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def toy_cache(tmp_path_factory):
    """Every test writes its toy data into a fresh cache, never into the user's."""
    path = tmp_path_factory.mktemp("zdc_cache")
    os.environ["ZDC_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """smoke_run(SCRIPT, *FLAGS): a fresh copy of the run folder of `python SCRIPT --train --smoke FLAGS`, trained
    once per test session. Smoke trainings are most of the suite's time and many tests start from the same one
    (the model tests, the recorded traces of test_skeleton, bench, the joint model's comparison). Each caller
    gets its own copy (at `to`, if given), so what one test writes (an eval.json, a resumed run) no other test
    sees. `--detector D` with the script's default D is the same run as no flag, and is trained once."""
    from helpers import cli
    runs = {}

    def get(script, *flags, to=None):
        flags = tuple(map(str, flags))
        default = getattr(importlib.import_module(Path(script).stem).get_args(["--train"]), "detector", None)
        for i, f in enumerate(flags[:-1]):
            if f == "--detector" and flags[i + 1] == default:
                flags = flags[:i] + flags[i + 2:]
                break
        key = (script, *flags)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("smoke") / "run"
            cli(script, "--train", "--smoke", *flags, "--out", runs[key])
        copy = Path(to) if to else tmp_path_factory.mktemp(Path(script).stem) / "run"
        shutil.copytree(runs[key], copy)
        return copy
    return get
