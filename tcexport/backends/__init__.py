"""Engine backends. ONNX Runtime (ort.py) is the embedded default; TensorRT lives in the trt_*.py modules only:
trt_versions (version switches), trt_profiles (profile shapes, workspace), trt_device (tensorrt and the GPU: the
only import of tensorrt), trt_build (plan, sidecar, build), trt_engine (running engines), trt_plugins (plugins)."""
