"""One module per kind of benchmark JSON, each with its KIND; benchmarks/reporting/registry.py lists them."""
