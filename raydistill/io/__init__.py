"""I/O that knows no stage: the fsspec storage layer and the corpus readers."""
