"""The benchmark of issue 3: `python -m bench` (or `bench/run`); see bench/README.md."""
