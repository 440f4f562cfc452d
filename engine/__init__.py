"""t5forge engine: training loop, DeepSpeed, data, tasks, CLI. Depends on models/ and kernels/."""
