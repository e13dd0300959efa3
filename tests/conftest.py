import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests import hf_fixtures as a plain module
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def pytest_collection_modifyitems(config, items):
    # run the fast files first so a broken build fails quickly
    items.sort(key=lambda it: ("slow" in it.keywords, str(it.fspath)))
