"""torch.compile baselines that cannot silently stop being compiled.

`torch.compile` keeps at most `torch._dynamo.config.recompile_limit` (8) graphs per function. A benchmark
that compiles one baseline and feeds it a new shape per case recompiles each time, and from the ninth shape
on dynamo gives up and runs the function EAGERLY, with only a log line: the baseline's figure would be the
eager one, and our kernel would look faster than it is (FlexAttention's eager path even builds the whole
score matrix). Dynamo's automatic dynamic shapes would also turn the second shape into a dynamic-shape graph,
slower than the static one a user of that shape gets.

`PerShapeCompiled` gives each input signature (shapes, dtypes, devices) its own compilation: on a new
signature it resets dynamo and compiles afresh with `dynamic=False`, under a recompile budget of its own in
which hitting the limit is an error, never an eager fallback. It counts the graphs its backend compiled, so
a record can say it ran compiled (`info()`), and a test can prove it (tests/test_bench_compiled.py).
"""
from __future__ import annotations

import contextlib

import torch

# Graphs one signature may need (graph breaks, guards on Python values): a budget of its own per shape.
RECOMPILES_PER_SIGNATURE = 64


def signature(args, kwargs) -> tuple:
    """What a compiled graph is specialised on: each tensor argument's shape, dtype and device."""
    def one(x):
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), x.dtype, x.device.type)
        if isinstance(x, (list, tuple)):
            return tuple(one(v) for v in x)
        if isinstance(x, (int, float, bool, str, type(None))):
            return ("V", x)
        return ("V", type(x).__name__)   # a closure or mask object: dynamo guards on what it holds

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


@contextlib.contextmanager
def _own_budget():
    cfg = torch._dynamo.config
    patch = {"recompile_limit": RECOMPILES_PER_SIGNATURE,
             "accumulated_recompile_limit": max(cfg.accumulated_recompile_limit, RECOMPILES_PER_SIGNATURE)}
    if hasattr(cfg, "fail_on_recompile_limit_hit"):  # torch >= 2.6: the limit raises instead of running eager
        patch["fail_on_recompile_limit_hit"] = True
    with cfg.patch(patch):
        yield


class PerShapeCompiled:
    """`fn` under torch.compile, compiled afresh (dynamo reset) for every new input signature.

    Only one PerShapeCompiled runs at a time: a reset drops every compiled graph in the process, so a
    benchmark measures one shape to the end before it moves to the next (as every suite here does)."""

    def __init__(self, fn, *, backend: str = "inductor", fullgraph: bool = False):
        self.fn, self.backend_name, self.fullgraph = fn, backend, fullgraph
        self.graphs = 0           # graphs compiled over this object's life
        self.signatures = 0       # distinct signatures seen
        self._compiled, self._key = None, None

    def _backend(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.backend_name)(gm, example_inputs)

    def _compile(self):
        torch._dynamo.reset()
        return torch.compile(self.fn, backend=self._backend, dynamic=False, fullgraph=self.fullgraph)

    def __call__(self, *args, **kwargs):
        key = signature(args, kwargs)
        if key != self._key:
            self._compiled, self._key = self._compile(), key
            self.signatures += 1
        with _own_budget():
            return self._compiled(*args, **kwargs)

    def info(self) -> dict:
        """What a benchmark record says about how this baseline ran."""
        return {"compiled": True, "compile_backend": self.backend_name, "dynamic": False,
                "graphs": self.graphs,
                "signatures": self.signatures, "recompile_budget_per_signature": RECOMPILES_PER_SIGNATURE}
