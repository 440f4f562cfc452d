"""engine/fused_optim.py's bucketed optimizers against engine/optim.py's per-tensor ones (the reference).

Step for step on a small T5 (losses, every parameter, the state), with per-parameter clocks and frozen
or gradient-less tensors, bf16 weights, a skipped non-finite step, a flat partition stepped in the same
optimizer, state_dict round trips either way, and the aten operation count of a T5-v1_1-base-shaped step.
"""
import io

import pytest
import torch

from engine.fused_optim import FusedAdafactor, FusedAdamWScale
from engine.optim import Adafactor, AdamWScale, ParamSlice, PartitionLayout, build_optimizer
from models import T5Config, T5ForConditionalGeneration

PAIRS = {"adafactor": (Adafactor, FusedAdafactor), "adamw": (AdamWScale, FusedAdamWScale)}
SETTINGS = [
    ("adafactor", dict(lr=1e-2, weight_decay=0.01)),
    ("adafactor", dict(lr=1e-3, factored=False, scale_parameter=False)),  # unscaled: HF fine-tuning lr
    ("adamw", dict(lr=1e-2, weight_decay=0.01)),
    ("adamw", dict(lr=1e-3, scale_by_param_rms=False, weight_decay=0.01)),
]
TOL = dict(rtol=2e-5, atol=1e-7)


def _model(seed=0, **fields):
    cfg = T5Config.from_preset("tiny").replace(vocab_size=96, kernel_backend="torch", **fields)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg).train()


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(2, 96, (4, 12), generator=g), labels=torch.randint(2, 96, (4, 7), generator=g))
            for _ in range(n)]


def _train(model, opt, batches):
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _assert_same_state(a, b, params_a, params_b):
    for p, q in zip(params_a, params_b, strict=True):
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sorted(sa) == sorted(sb)
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert sa[key].shape == sb[key].shape, key
                torch.testing.assert_close(sa[key], sb[key], **TOL)
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize("name, kw", SETTINGS)
def test_twenty_steps_equal_the_reference(name, kw):
    ref_cls, fused_cls = PAIRS[name]
    ref_model, fused_model, batches = _model(), _model(), _batches(20)
    ref_opt, fused_opt = ref_cls(ref_model.parameters(), **kw), fused_cls(fused_model.parameters(), **kw)
    ref_losses, fused_losses = _train(ref_model, ref_opt, batches), _train(fused_model, fused_opt, batches)
    torch.testing.assert_close(fused_losses, ref_losses, rtol=1e-5, atol=0)
    assert ref_losses[-1] < ref_losses[0]
    for (n, a), b in zip(fused_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, **TOL, msg=n)
    _assert_same_state(fused_opt, ref_opt, list(fused_model.parameters()), list(ref_model.parameters()))


def _tensors(dtype=torch.float32):
    # Same shapes twice (a bucket of two), a 3-D tensor (factored over its last two dims), 1-D, a scalar.
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (6, 5), (3, 4, 5), (7,), (7,), (), (5, 6)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _drive(opt_cls, params, kw, steps=8, grads_seed=1):
    """Steps with some tensors gradient-less (3 and 6 at step 2 and later, 0 at steps 4-5) and some frozen
    by name (1 at steps 3-5): per-parameter clocks diverge."""
    opt = opt_cls(params, **kw)
    opt.name_whole_tensors([(f"t{i}", p) for i, p in enumerate(params)])
    g = torch.Generator().manual_seed(grads_seed)
    for step in range(steps):
        opt.set_frozen(["t1"] if 3 <= step <= 5 else [])
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.dtype)
            none = (i in (3, 6) and step >= 2 and step % 2 == 0) or (i == 0 and step in (4, 5))
            p.grad = None if none else grad
        opt.step()
    return opt


@pytest.mark.parametrize("name, kw", SETTINGS)
def test_per_parameter_clocks_frozen_and_gradient_less_tensors(name, kw):
    ref_cls, fused_cls = PAIRS[name]
    ref_params, fused_params = _tensors(), _tensors()
    ref_opt, fused_opt = _drive(ref_cls, ref_params, kw), _drive(fused_cls, fused_params, kw)
    assert {fused_opt.state[p]["step"] for p in fused_params} == {ref_opt.state[p]["step"] for p in ref_params}
    assert len({ref_opt.state[p]["step"] for p in ref_params}) > 1  # the clocks did diverge
    for a, b in zip(fused_params, ref_params):
        torch.testing.assert_close(a, b, **TOL)
    _assert_same_state(fused_opt, ref_opt, fused_params, ref_params)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_bf16_weights(name):
    ref_cls, fused_cls = PAIRS[name]
    ref_params, fused_params = _tensors(torch.bfloat16), _tensors(torch.bfloat16)
    _drive(ref_cls, ref_params, dict(lr=1e-2, weight_decay=0.01))
    _drive(fused_cls, fused_params, dict(lr=1e-2, weight_decay=0.01))
    for a, b in zip(fused_params, ref_params):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # one bf16 rounding apart at most


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_non_finite_gradient_skips_the_step(name):
    ref_cls, fused_cls = PAIRS[name]
    ref_params, fused_params = _tensors(), _tensors()
    ref_opt, fused_opt = _drive(ref_cls, ref_params, {}, steps=2), _drive(fused_cls, fused_params, {}, steps=2)
    before = [p.detach().clone() for p in fused_params]
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in fused_opt.state[fused_params[0]].items()}
    for p in fused_params:
        p.grad = torch.ones_like(p)
    fused_params[1].grad[4, 2] = float("inf")  # tensor 1 shares its bucket with tensor 0
    fused_opt.step()
    assert fused_opt.last_step_skipped and fused_opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(fused_params, before))
    after = fused_opt.state[fused_params[0]]
    assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in state.items())
    for p, q in zip(fused_params, ref_params):  # and it goes on as the reference, the bad tensor gradient-less
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    fused_params[1].grad = ref_params[1].grad = None
    fused_opt.step()
    ref_opt.step()
    assert not fused_opt.last_step_skipped
    for a, b in zip(fused_params, ref_params):
        torch.testing.assert_close(a, b, **TOL)


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
@pytest.mark.parametrize("first, second", [("fused", "ref"), ("ref", "fused"), ("fused", "fused")])
def test_state_dict_resumes_across_implementations(name, first, second):
    classes = dict(zip(("ref", "fused"), PAIRS[name]))
    kw = dict(lr=1e-2, weight_decay=0.01)
    whole_model, batches = _model(), _batches(6)
    whole = _train(whole_model, classes["ref"](whole_model.parameters(), **kw), batches)
    model = _model()
    opt = classes[first](model.parameters(), **kw)
    losses = _train(model, opt, batches[:3])
    saved = _roundtrip(opt.state_dict())
    opt = classes[second](model.parameters(), **kw)
    opt.load_state_dict(saved)
    losses += _train(model, opt, batches[3:])
    torch.testing.assert_close(losses, whole, rtol=1e-5, atol=0)
    for a, b in zip(model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_a_flat_partition_steps_with_the_whole_tensors(name):
    """A flat tensor declared as a partition of two parameters takes the reference's slice path in the
    same step as the bucketed whole tensors (ZeRO's layouts; here without a process group)."""
    ref_cls, fused_cls = PAIRS[name]

    def run(cls):
        params = _tensors()
        flat = torch.nn.Parameter(torch.cat([params[0].detach().view(-1), params[3].detach().view(-1)]))
        rest = params[1:3] + params[4:]
        opt = cls(rest + [flat], lr=1e-2)
        opt.set_partition_layout(flat, PartitionLayout(["a", "b"], [(6, 5), (7,)],
                                                       [ParamSlice(0, 0, 0, 30), ParamSlice(1, 30, 0, 7)]))
        g = torch.Generator().manual_seed(3)
        for _ in range(4):
            for p in rest + [flat]:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return rest + [flat]

    for a, b in zip(run(fused_cls), run(ref_cls)):
        torch.testing.assert_close(a, b, **TOL)


def test_build_optimizer_returns_the_fused_ones():
    from engine.config import OptimSection

    params = [torch.nn.Parameter(torch.zeros(3, 2))]
    assert type(build_optimizer(params, OptimSection(name="adafactor"))) is FusedAdafactor
    assert type(build_optimizer(params, OptimSection(name="adamw"))) is FusedAdamWScale


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_a_v1_1_base_shaped_step_costs_at_most_2000_aten_operations(name):
    """T5-v1_1-base's 198 tensors (12 + 12 blocks) at small widths: the count depends on the tensors, not
    their sizes. The reference spends ~150 operations per tensor."""
    from benchmarks.op_counts import count_aten_ops

    model = _model(num_layers=12, num_decoder_layers=12)
    params = list(model.parameters())
    assert len(params) == 198
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    counts = {}
    for impl, cls in zip(("ref", "fused"), PAIRS[name]):
        opt = cls(params, lr=1e-3)
        opt.step()
        counts[impl], _ = count_aten_ops(opt.step, torch.device("cpu"))
    assert counts["fused"] <= 2000 < 10 * counts["fused"] < counts["ref"], counts
