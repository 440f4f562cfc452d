"""Test set-up shared by the whole suite.

TRITON_INTERPRET must be in the environment before `triton` is first imported (see
docs/MACHINE_NOTES.md), so it is set here, before any project import. On a machine with a
GPU, run with T5FORGE_COMPILED=1 to test the compiled kernels instead.
"""
import os
import pathlib

if os.environ.get("T5FORGE_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_file(relative: str) -> pathlib.Path:
    """A file under ../shared/data, or skip the test when it is absent (it is never copied into the repo)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data file not available: {path}")
    return path


@pytest.fixture
def device():
    import torch

    return torch.device("cuda" if os.environ.get("T5FORGE_COMPILED") == "1" and torch.cuda.is_available() else "cpu")


_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _launch_environment():
    """A test that runs DeepSpeed in this process (a world of one) sets the launcher's variables; without
    restoring them, a later `t5forge pretrain` in the same process would think it runs under a launcher."""
    saved = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def one_thread():
    """Tiny shapes: a second OpenMP thread only adds synchronisation (and the CI cores are shared).
    Modules of tiny-model tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A small made-up language for data tests (tests/test_data_pipeline.py, test_data_workers.py).
WORDS = "the of and to in is was for on that with as by at from river stone light model token quick".split()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A 150-piece SentencePiece tokenizer trained on sentences of WORDS (trained once per session)."""
    import random

    from engine.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(2000)]
    return Tokenizer(train_tokenizer(iter(lines), 150, str(tmp_path_factory.mktemp("tok") / "spm")))


def merge_spans(inputs, targets, tok) -> list:
    """The token stream a span-corruption example was cut from: each sentinel in `inputs` (ids from
    tok.num_pieces up) replaced by the span that follows the same sentinel in `targets`; the EOS dropped."""
    first_sentinel = tok.num_pieces
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= first_sentinel:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t >= first_sentinel else [t])
    return out
