"""Everything that knows DeepSpeed or torch.distributed: the process group (process_group.py), the engine
that wraps `deepspeed.initialize` behind engine/engines.py's `Engine` protocol (zero_engine.py), how ZeRO
partitions map onto parameters for our optimizers (partitions.py), the DeepSpeed JSON derived from a run
config (deepspeed_config.py) and the ZeRO-3 partitioned model build (zero3.py).

DeepSpeed itself is imported only inside functions: the local engine and `t5forge plan` never pay for it,
and a machine without it (the GPU image) imports every module.
"""
