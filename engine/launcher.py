"""Running under the deepspeed (or torchrun) launcher: its extra arguments, and noticing when it dies.

Every command that may be launched (`engine.train`, `engine.finetune`) calls both.
"""
from __future__ import annotations

import os
import signal
import time


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def watch_launcher(interval_s: float = 1.0) -> None:
    """Under deepspeed's launcher, stop as on SIGTERM when the launcher or the `deepspeed` front-end dies.

    On one node, `deepspeed` (runner.py, 0.19.8) forwards no signal to deepspeed.launcher.launch, so a
    SIGTERM to the front-end alone kills it and leaves the ranks training on; a killed launch.py orphans
    them too. A daemon thread notices its parent or grandparent changing and signals this process, which
    then saves and exits as it does on SIGTERM.
    """
    if "LOCAL_RANK" not in os.environ:
        return
    import threading

    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in launcher.cmdline():
            return
        front = launcher.ppid()
    except psutil.Error:
        return

    def watch():
        while True:
            time.sleep(interval_s)
            try:
                orphaned = os.getppid() != launcher.pid or launcher.ppid() != front
            except psutil.Error:
                orphaned = True
            if orphaned:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="t5forge-launcher-watch", daemon=True).start()
