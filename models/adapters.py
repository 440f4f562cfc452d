"""Adapter layers (T5 paper, section 3.5.1; Houlsby et al. 2019): a small dense-ReLU-dense block added
after every feed-forward network, trained while the rest of the model stays frozen except the layer norms.

    add_adapters(model, d_adapter=64)        # model unchanged at first: the output projection starts at 0
    freeze_for_adapters(model)               # only adapters and layer norms keep requires_grad
    ... fine-tune ...
    save_adapters(model, "sst2_adapters.safetensors")          # a few MB, not the whole model
    load_adapters(fresh_pretrained_model, "sst2_adapters.safetensors")

Each adapter is a child of its FFN sub-layer (`encoder.block.3.layer.1.adapter.{wi,wo}.weight`), so
optimizers, DeepSpeed and `.to()` see it like any other parameter, and a forward hook on the FFN
(`DenseReluDense`) applies `h + wo(relu(wi(h)))` to the FFN's output before dropout and the residual add.
The model file itself knows nothing about adapters. No biases, as everywhere else in T5.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

ADAPTER_PREFIX = "adapter."


class Adapter(nn.Module):
    """h -> h + wo(relu(wi(h))), identity at initialisation (wo = 0)."""

    def __init__(self, d_model: int, d_adapter: int):
        super().__init__()
        if d_adapter < 1:
            raise ValueError(f"adapter inner size (d_adapter) must be positive, got {d_adapter}")
        self.wi = nn.Linear(d_model, d_adapter, bias=False)
        self.wo = nn.Linear(d_adapter, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # T5's init for an FFN input projection; zero output so inserting adapters changes nothing.
        nn.init.normal_(self.wi.weight, std=self.wi.in_features ** -0.5)
        nn.init.zeros_(self.wo.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.wi.weight.dtype)
        return h + self.wo(torch.relu(self.wi(x))).to(h.dtype)


def _ffn_sublayers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every sub-layer holding a `DenseReluDense` FFN (T5LayerFF in HF naming)."""
    found = [(name, module) for name, module in model.named_modules() if hasattr(module, "DenseReluDense")]
    if not found:
        raise ValueError(f"{type(model).__name__}: no FFN sub-layer with a DenseReluDense module to attach adapters to")
    return found


def _apply_adapter(ffn_module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return ffn_module._t5forge_adapter(output)


def add_adapters(model: nn.Module, d_adapter: int) -> list[str]:
    """Insert one adapter after every FFN; returns the names of the FFN sub-layers adapted."""
    names = []
    for name, sublayer in _ffn_sublayers(model):
        if hasattr(sublayer, "adapter"):
            raise ValueError(f"{name}: already has an adapter")
        ffn = sublayer.DenseReluDense
        weight = next(ffn.parameters())
        d_model = ffn.wo.out_features  # not the weight's shape: a ZeRO-3 shard's is empty
        sublayer.adapter = Adapter(d_model, d_adapter).to(device=weight.device, dtype=weight.dtype)
        # The hook reads the adapter through an attribute (not a closure) so a replaced or reloaded
        # adapter module is the one used.
        object.__setattr__(ffn, "_t5forge_adapter", sublayer.adapter)
        ffn._t5forge_adapter_hook = ffn.register_forward_hook(_apply_adapter)
        names.append(name)
    model._t5forge_d_adapter = d_adapter
    return names


def remove_adapters(model: nn.Module) -> None:
    for _, sublayer in _ffn_sublayers(model):
        if hasattr(sublayer, "adapter"):
            ffn = sublayer.DenseReluDense
            ffn._t5forge_adapter_hook.remove()
            del ffn._t5forge_adapter_hook
            object.__delattr__(ffn, "_t5forge_adapter")
            del sublayer.adapter
    if hasattr(model, "_t5forge_d_adapter"):
        del model._t5forge_d_adapter


def is_adapter_parameter(name: str) -> bool:
    return f".{ADAPTER_PREFIX}" in f".{name}"


def is_layer_norm_parameter(name: str) -> bool:
    return name.endswith("layer_norm.weight")  # layer.N.layer_norm and {encoder,decoder}.final_layer_norm


def freeze_for_adapters(model: nn.Module, train_layer_norms: bool = True) -> tuple[int, int]:
    """Only adapters (and layer norms, as the paper does) stay trainable; returns (trainable, total)."""
    if not any(is_adapter_parameter(n) for n, _ in model.named_parameters()):
        raise ValueError("freeze_for_adapters: the model has no adapters (call add_adapters first)")
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name) or (train_layer_norms and is_layer_norm_parameter(name)))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter_parameter(name)}


def save_adapters(model: nn.Module, path: str | os.PathLike, include_layer_norms: bool = True) -> None:
    """The adapters (and, by default, the layer norms they were trained with) as one safetensors file."""
    from safetensors.torch import save_file

    state = adapter_state_dict(model)
    if not state:
        raise ValueError("save_adapters: the model has no adapters")
    if include_layer_norms:
        state.update({n: t for n, t in model.state_dict().items() if is_layer_norm_parameter(n)})
    metadata = {"format": "t5forge-adapters", "d_adapter": str(model._t5forge_d_adapter),
                "names": json.dumps(sorted(state))}
    save_file({n: t.detach().contiguous().cpu() for n, t in state.items()}, os.fspath(path), metadata=metadata)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> int:
    """Add adapters of the saved size to a model (if it has none) and load them; returns d_adapter."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != "t5forge-adapters":
            raise ValueError(f"{path}: not a t5forge adapter file (metadata format={metadata.get('format')!r})")
        d_adapter = int(metadata["d_adapter"])
        state = {name: f.get_tensor(name) for name in f.keys()}
    if not any(is_adapter_parameter(n) for n, _ in model.named_parameters()):
        add_adapters(model, d_adapter)
    elif getattr(model, "_t5forge_d_adapter", None) != d_adapter:
        raise ValueError(f"{path}: adapters of size {d_adapter}, the model has size {model._t5forge_d_adapter}")
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise ValueError(f"{path}: {name} does not exist in this model (different architecture?)")
        if own[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model wants {tuple(own[name].shape)}")
    missing = [n for n in own if is_adapter_parameter(n) and n not in state]
    if missing:
        raise ValueError(f"{path}: missing adapter weights, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)
    return d_adapter
