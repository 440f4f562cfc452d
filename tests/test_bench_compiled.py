"""A compiled baseline stays compiled over more shapes than dynamo's recompile limit (benchmarks/compiled.py).

The eager backend keeps this fast on the CPU: the recompile limit and the fallback live in dynamo, whichever
backend compiles the graphs."""
import torch

from benchmarks.compiled import PerShapeCompiled

SHAPES = [(2, 3, 8 + n, 16) for n in range(12)]   # 12 shapes, beyond the default limit of 8


def _biased_attention(q, k, bias):
    return torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)


def _run(fn):
    outs = []
    for shape in SHAPES:
        q, k = torch.randn(shape), torch.randn(shape)
        bias = torch.randn(shape[1], shape[2], shape[2])
        outs.append((fn(q, k, bias), _biased_attention(q, k, bias)))
    return outs


def test_plain_compile_falls_back_to_eager_beyond_the_limit():
    """The failure the wrapper exists for, shown on this torch: fewer graphs than shapes."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(_biased_attention, backend=backend, dynamic=False)
    _run(compiled)
    assert len(graphs) == torch._dynamo.config.recompile_limit < len(SHAPES)


def test_per_shape_compiled_compiles_every_shape_and_matches_eager():
    wrapped = PerShapeCompiled(_biased_attention, backend="eager")
    for got, want in _run(wrapped):
        torch.testing.assert_close(got, want)
    info = wrapped.info()
    assert info["compiled"] and info["dynamic"] is False
    assert info["signatures"] == len(SHAPES)
    assert info["graphs"] == len(SHAPES)   # one graph per shape: none ran eager, none went dynamic


def test_same_shape_reuses_its_graph():
    wrapped = PerShapeCompiled(_biased_attention, backend="eager")
    q = torch.randn(2, 3, 8, 16)
    for _ in range(3):
        wrapped(q, q, torch.zeros(3, 8, 8))
    assert wrapped.graphs == 1 and wrapped.signatures == 1


def test_compiled_model_baseline_beyond_eight_batch_shapes():
    """The model suite's compiled baseline wraps a whole model (benchmarks/model_providers.py): our tiny T5 on
    the torch backend, nine batch shapes, each one a graph of its own and the eager loss."""
    from benchmarks.model_providers import make_batch
    from models.config import T5Config
    from models.t5 import T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config.from_preset("tiny").replace(kernel_backend="torch", dropout_rate=0.0, num_layers=1,
                                               num_decoder_layers=1)
    model = T5ForConditionalGeneration(cfg).eval()
    wrapped = PerShapeCompiled(model, backend="eager")
    for n in range(9):
        batch = make_batch(cfg, 1 + n % 3, 6 + n, 3 + n // 3, "cpu", seed=n)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(**batch).loss, model(**batch).loss)
    assert wrapped.signatures == 9 and wrapped.graphs >= 9
