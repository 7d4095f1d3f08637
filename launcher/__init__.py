"""meshplan.launcher: renders and runs torchrun jobs; runtime/ builds the model and applies the plan."""
