"""The small core every stage stands on: errors, progress, atomic writes, ONNX file I/O, metadata, artifacts."""
