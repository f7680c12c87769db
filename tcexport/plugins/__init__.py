"""tcexport's TensorRT plugins on the Python side.

kernels.py   the Triton kernels (ToMeMerge, TokenPrune) and torch launchers; importable without TensorRT, so
             they are tested on the CPU under TRITON_INTERPRET=1 and compiled ahead of time to PTX here.
aot.py       ahead-of-time compilation of those kernels to PTX for a GPU target (what aot_impl returns).
python.py    the `tensorrt.plugin` registrations (register + impl + aot_impl); imports tensorrt.

A package module rather than plugins/python/: `tcexport build --plugins python` imports it from the installed
package, wherever tcexport was installed, and the kernels share one copy with the tests and gpu_check.sh.
"""
