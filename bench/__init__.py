"""xcloud benchmarks: run each as ``python -m bench.<name> [--quick]`` (see bench/README.md)."""
