"""PyTorch -> ONNX with provenance, checked against PyTorch."""
