"""Multi-process runs under the deepspeed launcher on the CPU (gloo).

One launch trains at ZeRO 1, 2 and 3 and must match a single-rank run with the same global batch; two
launcher processes with node ranks 0 and 1 on 127.0.0.1 (a simulated 2-node run) train the real
pipeline at ZeRO 2 and save, and that sharded checkpoint exports to a directory `transformers` loads
with the same logits.
"""
import base64
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import shared_file  # noqa: E402
from engine_ds_worker import COMMON, FEATURES, MICRO, VOCAB  # noqa: E402
from engine_synthetic import SyntheticData  # noqa: E402
from procs import free_port, repo_env  # noqa: E402

pytestmark = pytest.mark.slow




def _env():
    return repo_env(OMP_NUM_THREADS="1")


def test_process_group_is_destroyed_before_interpreter_exit():
    """A gloo group left to interpreter finalization can abort a rank whose run succeeded (SIGABRT,
    "terminate called without an active exception", seen in CI after a ZeRO-3 run): the group the engine
    starts is torn down by an exit handler, before handlers registered earlier run and before finalization."""
    script = (
        "import atexit, os, sys, torch, torch.distributed as dist\n"
        "atexit.register(lambda: print('group at exit:', dist.is_initialized(), flush=True))\n"
        "from engine.distributed.process_group import start_process_group\n"
        "start_process_group(torch.device('cpu'))\n"
        "print('group after start:', dist.is_initialized(), dist.get_world_size(), flush=True)\n"
    )
    env = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "group after start: True 1" in proc.stdout and "group at exit: False" in proc.stdout, proc.stdout
    assert not [f for f in os.listdir("/dev/shm") if env["MASTER_PORT"] in f]


def test_zero_1_2_3_on_two_ranks_match_single_rank(tmp_path):
    from engine.config import load_run_config
    from engine.build import build_trainer

    hf_model = _write_hf_dirs(tmp_path)
    ours_model = _write_local_checkpoint(tmp_path, load_run_config(COMMON + ["--run.dir", str(tmp_path / "x")]))
    out = tmp_path / "losses.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tests/engine_ds_worker.py"),
           str(out), str(tmp_path), "1", "2", "3", "init:fp32", "init:bf16", "load"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = json.loads(out.read_text())

    # The same global batch (2 x MICRO rows) on one local rank.
    cfg = load_run_config(COMMON + ["--run.dir", str(tmp_path / "single"), "--run.engine", "local",
                                    "--batch.micro_batch_size", str(2 * MICRO)])
    trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, 2 * MICRO), tokenizer_vocab=VOCAB)
    reference = trainer.train().losses
    assert len(reference) == 4 and reference[-1] < reference[0]
    for stage in ("1", "2", "3"):
        assert losses[stage] == pytest.approx(reference, rel=1e-5, abs=1e-6), (stage, losses[stage], reference)
    # Each stage saved a DeepSpeed checkpoint with both ranks' states.
    for stage in ("1", "2", "3"):
        ckpt = tmp_path / f"zero{stage}/checkpoints/step_00000004"
        assert (ckpt / "rank_00000.pt").is_file() and (ckpt / "rank_00001.pt").is_file()
    # The ZeRO-3 run (built partitioned) exports to the single rank's trained weights.
    from engine.export import export_main
    from models.hf_checkpoint import hf_state_dict, read_weights

    assert export_main([str(tmp_path / "zero3"), str(tmp_path / "zero3_hf")]) == 0
    exported, trained = read_weights(tmp_path / "zero3_hf"), hf_state_dict(trainer.engine.module)
    assert exported.keys() == trained.keys()
    for name, tensor in trained.items():
        # Sharded reductions round differently: at most 6e-6 measured after 4 AdamW steps of lr 3e-3.
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
    _check_partitioned_build(tmp_path, losses, cfg)
    _check_partitioned_load(tmp_path, losses["load"], [hf_model, ours_model])


def _write_hf_dirs(tmp_path):
    """tmp_path/hf: a small model in the Hugging Face layout with a tokenizer; tmp_path/hf_bad: the
    same weights under a config with another d_ff. Returns the model saved."""
    import shutil

    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    torch.manual_seed(5)
    model = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_heads=4, feed_forward_proj="gated-gelu",
                                                tie_word_embeddings=False, kernel_backend="torch"))
    model.save_pretrained(tmp_path / "hf")
    shutil.copy2(shared_file("tokenizers/seqio_test_t5ids_26pieces.model"), tmp_path / "hf/spiece.model")
    shutil.copytree(tmp_path / "hf", tmp_path / "hf_bad")
    config = json.loads((tmp_path / "hf_bad/config.json").read_text())
    (tmp_path / "hf_bad/config.json").write_text(json.dumps({**config, "d_ff": 48}))
    return model


def _write_local_checkpoint(tmp_path, cfg):
    """tmp_path/ours: a local-engine checkpoint of the run config's model (trainer state, weights,
    tokenizer), as finetune.init takes it. Returns the model saved."""
    import shutil

    from safetensors.torch import save_model

    from engine.build import build_model_config
    from models.t5 import T5ForConditionalGeneration

    (tmp_path / "ours").mkdir()
    torch.manual_seed(6)
    model = T5ForConditionalGeneration(build_model_config(cfg, VOCAB))
    save_model(model, str(tmp_path / "ours/model.safetensors"))
    (tmp_path / "ours/trainer_state.json").write_text(json.dumps({"config": cfg.to_dict()}))
    shutil.copy2(shared_file("tokenizers/seqio_test_t5ids_26pieces.model"), tmp_path / "ours/spiece.model")
    return model


def _check_partitioned_load(tmp_path, result, models):
    """finetune's ZeRO-3 loads: partitioned, the file's weights exactly; a mismatch raised on both ranks."""
    from safetensors.torch import load_file

    assert result["sharded"] == [True, True]
    for i, model in enumerate(models):
        loaded = load_file(str(tmp_path / f"loaded{i}.safetensors"))
        assert loaded.keys() == model.state_dict().keys()
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded[name], tensor), name
    assert len(result["errors"]) == 2 and result["errors"][0] == result["errors"][1], result
    error = result["errors"][0]
    assert "finetune.init" in error and "DenseReluDense.wi_0.weight has shape (64, 32)" in error, result


def _check_partitioned_build(tmp_path, results, cfg):
    """ZeRO-3 built the model partitioned: right after the build every parameter is a shard of
    ceil(numel / 2) elements with empty data, no rank ever held more than one module's whole weights,
    and the weights equal a plain build's with the same seed (bf16: its weights rounded, as DeepSpeed
    rounds a plain fp32 model)."""
    from safetensors.torch import load_file

    from engine.build import build_model_config, seed_everything
    from models.t5 import T5ForConditionalGeneration

    seed_everything(cfg.run.seed)
    plain = T5ForConditionalGeneration(build_model_config(cfg, VOCAB)).state_dict()
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        res = results[f"init:{precision}"]
        assert res["shards"].keys() == plain.keys()
        for name, (numel, ds_numel, shard, shard_dtype) in res["shards"].items():
            assert (numel, ds_numel, shard, shard_dtype) == (0, plain[name].numel(), -(-plain[name].numel() // 2),
                                                             str(dtype)), name
        # Whole parameters held at once: at most one module's (the largest FFN), far below the model.
        assert res["registered"] >= len(plain)
        assert 0 < res["peak"] <= res["largest_module"] < res["total"] / 4, res
        built = load_file(str(tmp_path / f"init_{precision}.safetensors"))
        for name, tensor in plain.items():
            assert torch.equal(built[name], tensor.to(dtype)), name


def test_deepspeed_features_match_single_rank(tmp_path):
    """Gradient accumulation, gradient clipping, activation checkpointing with z-loss, and CPU offload of the
    optimizer (ZeRO 2) and of optimizer and parameters (ZeRO 3), each on 2 ranks under the launcher, give the
    single local rank's losses with the same global batch and the same settings (offload is DeepSpeed's
    only: its reference is the plain run)."""
    from engine.config import load_run_config
    from engine.build import build_trainer

    runs = {"2:accum": "accum", "2:clip": "clip", "3:ckpt_zloss": "ckpt_zloss", "2:offload": "offload",
            "3:offload_all": "offload_all"}
    out, port = tmp_path / "losses.json", free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(REPO / "tests/engine_ds_worker.py"),
           str(out), str(tmp_path), *runs]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank in RAM-backed /dev/shm) are not left behind.
    assert not list(pathlib.Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    for run, feature in runs.items():
        extra = [] if feature.startswith("offload") else FEATURES[feature]
        # The worker's micro-batch (MICRO, or the feature's own) on each of 2 ranks = twice it on one rank.
        micro = 2 * load_run_config(COMMON + ["--batch.micro_batch_size", str(MICRO)] + extra).batch.micro_batch_size
        cfg = load_run_config(COMMON + extra + ["--run.dir", str(tmp_path / f"single_{feature}"), "--run.engine",
                                                "local", "--batch.micro_batch_size", str(micro), "--run.log_every", "1"])
        trainer, _ = build_trainer(cfg, data=SyntheticData(VOCAB, micro), tokenizer_vocab=VOCAB)
        reference = trainer.train().losses
        assert len(reference) == 4 and reference[-1] < reference[0], (run, reference)
        assert got[run] == pytest.approx(reference, rel=1e-5, abs=1e-6), (run, got[run], reference)
        norms = got[run + ":grad_norm"]
        assert len(norms) == 4 and all(n is not None and n > 0 for n in norms), (run, norms)
        if feature == "clip":
            # The bound binds on every step (unclipped AdamW would give other losses: checked below).
            assert min(norms) > 0.2, norms
    # Clipping changed the run, z-loss and checkpointing did not break it: the features are not no-ops.
    assert got["2:clip"] != pytest.approx(got["2:offload"], rel=1e-4)


def test_simulated_two_node_run_trains_saves_and_exports(tmp_path):
    data = shared_file("c4/c4-validation-sample-2k.json.gz")
    tok = shared_file("tokenizers/seqio_test_t5ids_26pieces.model")
    run = tmp_path / "run"
    world_info = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    port = str(free_port())
    args = ["--module", "engine.train", "--run.dir", str(run), "--run.max_steps", "4", "--checkpoint.every", "2",
            "--data.paths", str(data), "--data.tokenizer", str(tok), "--data.input_length", "32",
            "--batch.micro_batch_size", "4", "--deepspeed.zero_stage", "2", "--run.progress", "false",
            "--run.log_every", "1", "--run.tensorboard", "false", "--run.threads", "1"]
    procs = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", *args],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    ckpt = run / "checkpoints/step_00000004"
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000004"
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-2 shards from both "nodes"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2

    # Export the sharded checkpoint and compare transformers' logits with ours on the same weights.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    import transformers

    from engine.export import export_main
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    ours = T5ForConditionalGeneration(T5Config.from_hf_dict(state["model_config"])).eval()
    ours.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=ckpt.name))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 11), generator=g)
    dec = torch.randint(3, 120, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
