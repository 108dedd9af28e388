"""Server tests: tests/engine on the path (the FakeRunner), and the demo tokenizer."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "engine"))

from tokenizers import Tokenizer


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.from_file(str(ROOT / "checkpoints" / "demo" / "tokenizer.json"))
