"""The code each torchrun rank executes: model, parallelism, training loop."""
