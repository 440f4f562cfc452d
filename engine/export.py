"""`t5forge export RUN_DIR OUT_DIR [--step N]`: a run's checkpoint as a Hugging Face T5 directory.

    t5forge export runs/base hf/t5-base-ours
    python -c "import transformers; transformers.T5ForConditionalGeneration.from_pretrained('hf/t5-base-ours')"

ZeRO-sharded checkpoints (stages 1-3, any number of ranks) are consolidated to fp32 with DeepSpeed's own
`deepspeed.utils.zero_to_fp32`; local-engine checkpoints hold the whole model already. The output has
`config.json`, safetensors weights (Hugging Face names: the fused weights are split back into `wi_0` /
`wi_1` and `q` / `k` / `v`) and the run's tokenizer: its SentencePiece model as `spiece.model`, or ByT5's
`tokenizer_config.json`.
"""
from __future__ import annotations

import pathlib
import sys

import torch

from engine import checkpoint as ckpt
from engine.errors import USER_ERRORS, report
from engine.tokenizer_files import write_tokenizer


def find_checkpoint(run_dir: pathlib.Path, step: int | None) -> pathlib.Path:
    root = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if step is not None:
        path = root / ckpt.step_tag(step)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{path}: no complete checkpoint for step {step}")
        return path
    path = ckpt.latest_checkpoint(root)
    if path is None:
        raise FileNotFoundError(f"{root}: no checkpoint (no 'latest' file)")
    return path


def verify_for_export(path: pathlib.Path) -> None:
    """The checkpoint verifies (engine/checkpoint.py); else one line naming the damaged file and the
    older checkpoints that `--step N` can export instead."""
    try:
        ckpt.verify_checkpoint(path)
    except ValueError as err:
        older = [p.name for p in ckpt.step_dirs(path.parent) if p.name < path.name]
        hint = f"; older checkpoints: {', '.join(older)} (export one with --step N)" if older else ""
        raise ValueError(f"{err}{hint}") from None


def check_output_dir(out: pathlib.Path, run_dir: pathlib.Path) -> None:
    """OUT_DIR must be a directory (new or existing) outside the run's checkpoints."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR {out}: exists and is a file; give a directory (new or existing)")
    ckpts = (run_dir / "checkpoints").resolve()
    real = out.resolve()
    if real == ckpts or ckpts in real.parents:
        raise ValueError(f"OUT_DIR {out}: is inside the run's checkpoints ({ckpts}); exporting there would "
                         "overwrite a checkpoint's files; choose another directory")


def check_tokenizer_copy(path: pathlib.Path, state: dict, vocab_size: int) -> str | None:
    """The checkpoint's tokenizer/ copy (engine/tokenizer_files.py): the tokenizer the run recorded, and no
    more ids than the model; None when the checkpoint carries none."""
    from engine.tokenizer_files import check_same_tokenizer, find_tokenizer, open_tokenizer

    own = find_tokenizer(path)
    if own is None:
        return None
    if isinstance(state.get("tokenizer"), dict):
        check_same_tokenizer(own, state["tokenizer"], f"checkpoint {path} (trainer_state.json)")
    ids = open_tokenizer(own).vocab_size
    if ids > vocab_size:
        raise ValueError(f"{own}: tokenizer has {ids} ids, more than the model's vocabulary of {vocab_size}")
    return own


def consolidated_state_dict(path: pathlib.Path, state: dict) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict (our module's parameter names) of one checkpoint directory."""
    if (path / "model.safetensors").is_file():  # local engine
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if any(path.glob("*_optim_states.pt")) and state.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's own consolidation of the ZeRO partitions (run's own files; see module docstring).
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    model_states = path / "mp_rank_00_model_states.pt"
    if model_states.is_file():  # ZeRO 0: DeepSpeed saved the whole module
        # DeepSpeed's own file format pickles its config objects; this is the run's own checkpoint.
        return torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    raise FileNotFoundError(f"{path}: no model weights found (model.safetensors or DeepSpeed files)")


def export_checkpoint(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
    from models.hf_checkpoint import save_pretrained
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out_dir)
    path = find_checkpoint(run_dir, step)
    check_output_dir(out, run_dir)
    verify_for_export(path)
    state = ckpt.load_trainer_state(path)
    if not isinstance(state.get("model_config"), dict):
        raise ValueError(f"{path / 'trainer_state.json'}: no model_config (not written by t5forge pretrain)")
    try:
        config = T5Config.from_hf_dict(state["model_config"])
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path / 'trainer_state.json'}: model_config: {err}") from None
    tokenizer = check_tokenizer_copy(path, state, config.vocab_size)
    weights = consolidated_state_dict(path, state)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    expected = model.state_dict()
    # A tied head shares the embedding: DeepSpeed and safetensors keep only one of the two names.
    for name, tensor in expected.items():
        if name not in weights and config.tie_word_embeddings and name == "lm_head.weight":
            weights[name] = weights["shared.weight"]
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    model.load_state_dict({k: weights[k].float() for k in expected}, strict=True, assign=True)
    save_pretrained(model, out)
    if tokenizer is not None:
        write_tokenizer(tokenizer, out)
    return path


def parse_run_argv(argv: list[str], command: str, usage: str, positional: int):
    """`RUN_DIR ... [--step N]` of export and reshard: (the positional arguments, N or None), or None after
    printing the one-line usage error."""
    args, step = list(argv), None
    if "--step" in args:
        i = args.index("--step")
        try:
            step = int(args[i + 1])
        except (IndexError, ValueError):
            print(f"t5forge {command}: error: --step takes an integer", file=sys.stderr)
            return None
        del args[i:i + 2]
    if len(args) != positional:
        print(f"t5forge {command}: error: usage: {usage}", file=sys.stderr)
        return None
    return args, step


def export_main(argv: list[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    parsed = parse_run_argv(args, "export", "t5forge export RUN_DIR OUT_DIR [--step N]", 2)
    if parsed is None:
        return 2
    args, step = parsed
    try:
        path = export_checkpoint(args[0], args[1], step)
    except USER_ERRORS as err:
        return report("export", err)
    print(f"t5forge export: {path} -> {args[1]}")
    return 0
