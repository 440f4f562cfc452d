"""Which slice of which parameter each ZeRO partition holds, read from DeepSpeed's bookkeeping, so our
optimizers (engine/optim.py, engine/fused_optim.py) keep per-parameter statistics (Adafactor's factored
moments, the parameter RMS) on partitions."""
from __future__ import annotations

import torch


def zero_partition_layouts(zero_optimizer, names: dict) -> list:
    """(flat fp32 partition, PartitionLayout) for every partition DeepSpeed hands the base optimizer.

    Read from DeepSpeed's own bookkeeping (0.19): ZeRO 1/2 (`DeepSpeedZeroOptimizer`) and ZeRO 1 with
    bf16 (`BF16_Optimizer`) link every model parameter to its fragment of the rank's flat partition
    (`_hp_mapping`, what `safe_get_full_fp32_param` reads); ZeRO 3 (`DeepSpeedZeroOptimizer_Stage3`)
    gives each parameter a `ds_tensor` of `partition_numel()` elements starting at rank * that in the
    flattened parameter, laid end to end per sub-group in `fp32_partitioned_groups_flat`. `names` maps
    id(param) -> name (the optimizer keys its per-parameter state by it).
    """
    import torch.distributed as dist

    from engine.optim import ParamSlice, PartitionLayout

    def name_of(p):
        return names.get(id(p), f"param{id(p)}")

    layouts = []
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO 3
        for i, params in enumerate(zero_optimizer.fp16_groups):
            flat = zero_optimizer.fp32_partitioned_groups_flat[i]
            if flat is None:
                raise ValueError("config key 'deepspeed.offload_params': NVMe-swapped partitions are not supported "
                                 "by engine/optim.py's per-parameter statistics")
            group = zero_optimizer.sub_group_process_groups[i]
            rank = dist.get_rank(group=group)
            slices, offset = [], 0
            for j, p in enumerate(params):
                part = p.partition_numel()
                start = rank * part
                numel = max(0, min(part, p.ds_numel - start))  # the last ranks hold padding
                if numel:
                    slices.append(ParamSlice(j, offset, start, numel))
                offset += part
            if offset != flat.numel():
                raise RuntimeError(f"ZeRO-3 sub-group {i}: {offset} partition elements, flat holds {flat.numel()}")
            layouts.append((flat, PartitionLayout([name_of(p) for p in params], [tuple(p.ds_shape) for p in params],
                                                  slices, group)))
        return layouts
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # ZeRO 1/2
        lp_groups, flats = zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups
    elif hasattr(zero_optimizer, "fp32_groups_flat_partition"):  # ZeRO 1 + bf16
        lp_groups, flats = zero_optimizer.bf16_groups, zero_optimizer.fp32_groups_flat_partition
    else:
        raise RuntimeError(f"{type(zero_optimizer).__name__}: unknown ZeRO optimizer, cannot map its partitions "
                           "to parameters")
    for i, params in enumerate(lp_groups):
        slices = []
        for j, p in enumerate(params):
            frag = getattr(p, "_hp_mapping", None)
            if frag is not None:
                slices.append(ParamSlice(j, frag.hp_fragment_address.start, frag.lp_fragment_address.start,
                                         frag.hp_fragment_address.numel))
        layouts.append((flats[i], PartitionLayout([name_of(p) for p in params], [tuple(p.shape) for p in params],
                                                  slices, zero_optimizer.real_dp_process_group[i])))
    return layouts


def whole_tensor_names(wrapper, module: torch.nn.Module) -> list:
    """(name, tensor) for the tensors the base optimizer steps at ZeRO 0: the model's parameters, or with
    fp16 the fp32 masters DeepSpeed's FP16_UnfusedOptimizer made of them (`fp32_groups`, in the order
    of `fp16_groups`)."""
    names = {id(p): n for n, p in module.named_parameters()}
    halves, masters = getattr(wrapper, "fp16_groups", None), getattr(wrapper, "fp32_groups", None)
    if halves is None or masters is None:
        return list(module.named_parameters())
    return [(names[id(half)], master) for hs, ms in zip(halves, masters) for half, master in zip(hs, ms)
            if id(half) in names]
