"""Fixtures shared by the test files: the tiny worlds of `worlds.py`, each built once per session; and one XLA
compilation cache for the whole run, so that a program compiled by one test, one xdist worker or one of the
subprocess tests is not compiled again by another (most of the suite's time is compiling: about 90 % of each
test's time, 3768 programs in one run); and XLA's CPU backend set for compiling fast (`TEST_XLA_FLAGS`): LLVM at
optimisation level 0 (test_train.py: 339 -> 211 s of CPU) and the legacy fusion emitters instead of the MLIR ones
(`xla_cpu_use_fusion_emitters=false`: test_train.py 233 -> 157 s of CPU, alone on a quiet host). The HLO passes,
the numerics the tests check and the cost and memory analyses are unchanged. Benchmarks never run under it."""

import os
import shutil
import tempfile

import jax
import pytest
import worlds

CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def pytest_configure(config):
    """The controller (or a run without xdist) makes the cache directory and exports it, so the xdist workers and
    the subprocess tests inherit it; each process then points JAX at it (JAX read its environment on import).
    A directory the user already exported is used as it is and left in place."""
    if CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="mmedit_jax_test_xla_")
        config._mmedit_cache_to_remove = os.environ[CACHE_ENV]
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:  # read when the backend starts: no test has run yet
        os.environ["XLA_FLAGS"] = f"{flags} {TEST_XLA_FLAGS}".strip()
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core plus one (XLA compiles on one thread, so the extra worker fills the gaps: three
    on a 2-core host), at most one per 4 GiB of memory (the largest worker of a full run peaked at 3.6 GB)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 16.0
    return max(1, min(cpus + 1, int(mem_gib // 4)))


def pytest_unconfigure(config):
    path = getattr(config, "_mmedit_cache_to_remove", None)
    if path and not hasattr(config, "workerinput"):  # only the process that made it, after the workers are done
        shutil.rmtree(path, ignore_errors=True)


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


# The heaviest test files (CPU time on a 2-core host), collected first: xdist's `--dist loadscope` hands files to
# its workers in collection order, so a heavy file collected last (alphabetically: test_train, test_world) would run
# on its own at the end of the suite while the other cores wait.
HEAVY_FIRST = ("test_train.py", "test_train_sharded.py", "test_sharded_edit.py", "test_api.py", "test_harness.py",
               "test_peer_agreement.py", "test_minigpt4.py", "test_serac.py", "test_serac_minigpt4.py",
               "test_world.py", "test_answer_rows.py", "test_prefix_cache.py", "test_blip2.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: the rest keep their order
