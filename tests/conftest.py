"""Shared test fixtures: the repository root (and tests/) on sys.path, and the dev corpus beside the checkout."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = Path(__file__).resolve().parents[2] / "shared" / "corpus"
for p in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def pytest_configure(config):
    # Slow tests run by default (the suite fits CI's budget); `-m "not slow"` skips them for a quick pass.
    config.addinivalue_line("markers", "slow: starts 3+ processes or runs the whole script on several ranks (~10-30 s each on 2 cores)")


def _corpus_file(name: str) -> Path:
    path = CORPUS_DIR / name
    if not path.is_file():
        pytest.skip(f"dev corpus file {path} is absent (expected ../shared/corpus beside the checkout)")
    return path


@pytest.fixture
def corpus_path() -> Path:
    return _corpus_file("docs.jsonl.xz")


@pytest.fixture
def sp8192_model_path() -> Path:
    return _corpus_file("fineweb_8192_bpe.model")


@pytest.fixture
def sp1024_model_path() -> Path:
    return _corpus_file("fineweb_1024_bpe.model")
