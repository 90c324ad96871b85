"""penwatch benchmarks: ratios measured in one run (`make bench`), never in unit tests."""
