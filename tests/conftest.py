import os
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
