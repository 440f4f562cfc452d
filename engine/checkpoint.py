"""Atomic, pruned checkpoint directories under RUN_DIR/checkpoints.

    checkpoints/
      step_00000200/      model + optimizer (engine layout), trainer_state.json, rank_00000.pt ...,
                          rank_R.optim_layout.json (what each rank's optimizer holds, engine/optim_state.py),
                          tokenizer/ (the SentencePiece model the run used); after `t5forge reshard`
                          also model.safetensors, optimizer.safetensors, portable.json (engine/reshard.py)
      latest              text file naming the newest COMPLETE step directory

A save writes into `.tmp-step_N`, fsyncs every file, renames it to `step_N`, and only then replaces
`latest` (itself through a temporary file and `os.replace`). A save killed at any point therefore
leaves `latest` on the previous complete checkpoint; stale `.tmp-*` directories are removed on the
next start. Per-rank state (RNG, data-loader position) goes into `rank_R.pt`, loaded with
`torch.load(weights_only=True)`: nothing of ours is unpickled as code (DeepSpeed's own files are read
DeepSpeed's way, by its resume and by `t5forge reshard` / `t5forge export`).

The directory must be on a filesystem every node sees (as DeepSpeed's own checkpoints assume).
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
MANIFEST = "manifest.json"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def tmp_tag(step: int) -> str:
    return f".tmp-{step_tag(step)}"


def _fsync_path(path: pathlib.Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: pathlib.Path) -> None:
    """Flush every file and directory under `root` (and root itself) to stable storage."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(pathlib.Path(dirpath) / name)
        _fsync_path(pathlib.Path(dirpath))


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _read_latest(pointer: pathlib.Path) -> str:
    try:
        return pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{pointer}: damaged (not a step name, binary bytes)") from None


def latest_checkpoint(ckpt_root: pathlib.Path) -> pathlib.Path | None:
    """The step directory `latest` names, or None when the run has no complete checkpoint."""
    pointer = ckpt_root / LATEST
    if pointer.is_dir():
        raise ValueError(f"{pointer}: is a directory, not the pointer file")
    if not pointer.is_file():
        return None
    tag = _read_latest(pointer)
    path = ckpt_root / tag
    if not STEP_DIR.match(tag) or not (path / "trainer_state.json").is_file():
        raise ValueError(f"{pointer}: names {tag[:60]!r}, which is not a complete checkpoint directory")
    return path


# --- verification on load -------------------------------------------------------------------------

def write_manifest(directory: pathlib.Path) -> None:
    """`manifest.json`: every file of a checkpoint with its size, written last (rank 0, in finalize; again
    by `t5forge reshard`, which adds files), through a temporary file."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_text_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


PORTABLE = "portable.json"  # written last by `t5forge reshard` (engine/reshard.py): resumable on any world size


def is_portable(directory: pathlib.Path) -> bool:
    """The step directory holds a resharded (by-name) copy of its weights and optimizer state."""
    from engine.optim_state import PORTABLE_OPTIMIZER, PORTABLE_WEIGHTS

    return all((directory / name).is_file() for name in (PORTABLE, PORTABLE_WEIGHTS, PORTABLE_OPTIMIZER))


def verify_checkpoint(directory: pathlib.Path) -> None:
    """Raise a ValueError naming the first damaged file of a step directory: a size other than the
    manifest's, a missing file, a safetensors file whose header or length is wrong, invalid JSON, a
    `.pt` file whose zip directory is broken (torch.save's format). Reads headers, not the tensors."""
    import zipfile

    from models.hf_checkpoint import read_json_object, verify_safetensors

    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    read_json_object(directory / "trainer_state.json", "trainer state")
    manifest = directory / MANIFEST
    if manifest.exists():  # checkpoints written before the manifest existed are checked by format only
        files = read_json_object(manifest, "checkpoint manifest").get("files")
        if not isinstance(files, dict):
            raise ValueError(f"{manifest}: damaged checkpoint manifest (no 'files' object)")
        for rel, size in files.items():
            path = directory / rel
            if not path.is_file():
                raise ValueError(f"{path}: missing from the checkpoint (listed in {MANIFEST})")
            if path.stat().st_size != size:
                raise ValueError(f"{path}: damaged: {path.stat().st_size} bytes, the checkpoint wrote {size}")
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            verify_safetensors(path)
        elif path.suffix == ".json":
            read_json_object(path, "checkpoint file")
        elif path.suffix == ".pt":
            try:
                with zipfile.ZipFile(path) as z:
                    z.infolist()
            except (zipfile.BadZipFile, OSError, EOFError):
                raise ValueError(f"{path}: damaged (not a complete torch.save file; truncated?)") from None


def step_dirs(ckpt_root: pathlib.Path) -> list[pathlib.Path]:
    """Complete-looking step directories, newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), reverse=True)


def resumable_checkpoint(ckpt_root: pathlib.Path, fallback: bool = True) -> tuple[pathlib.Path | None, list[str]]:
    """The checkpoint to resume from and the notes to print about damaged ones.

    `latest` first; when it (or the pointer itself) is damaged and `fallback`, the newest older step
    directory that verifies, with a note naming the damaged file and the one chosen. Nothing is
    deleted: a damaged directory stays until a save of its step replaces it or pruning removes it."""
    notes: list[str] = []
    try:
        latest = latest_checkpoint(ckpt_root)
        if latest is None and not (ckpt_root / LATEST).exists():
            candidates = step_dirs(ckpt_root)  # a run killed before its first pointer write has none
            if not candidates:
                return None, notes
            latest = candidates[0]
        verify_checkpoint(latest)
        return latest, notes
    except (ValueError, OSError) as err:
        if not fallback:
            raise ValueError(f"{err} (set checkpoint.on_damaged = \"fallback\" to resume from the newest good "
                             "checkpoint)") from None
        notes.append(f"checkpoint damaged: {err}")
        failed = str(err)
    for candidate in step_dirs(ckpt_root):
        try:
            verify_checkpoint(candidate)
        except (ValueError, OSError) as err:
            if str(err) != failed:
                notes.append(f"checkpoint damaged: {err}")
            continue
        notes.append(f"resuming from {candidate.name}, the newest checkpoint that verifies")
        return candidate, notes
    raise ValueError(f"{notes[0].removeprefix('checkpoint damaged: ')}; and no older checkpoint in {ckpt_root} "
                     "verifies (start a new run.dir, or set checkpoint.resume = false)")


def remove_stale(ckpt_root: pathlib.Path) -> None:
    """Delete `.tmp-*` leftovers of saves that were killed (rank 0, before training starts)."""
    if ckpt_root.is_dir():
        for child in ckpt_root.iterdir():
            if child.name.startswith(".tmp-") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def finalize(ckpt_root: pathlib.Path, step: int, keep_last: int) -> pathlib.Path:
    """Rank 0, after every rank has written into the tmp directory: fsync, rename, point `latest`, prune."""
    tmp = ckpt_root / tmp_tag(step)
    final = ckpt_root / step_tag(step)
    write_manifest(tmp)
    fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. resumed and stopped at once): replace it
        trash = ckpt_root / f".tmp-old-{step_tag(step)}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(ckpt_root)
    write_text_atomic(ckpt_root / LATEST, step_tag(step) + "\n")
    prune(ckpt_root, keep_last)
    return final


def prune(ckpt_root: pathlib.Path, keep_last: int) -> None:
    steps = sorted(p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --- per-rank state: RNG and data loader -------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _py_state_to_list(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_py_state_from_list(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _py_state_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_list(state: list):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_rank_state(directory: pathlib.Path, rank: int, rng: dict, data: dict) -> None:
    """RNG states as tensors (`rank_R.pt`); the data-loader state as JSON (`rank_R.data.json`: it holds
    128-bit generator states that JSON keeps exactly)."""
    torch.save(rng, directory / f"rank_{rank:05d}.pt")
    (directory / f"rank_{rank:05d}.data.json").write_text(json.dumps(data), encoding="utf-8")
    # Flushed by the rank that wrote them: on a filesystem shared by nodes, rank 0's fsync in `finalize`
    # only covers what its own node wrote.
    _fsync_path(directory / f"rank_{rank:05d}.pt")
    _fsync_path(directory / f"rank_{rank:05d}.data.json")


def load_rank_state(directory: pathlib.Path, rank: int) -> tuple[dict, dict]:
    path = directory / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (was the checkpoint written with a different number of ranks?)")
    from models.hf_checkpoint import read_json_object

    try:
        rng = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path}: damaged RNG state ({' '.join(str(err).split())[:120]})") from None
    data = read_json_object(directory / f"rank_{rank:05d}.data.json", "data-loader state")
    return rng, data


def save_trainer_state(directory: pathlib.Path, state: dict) -> None:
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")


def load_trainer_state(directory: pathlib.Path) -> dict:
    from models.hf_checkpoint import read_json_object

    return read_json_object(directory / "trainer_state.json", "trainer state")
