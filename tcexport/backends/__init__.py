"""Engine backends. ONNX Runtime (ort.py) is the embedded default; TensorRT lives in trt.py only."""
