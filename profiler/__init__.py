"""meshplan.profiler: measures compute, memory and links on the real cluster (torch)."""
