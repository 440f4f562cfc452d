"""Run under the deepspeed launcher by tests/test_engine_distributed.py (not a test module itself).

    deepspeed --num_gpus 2 tests/engine_ds_worker.py OUT_JSON RUN_ROOT RUN [RUN ...]

Trains the tiny model on the synthetic stream for each RUN in turn (one launch, one process group:
DeepSpeed's start-up is paid once) and writes rank 0's per-step losses to OUT_JSON, keyed by RUN. A RUN
is a ZeRO stage ("2": COMMON's plain AdamW) or STAGE:VARIANT with a VARIANT of `OPTIMIZERS` or `FEATURES`, or
"shards": test_engine_zero_optim.check_partitions (the optimizers on hand-made partitions, no training), or
"init:PRECISION" (`check_partitioned_build`: the ZeRO-3 model build alone, its weights saved to RUN_ROOT), or
"load" (`check_partitioned_load`: finetune's ZeRO-3 loads of RUN_ROOT/hf and RUN_ROOT/ours, and of
RUN_ROOT/hf_bad, which must fail).
"""
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from engine_synthetic import SyntheticData  # noqa: E402

from engine.config import load_run_config  # noqa: E402
from engine.metrics import read_metrics  # noqa: E402
from engine.build import build_trainer  # noqa: E402

# Shared with the test's single-rank reference: plain AdamW is elementwise, so ZeRO's flat partitions
# give the same update as whole tensors and the runs must agree to rounding.
COMMON = ["--run.max_steps", "4", "--run.progress", "false", "--model.vocab_size", "128", "--optim.name", "adamw",
          "--optim.lr", "3e-3", "--optim.scale_by_param_rms", "false", "--schedule.name", "constant",
          "--schedule.warmup_steps", "0", "--checkpoint.every", "100", "--run.threads", "1", "--run.demo", "false",
          "--run.tensorboard", "false"]
VOCAB, MICRO = 100, 4
RESHARD_STEPS = 8  # tests/test_engine_reshard.py: 4 steps on one world size, 4 more on another
# Overrides on COMMON for the optimizers whose statistics are per parameter (tests/test_engine_zero_optim.py).
OPTIMIZERS = {
    "adafactor": ["--optim.name", "adafactor", "--optim.lr", "1e-2"],
    "adamw_scaled": ["--optim.scale_by_param_rms", "true", "--optim.lr", "2e-2"],
    "fp16": ["--deepspeed.precision", "fp16"],  # COMMON's AdamW, fp16 with loss scaling (tests/test_engine_fp16.py)
}
# Overrides on COMMON for the training features DeepSpeed runs itself; the test gives its single-rank
# reference the same overrides (test_engine_distributed.test_deepspeed_features_match_single_rank).
FEATURES = {
    "accum": ["--batch.grad_accum", "2", "--batch.micro_batch_size", str(MICRO // 2)],
    "clip": ["--optim.clip_grad_norm", "0.2"],
    "ckpt_zloss": ["--model.gradient_checkpointing", "true", "--optim.z_loss", "1e-3"],
    "offload": ["--deepspeed.offload_optimizer", "true"],
    "offload_all": ["--deepspeed.offload_optimizer", "true", "--deepspeed.offload_params", "true"],
}


def save_gathered(model, path: str) -> None:
    """Every rank gathers each ZeRO-3 parameter in turn (a collective); rank 0 saves the whole weights."""
    import deepspeed
    from safetensors.torch import save_file

    state = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            state[name] = p.data.detach().clone()
    if int(os.environ["RANK"]) == 0:
        save_file(state, path)


def check_partitioned_build(run_root: str, precision: str) -> dict:
    """Build the model as build_trainer does at ZeRO-3 and report how it was held: per parameter its
    shard sizes right after the build, and the peak of whole-parameter elements this rank held at once
    while building (counted at every parameter registration and every gather). Rank 0 saves the
    gathered weights to RUN_ROOT/init_PRECISION.safetensors for the test to compare with a plain build."""
    import deepspeed
    import torch

    from engine.build import build_model_config, seed_everything
    from engine.distributed.zero3 import build_model
    from models.t5 import T5ForConditionalGeneration

    cfg = load_run_config(COMMON + ["--run.dir", f"{run_root}/init", "--run.engine", "deepspeed",
                                    "--deepspeed.zero_stage", "3", "--deepspeed.precision", precision])
    seen, peak = [], [0]

    def held():  # elements of whole (unpartitioned) parameter data on this rank right now
        peak[0] = max(peak[0], sum(p.data.numel() for p in seen))

    def on_register(module, name, param):
        if param is not None:
            seen.append(param)
            held()

    gather_enter = deepspeed.zero.GatheredParameters.__enter__

    def counting_enter(self):
        gather_enter(self)
        held()

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(on_register)
    deepspeed.zero.GatheredParameters.__enter__ = counting_enter
    try:
        seed_everything(cfg.run.seed)
        model = build_model(lambda: T5ForConditionalGeneration(build_model_config(cfg, VOCAB)), cfg, "deepspeed",
                            torch.device("cpu"))
    finally:
        deepspeed.zero.GatheredParameters.__enter__ = gather_enter
        handle.remove()
    shards = {name: [p.numel(), p.ds_numel, p.ds_tensor.numel(), str(p.ds_tensor.dtype)]
              for name, p in model.named_parameters()}
    largest_module = max(sum(p.ds_numel for p in m.parameters()) for m in model.init_order())
    save_gathered(model, f"{run_root}/init_{precision}.safetensors")
    return {"shards": shards, "peak": peak[0], "total": sum(p.ds_numel for p in model.parameters()),
            "largest_module": largest_module, "registered": len(seen)}


def check_partitioned_load(run_root: str) -> dict:
    """engine.finetune.load_init_model at ZeRO-3 from the Hugging Face directory RUN_ROOT/hf and the
    local-engine checkpoint RUN_ROOT/ours: whether every parameter is a shard with empty data; rank 0
    saves the gathered weights to RUN_ROOT/loaded{0,1}.safetensors. RUN_ROOT/hf_bad does not fit its
    config: every rank's error message."""
    import torch
    import torch.distributed as dist

    from engine.config import FinetuneSection
    from engine.finetune_init import load_init_model

    cfg = load_run_config(COMMON + ["--run.dir", f"{run_root}/load", "--run.engine", "deepspeed",
                                    "--deepspeed.zero_stage", "3"])
    sharded = []
    for i, init in enumerate(("hf", "ours")):
        model, _ = load_init_model(FinetuneSection(init=f"{run_root}/{init}"), cfg, "deepspeed", torch.device("cpu"))
        sharded.append(all(p.numel() == 0 and p.ds_tensor.numel() == -(-p.ds_numel // 2) for p in model.parameters()))
        save_gathered(model, f"{run_root}/loaded{i}.safetensors")
    try:
        load_init_model(FinetuneSection(init=f"{run_root}/hf_bad"), cfg, "deepspeed", torch.device("cpu"))
        error = ""
    except ValueError as err:
        error = str(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return {"sharded": sharded, "errors": errors}


def resume_resharded(run_root: str, stage: str, optim: str, name: str) -> dict:
    """Resume RUN_ROOT/NAME (resharded by `t5forge reshard`, written on another number of ranks) at ZeRO
    STAGE with OPTIMIZERS[VARIANT] on these ranks; whether this rank's module weights, fp32 master slices
    and optimizer state (cut for its own partitions) equal the resharded files bit for bit; then train on
    to RESHARD_STEPS."""
    import torch

    from engine.optim_state import load_named_state, local_named_state, read_named_state

    directory = f"{run_root}/{name}"
    cfg = load_run_config(COMMON + ["--run.dir", directory, "--run.engine", "deepspeed", "--deepspeed.zero_stage",
                                    stage, "--batch.micro_batch_size", str(MICRO), "--run.log_every", "1",
                                    "--run.max_steps", str(RESHARD_STEPS)] + OPTIMIZERS.get(optim, []))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, MICRO, rank=rank, world_size=world),
                               tokenizer_vocab=VOCAB)
    assert trainer.resume()
    step_dir = pathlib.Path(directory) / "checkpoints" / f"step_{trainer.step:08d}"
    engine, opt = trainer.engine, trainer.engine.base_optimizer
    from safetensors.torch import load_file

    weights = load_file(str(step_dir / "model.safetensors"))
    same = []
    import deepspeed

    for pname, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=stage == "3"):
            # the module's weights are the fp32 masters cast to its dtype (bf16 / fp16 runs)
            same.append(torch.equal(p.data, weights[pname].to(p.dtype)))
    for flat, layout in engine._layouts:
        for sl in layout.slices:
            full = weights[layout.names[sl.param]].reshape(-1)
            same.append(torch.equal(flat.view(-1)[sl.flat_start:sl.flat_start + sl.numel],
                                    full[sl.param_start:sl.param_start + sl.numel]))
    # This rank's live optimizer state, cut back out by name, against a fresh cut of the file's state.
    live = local_named_state(opt)
    wanted = read_named_state(step_dir / "optimizer.safetensors")
    held = {layout.names[sl.param] for _, layout in opt._layouts.values() for sl in layout.slices}
    opt_same = bool(live) and set(live) == held & set(wanted) and _pieces_equal(live, wanted, opt)
    load_named_state(opt, wanted, "again")  # idempotent
    result = trainer.train()
    return {"weights_equal": all(same), "weights_checked": len(same), "optimizer_equal": opt_same,
            "losses": result.losses, "start": trainer.step - len(result.losses)}


def _pieces_equal(live: dict, wanted: dict, opt) -> bool:
    """Every value this rank holds equals the file's at the same place (elementwise state: on this rank's
    slices only, the rest reads as zeros in `live`)."""
    import torch

    from engine.optim_state import ELEMENTWISE

    held = {}
    for flat, layout in ((t, l) for t, l in opt._layouts.values()):
        for sl in layout.slices:
            held.setdefault(layout.names[sl.param], []).append(sl)
    for name, keys in live.items():
        for key, value in keys.items():
            want = wanted[name][key]
            if key in ELEMENTWISE and name in held:
                for sl in held[name]:
                    a = value.reshape(-1)[sl.param_start:sl.param_start + sl.numel]
                    b = want.reshape(-1)[sl.param_start:sl.param_start + sl.numel]
                    if not torch.equal(a, b.float()):
                        return False
            elif not (torch.equal(value, want) if isinstance(value, torch.Tensor) else value == want):
                return False
    return True


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]
    out_json, run_root, runs = argv[0], argv[1], argv[2:]
    results = {}
    for run in runs:
        if run == "shards":
            import torch

            from test_engine_zero_optim import check_partitions

            from engine.distributed.process_group import start_process_group

            start_process_group(torch.device("cpu"))  # the group the trainers reuse
            results[run] = check_partitions()
            continue
        if run == "load":
            results[run] = check_partitioned_load(run_root)
            continue
        if run.startswith("init:"):
            results[run] = check_partitioned_build(run_root, run.split(":")[1])
            continue
        if run.startswith("resume:"):  # resume:STAGE:VARIANT:DIR (test_engine_reshard.py)
            results[run] = resume_resharded(run_root, *run.split(":")[1:])
            continue
        stage, _, optim = run.partition(":")
        directory = f"{run_root}/zero{stage}" + (f"_{optim}" if optim else "")
        cfg = load_run_config(COMMON + ["--run.dir", directory, "--run.engine", "deepspeed", "--deepspeed.zero_stage",
                                        stage, "--batch.micro_batch_size", str(MICRO), "--run.log_every", "1"] +
                              OPTIMIZERS.get(optim, []) + FEATURES.get(optim, []))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by the launcher
        micro = cfg.batch.micro_batch_size
        trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, micro, rank=rank, world_size=world),
                                   tokenizer_vocab=VOCAB)
        result = trainer.train()
        results[run] = result.losses
        if optim in FEATURES:  # the logged gradient norms too (clipping is active when they exceed the bound)
            results[run + ":grad_norm"] = [r.get("grad_norm") for r in read_metrics(directory)]
    if int(os.environ["RANK"]) == 0:
        pathlib.Path(out_json).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
    # Results are written: tear the gloo group down, then leave without C++ static destructors. Once in a
    # loaded full-suite run a rank that had finished still died at interpreter exit ("terminate called
    # without an active exception", a gloo thread destroyed while joinable) and failed the launch; what the
    # test checks is the results file, which is complete by now.
    from engine.distributed.process_group import destroy_process_group

    destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
