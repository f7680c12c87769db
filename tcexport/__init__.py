"""tcexport: make token compression deployable (PyTorch -> ONNX -> compressed graph -> engine -> benchmark)."""

__version__ = "0.1.0"
