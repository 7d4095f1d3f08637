"""Templates shipped as package data (torchrun, Slurm, Kubernetes, CI workflow, report)."""
