"""Adapter layers and gradual unfreezing, checked on the parameters themselves."""
import pytest
import torch

from engine.unfreezing import GradualUnfreezer
from models.adapters import (add_adapters, freeze_for_adapters, load_adapters, remove_adapters,
                             save_adapters)
from models.config import T5Config
from models.t5 import T5ForConditionalGeneration


def _model(seed=0, layers=3):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=layers,
                                               num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                               dropout_rate=0.0, kernel_backend="torch"))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, 64, (4, 7), generator=g), "labels": torch.randint(2, 64, (4, 5), generator=g)}


def _train(model, steps, unfreezer=None, lr=0.05):
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=lr)
    for step in range(steps):
        if unfreezer is not None:
            unfreezer.apply(step)
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adapters_start_as_identity_then_change_the_output():
    model = _model()
    batch = _batch()
    before = model(**batch).logits
    names = add_adapters(model, d_adapter=8)
    assert len(names) == 6  # after each FFN: 3 encoder + 3 decoder blocks
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)
    with torch.no_grad():
        model.encoder.block[1].layer[1].adapter.wo.weight.normal_()
    assert not torch.allclose(model(**batch).logits, before)
    remove_adapters(model)
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter inner size"):
        add_adapters(model, 0)


def test_only_adapters_and_layer_norms_change():
    model = _model()
    add_adapters(model, d_adapter=4)
    trainable, total = freeze_for_adapters(model)
    assert 0 < trainable < total / 4
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, 3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    expected = {n for n in start if ".adapter." in n or n.endswith("layer_norm.weight")}
    assert changed == expected


def test_adapters_save_and_load_on_their_own(tmp_path):
    model = _model()
    add_adapters(model, d_adapter=4)
    freeze_for_adapters(model)
    _train(model, 2)
    save_adapters(model, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").stat().st_size < 20_000  # adapters + norms, not the model
    fresh = _model()  # the same pretrained weights, without adapters
    assert load_adapters(fresh, tmp_path / "a.safetensors") == 4
    batch = _batch(9)
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)
    wrong = _model(layers=2)
    with pytest.raises(ValueError, match="does not exist in this model"):
        load_adapters(wrong, tmp_path / "a.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception):
        load_adapters(_model(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapters(_model(), tmp_path / "missing.safetensors")


def _blocks_changed(model, start):
    changed = set()
    for stack in ("encoder", "decoder"):
        for i, block in enumerate(getattr(model, stack).block):
            if any(not torch.equal(p, start[f"{stack}.block.{i}.{n}"]) for n, p in block.named_parameters()):
                changed.add(f"{stack}.{i}")
    return changed


@pytest.mark.parametrize("mask_gradients", [False, True])
def test_gradual_unfreezing_follows_the_schedule(mask_gradients):
    model = _model(layers=3)
    unfreezer = GradualUnfreezer(model, every=2, mask_gradients=mask_gradients)
    assert [unfreezer.blocks_unfrozen(s) for s in range(7)] == [1, 1, 2, 2, 3, 3, 4]
    phases = [({"encoder.2", "decoder.2"}), ({"encoder.1", "decoder.1"}), ({"encoder.0", "decoder.0"})]
    step = 0
    for phase, newly in enumerate(phases):
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(2):  # the two steps of this phase
            unfreezer.apply(step)
            model(**_batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        unlocked = set().union(*phases[: phase + 1])
        assert _blocks_changed(model, start) == unlocked
        # outside the blocks (embedding, head, final norms) always trains
        assert not torch.equal(model.shared.weight, start["shared.weight"])
        assert not torch.equal(model.lm_head.weight, start["lm_head.weight"])
    with pytest.raises(ValueError, match="unfreeze_every"):
        GradualUnfreezer(model, every=0)


def test_hf_export_of_an_adapted_model_holds_only_the_base_weights(tmp_path):
    """`save_pretrained` of a model carrying adapters writes the base model (adapters go to their own file),
    so the export loads in our loader and in Hugging Face without unexpected keys."""
    base = _model()
    adapted = _model()
    add_adapters(adapted, d_adapter=8)
    adapted.save_pretrained(tmp_path)
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == set(base.state_dict())
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, base(**batch).logits)
