"""Host-side cost of one training step: aten operations per phase (forward, backward, optimizer).

    python -m benchmarks.op_counts                                  # t5-v1_1-base on the CPU, both optimizers
    python -m benchmarks.op_counts --preset tiny --optimizers adamw --impls fused
    from benchmarks.op_counts import count_step_ops; count_step_ops(device="cuda")   # the GPU evidence

Every aten operation the dispatcher records under `torch.profiler` (CPU activity) is counted, nested ones
included (an `aten::to` and the `aten::copy_` it calls are two), which is how issue 13 counted its
figures. At a few microseconds of host time per operation on a GPU, the count bounds how fast the host
can issue a step whatever the device does. The optimizer is counted on its second step (the first
creates its state), after one forward + backward on a fixed batch (model: kernel_backend "torch" on the
CPU, the preset's dropout); `impl` "reference" is engine/optim.py's per-tensor implementation,
"fused" engine/fused_optim.py's bucketed one (what build_optimizer returns). The batch size does not
change the counts; it is kept small so base fits a CPU run in a minute or two.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

OPTIMIZERS = ("adafactor", "adamw")
IMPLS = ("reference", "fused")


def count_aten_ops(fn, device: torch.device) -> tuple[int, object]:
    """(aten operations recorded while fn() runs, fn's result)."""
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")), result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_optimizer(name: str, impl: str, params):
    """The engine's optimizer `name` with the preset recipe's settings (engine/config.py defaults)."""
    if impl not in IMPLS:
        raise ValueError(f"benchmarks/op_counts.py: impl {impl!r}, expected one of {IMPLS}")
    if impl == "reference":
        from engine.optim import Adafactor, AdamWScale
    else:
        from engine.fused_optim import FusedAdafactor as Adafactor, FusedAdamWScale as AdamWScale
    if name == "adafactor":
        return Adafactor(params, lr=1e-2)
    if name == "adamw":
        return AdamWScale(params, lr=2e-2)
    raise ValueError(f"benchmarks/op_counts.py: optimizer {name!r}, expected one of {OPTIMIZERS}")


def _model_and_batch(preset: str, device: torch.device, batch: int, inputs: int, targets: int):
    from benchmarks.model_providers import make_batch
    from models import T5Config, T5ForConditionalGeneration

    cfg = T5Config.from_preset(preset).replace(kernel_backend="torch")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).to(device).train()
    return model, make_batch(cfg, batch, inputs, targets, device)


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def count_step_ops(preset: str = "t5-v1_1-base", device: str | torch.device = "cpu",
                   optimizers=OPTIMIZERS, impls=IMPLS, batch: int = 2, inputs: int = 64, targets: int = 16,
                   time_repeats: int = 0) -> dict:
    """Aten operations of one training step per phase; a dict (JSON-ready).

    {"preset", "device", "tensors", "forward", "backward", "optimizer": {name: {impl: ops}},
     "step": {name: {impl: forward + backward + optimizer}}, "optimizer_ms": {name: {impl: ms}} (with
    time_repeats > 0: the best of that many steps)}.
    """
    device = torch.device(device)
    model, data = _model_and_batch(preset, device, batch, inputs, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    forward, out = count_aten_ops(lambda: model(**data), device)
    loss = out.loss
    del out  # the logits go before backward
    backward, _ = count_aten_ops(loss.backward, device)
    del loss
    record = {"preset": preset, "device": str(device), "tensors": len(params), "forward": forward,
              "backward": backward, "optimizer": {}, "step": {}}
    if time_repeats:
        record["optimizer_ms"] = {}
    for name in optimizers:
        for impl in impls:
            opt = build_optimizer(name, impl, params)
            with torch.no_grad():
                saved = [p.detach().clone() for p in params]
            opt.step()  # creates the state
            ops, _ = count_aten_ops(opt.step, device)
            record["optimizer"].setdefault(name, {})[impl] = ops
            record["step"].setdefault(name, {})[impl] = forward + backward + ops
            if time_repeats:
                record["optimizer_ms"].setdefault(name, {})[impl] = round(_time_ms(opt.step, device, time_repeats), 3)
            with torch.no_grad():  # the next optimizer starts from the same weights
                torch._foreach_copy_(params, saved)
            del opt, saved
            gc.collect()
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="t5-v1_1-base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--time-repeats", type=int, default=0, help="also time the optimizer step (best of N)")
    parser.add_argument("--out", help="write the record as JSON here too")
    args = parser.parse_args(argv)
    record = count_step_ops(args.preset, args.device, args.optimizers, args.impls, time_repeats=args.time_repeats)
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return record


if __name__ == "__main__":
    main()
