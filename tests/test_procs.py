"""Child processes of the tests find what the parent found: PYTHONPATH is extended, never replaced (on the
GPU image deepspeed is importable only through the carried wheels on PYTHONPATH)."""
import pathlib
import re

from procs import REPO, repo_env


def test_repo_env_keeps_the_callers_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/carried/wheels")
    env = repo_env(OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"].split(":") == [str(REPO), "/carried/wheels"]
    assert env["OMP_NUM_THREADS"] == "1"


def test_no_test_replaces_pythonpath():
    offenders = []
    for path in pathlib.Path(__file__).parent.glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["']PYTHONPATH["']\]?\s*[:=]\s*str\(REPO\)\s*([,}]|$)""", line):
                offenders.append(f"{path.name}:{n}")
    assert not offenders, f"use procs.repo_env(): {offenders}"
