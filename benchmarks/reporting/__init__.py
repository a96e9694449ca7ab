"""What `python benchmarks/report.py` is made of: the inputs (sources), the shared Markdown and figure
helpers, one module per kind of benchmark JSON (kinds/), the pages, the README block, and the registry
(registry.py) that lists the pages and the kinds on them."""
