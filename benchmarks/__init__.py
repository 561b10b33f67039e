"""Benchmarks and the PyTorch peer; a package only so that tests can import them (`benchmarks.compare_peer`)."""
