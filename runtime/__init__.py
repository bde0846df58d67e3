"""Runtime: trains a model for real under a planner Plan with torch.distributed.

`runtime.launch` is importable without torch; every other module imports torch."""
