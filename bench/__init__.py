"""Benchmarks of tfpipe against a bare Keras script (`python -m bench [--quick]`)."""
