"""`t5forge reshard RUN_DIR [--step N]`: make a pretraining checkpoint resumable on any number of ranks.

    deepspeed --num_gpus 2 --module engine.train --deepspeed.zero_stage 2 --run.dir runs/a ...   # 2 ranks
    t5forge reshard runs/a
    t5forge pretrain --run.dir runs/a --run.max_steps 2000 ...                       # continues on 1 rank

A checkpoint holds the optimizer in the layout of the run that wrote it: DeepSpeed's ZeRO partitions, one
file per rank. This command adds to the step directory (`latest` unless `--step N`) the same model and
optimizer state by parameter name, whole: `model.safetensors` (fp32 weights, consolidated with DeepSpeed's
own `zero_to_fp32`; a local-engine checkpoint has it already) and `optimizer.safetensors` (every
parameter's step count and moments, put together from the ranks' files by engine/optim_state.py). A run
with another world size, engine or ZeRO stage cuts them for its own partitions: weights and optimizer
state continue exactly. The original files stay, so the same world size still resumes from them.

Not done through DeepSpeed's universal checkpoints (deepspeed/checkpoint/ds_to_universal.py, 0.19): they
know only Adam's `exp_avg` / `exp_avg_sq` / `step` per flat partition, while our Adafactor keeps factored
row / column moments per parameter and both optimizers keep a step count per parameter
(engine/optim.py).

Written crash-safe: the new files go under temporary names, are flushed and renamed, then
`portable.json` (the mark the resume reads) and the manifest are replaced atomically; until then the
directory is the checkpoint it was. DeepSpeed's own optimizer files are read with torch.load's full
unpickler, as DeepSpeed itself and `t5forge export` do: they are the run's own files.
"""
from __future__ import annotations

import json
import os
import pathlib

import torch

from engine import checkpoint as ckpt
from engine.errors import USER_ERRORS, report
from engine.optim_state import (PORTABLE_OPTIMIZER, PORTABLE_WEIGHTS, consolidate, layout_file,
                                save_named_state)


def _layout(path: pathlib.Path, rank: int) -> dict:
    from models.hf_checkpoint import read_json_object

    file = layout_file(path, rank)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (a checkpoint saved before t5forge recorded optimizer "
                                "layouts: resume it once on its own number of ranks, then reshard the new one)")
    return read_json_object(file, "optimizer layout")


def rank_optimizer_states(path: pathlib.Path, state: dict) -> list:
    """[(file, torch state_dict of our optimizer, its layout record)] for every rank that wrote one."""
    if state.get("engine") == "LocalEngine":
        file = path / "optimizer.pt"
        return [(str(file), torch.load(file, map_location="cpu", weights_only=True), _layout(path, 0))]
    if state.get("zero_stage", 0) == 0:
        raise ValueError(f"{path}: a DeepSpeed ZeRO 0 checkpoint; reshard supports ZeRO 1-3 and the local engine "
                         "(resume it on its own number of ranks with zero_stage >= 1, or use export + finetune.init)")
    ranks = []
    for rank in range(int(state["world_size"])):
        file = path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (rank {rank} of the {state['world_size']} that saved)")
        # DeepSpeed's own format pickles its config and loss-scaler objects; the run's own file.
        wrapper = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = wrapper.get("base_optimizer_state", wrapper.get("optimizer_state_dict"))  # ZeRO 1-2 / ZeRO 3
        if not isinstance(base, dict) or "state" not in base:
            raise ValueError(f"{file}: no base optimizer state_dict (an elastic checkpoint?)")
        ranks.append((str(file), base, _layout(path, rank)))
    return ranks


def consolidated_weights(path: pathlib.Path, state: dict) -> dict:
    from engine.export import consolidated_state_dict

    return consolidated_state_dict(path, state)


def _write_tmp(path: pathlib.Path, name: str, write) -> pathlib.Path:
    tmp = path / f".reshard-{name}.part"  # a suffix verify_checkpoint does not read as a format
    write(tmp)
    ckpt._fsync_path(tmp)
    return tmp


def _save_weights(weights: dict, model_config: dict, where: pathlib.Path):
    """`save_model`'s layout (what the local engine writes): a tied head stored once."""
    from safetensors.torch import save_model

    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    config = T5Config.from_hf_dict(model_config)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    expected = model.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" not in weights and "shared.weight" in weights:
        weights["lm_head.weight"] = weights["shared.weight"]
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{where}: the consolidated weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    # zero_to_fp32's tensors are views of one flat buffer, which save_model refuses: one copy each (a tied
    # head keeps the embedding's).
    own: dict = {}
    model.load_state_dict({k: own.setdefault(id(weights[k]), weights[k].float().clone()) for k in expected},
                          strict=True, assign=True)
    return lambda tmp: save_model(model, str(tmp))


def reshard_checkpoint(run_dir, step: int | None = None) -> tuple[pathlib.Path, bool]:
    """Add the by-name copy to a step directory; (the directory, False when it had one already)."""
    from engine.export import find_checkpoint, verify_for_export

    run_dir = pathlib.Path(run_dir)
    path = find_checkpoint(run_dir, step)
    verify_for_export(path)
    if ckpt.is_portable(path):
        return path, False
    state = ckpt.load_trainer_state(path)
    if not isinstance(state.get("model_config"), dict):
        raise ValueError(f"{path / 'trainer_state.json'}: no model_config (not written by t5forge pretrain)")
    named = consolidate(rank_optimizer_states(path, state))
    written = {}
    if state.get("engine") != "LocalEngine":
        writer = _save_weights(consolidated_weights(path, state), state["model_config"], path)
        written[PORTABLE_WEIGHTS] = _write_tmp(path, PORTABLE_WEIGHTS, writer)
    written[PORTABLE_OPTIMIZER] = _write_tmp(path, PORTABLE_OPTIMIZER, lambda tmp: save_named_state(named, tmp))
    for name, tmp in written.items():
        os.replace(tmp, path / name)
    ckpt._fsync_path(path)
    mark = {"world_size": state["world_size"], "engine": state.get("engine"), "zero_stage": state.get("zero_stage"),
            "parameters_with_state": len(named)}
    ckpt.write_text_atomic(path / ckpt.PORTABLE, json.dumps(mark, indent=1, sort_keys=True))
    ckpt.write_manifest(path)
    return path, True


def reshard_main(argv: list[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    from engine.export import parse_run_argv

    parsed = parse_run_argv(args, "reshard", "t5forge reshard RUN_DIR [--step N]", 1)
    if parsed is None:
        return 2
    args, step = parsed
    try:
        path, added = reshard_checkpoint(args[0], step)
    except USER_ERRORS as err:
        return report("reshard", err)
    what = "resumable on any number of ranks" if added else "already resharded"
    print(f"t5forge reshard: {path}: {what}")
    return 0
