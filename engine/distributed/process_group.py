"""The process group: started from the launcher's variables (or as a world of one), cleaned up at exit."""
from __future__ import annotations

import os

import torch


def launched_distributed() -> bool:
    """True under the deepspeed / torchrun launchers (they set WORLD_SIZE and LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device) -> None:
    """The process group (once): the launcher's, or without a launcher (a plain `t5forge pretrain
    --run.engine deepspeed`) a world of one. Gloo on the CPU, NCCL on GPUs."""
    import torch.distributed as dist

    if dist.is_initialized():
        # A group made by someone else (a benchmark in this process, a test): DeepSpeed reads these.
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))  # launchers set it; else one host
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:   # one process, no launcher: any free port (a fixed one may be held)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    start_process_group(device)


def start_process_group(device: torch.device) -> None:
    """deepspeed.init_distributed (gloo on the CPU, NCCL on GPUs) from the launcher variables already in
    the environment, with this module's two clean-ups: the /dev/shm buffer is unlinked at once, and a gloo
    group is destroyed at interpreter exit."""
    import atexit

    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    release_shm_buffer()
    if backend == "gloo":  # NCCL's teardown can wait on a peer's collective; only gloo needs this one
        atexit.register(destroy_process_group)


def destroy_process_group() -> None:
    """Tear the default group down while the interpreter is still whole. Left to interpreter finalization,
    a gloo group can still hold finished asynchronous work (ZeRO-3's prefetching all-gathers) whose tensors
    are freed from a C++ thread after Python is gone: the rank dies with SIGABRT ("terminate called without
    an active exception") after its run succeeded, and the launcher reports the job failed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp).

    On the CPU with all ranks on one host, `deepspeed.init_distributed` makes every rank create a ~66 MB
    shared-memory file named by user id, MASTER_ADDR, MASTER_PORT and rank, and map every other rank's;
    DeepSpeed 0.19 never unlinks them, so each launch (tests pick a new port every time) left its files in
    RAM-backed /dev/shm until the machine ran out of memory. After a barrier every rank has mapped all of
    them, so the names can go at once: the mappings stay valid and the memory is freed when the processes
    exit, however they exit (SIGKILL included). A no-op without such a file (GPUs, multi-node).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or not os.path.isdir("/dev/shm"):
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if not os.path.exists(name):
        return
    dist.barrier()  # every rank has opened every buffer (shm_initialize waits for all of them)
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass
