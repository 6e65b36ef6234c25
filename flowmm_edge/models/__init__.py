"""Model files: reading GGUF headers (gguf_file), the PyPI model packages (pypi_models), the
embedded default model assembled from them (default_model), and the synthetic LLaVA-style
models tests and benchmarks generate (tiny)."""
