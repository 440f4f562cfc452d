"""Ahead-of-time compilation of Triton kernels for sm_90 (H100) without a GPU, shared by the
`test_kernels_*compile.py` tests: the interpreter cannot see compiled-only errors, and Triton bundles
ptxas and cuobjdump. The compile script runs in a subprocess because TRITON_INTERPRET must be unset
before triton is imported, and conftest sets it for the rest of the suite."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tools_dir(triton) -> pathlib.Path:
    """Where triton bundles ptxas and cuobjdump."""
    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def run_compile_script(script: str, *, fresh_cache: bool = False, timeout: int = 600) -> tuple[str, list[dict]]:
    """Run `script` compiled (no interpreter); return its stdout and the JSON rows it printed.

    Skips on a GPU run (the real kernel tests compile there) or when triton's bundled tools are absent.
    `fresh_cache` compiles for real every time instead of reusing a cached kernel."""
    if os.environ.get("T5FORGE_COMPILED") == "1":
        pytest.skip("compiled GPU run: the real kernel tests compile these")
    bin_dir = _tools_dir(pytest.importorskip("triton"))
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip("triton's bundled ptxas/cuobjdump not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as cache:
        if fresh_cache:
            env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.stdout, rows


def resource_usage(kernel) -> tuple[int, int]:
    """(stack bytes, registers) per thread of a kernel from `triton.compile`, as the bundled cuobjdump's
    -res-usage reports them; -1 where it reports none. Called inside the compile scripts' subprocess."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([str(_tools_dir(triton) / "cuobjdump"), "-res-usage", f.name], capture_output=True,
                         text=True).stdout
    os.unlink(f.name)
    stack, regs = re.search(r"STACK:(\d+)", out), re.search(r"REG:(\d+)", out)
    return (int(stack.group(1)) if stack else -1), (int(regs.group(1)) if regs else -1)
