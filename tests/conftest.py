"""Fixtures shared by the test files: the tiny worlds of `worlds.py`, each built once per session."""

import pytest
import worlds


@pytest.fixture(scope="session")
def make_demo_world(tmp_path_factory):
    """`make_demo_world(n, seed)` -> `worlds.DemoWorld`, built once per `(n, seed)` in this session."""
    built = {}

    def make(n: int = 6, seed: int = 1) -> worlds.DemoWorld:
        if (n, seed) not in built:
            built[n, seed] = worlds.demo_world(str(tmp_path_factory.mktemp(f"demo{n}_{seed}")), n, seed)
        return built[n, seed]

    return make


@pytest.fixture(scope="session")
def demo_world(make_demo_world) -> worlds.DemoWorld:
    """The tiny random BLIP-2 (4 OPT layers), its tokenizer and 6 synthetic E-VQA cases prepared (seed 1)."""
    return make_demo_world(6, 1)


@pytest.fixture(scope="session")
def train_world(tmp_path_factory):
    """`(model, fns, cases, meta)`: `worlds.train_world`, the trainer tests' 2-layer BLIP-2 and
    `worlds.TRAIN_CASES` host cases with cached image embeddings."""
    return worlds.train_world(str(tmp_path_factory.mktemp("train")))
