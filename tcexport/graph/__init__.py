"""ONNX graph analysis and rewriting on onnx-ir: find blocks, track the token axis, insert methods."""
