"""plugins/cpp verified without a GPU (see tests/cpp_toolchain.py for where the compilers come from):

1. the plugin host code compiles against TensorRT's 10.3, 10.13 and 11 headers (g++ -fsyntax-only, -Werror);
2. the .cu kernels compile as they are with NVRTC to PTX for sm_87 and sm_90, and ptxas assembles that PTX;
3. the kernels' per-row code, compiled for the host (plugins/cpp/harness), equals ToMe.reference and
   TopK.reference: exact token choices (sizes, masks, which rows), x within 1e-5 (fp32 I/O);
4. the plugins answer TensorRT's IPluginV3 calls (creators, fields, shapes, types, formats, serialization,
   enqueue) as the contract says, driven through TensorRT's own interfaces by harness/plugin_probe.cpp, with
   the kernels' per-row code standing in for the GPU (harness/cpu_launch.cpp);
5. where a CUDA toolkit exists: CMake builds the library (slow), and on a GPU (marked gpu) the real kernels
   give bit for bit what the host harness gives;
6. (slow) end to end on a padded text model: each --impl function call node's attributes and tensors, given to
   the per-row code, give what the node's function body computes.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch

from tcexport.methods.tome import ToMe
from tcexport.methods.topk import TopK
from tests import cpp_toolchain as tc
from tests.conftest import run_cli

ARCHS = ("sm_87", "sm_90")
KERNEL_FILES = {"tome_kernels.cu": ("tome_decide_kernel", "tome_gather_kernel"),
                "prune_kernels.cu": ("prune_decide_kernel", "prune_gather_kernel")}
ELEMENTS = {"f32": 0, "f16": 1, "bf16": 2}
THREADS = (1, 7, 128)  # one thread, a block smaller than the work, a block larger than it


def _need(value, what: str):
    if value is None:
        pytest.skip(f"{what} not found ({tc.INSTALL_HINT})")
    return value


@pytest.fixture(scope="session")
def cuda_includes():
    return _need(tc.cuda_include_dirs(), "CUDA headers from nvidia-cuda-runtime-cu12 / nvidia-cuda-nvcc-cu12")


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    if tc.gxx() is None:
        pytest.skip("g++ not found")
    lib = ctypes.CDLL(str(tc.build_harness(tmp_path_factory.mktemp("harness"))))
    ptr = ctypes.c_void_p
    lib.tc_tome_host.argtypes = [ctypes.c_int] * 8 + [ptr] * 7
    lib.tc_prune_host.argtypes = [ctypes.c_int] * 9 + [ptr] * 7
    for name in ("tc_float_to_f16", "tc_f16_to_float", "tc_float_to_bf16"):
        getattr(lib, name).argtypes = [ptr, ptr, ctypes.c_longlong]
    return lib


# ------------------------------------------------------------------------------------------ 1. host code


@pytest.mark.parametrize("version", tc.TRT_SETS)
def test_plugin_host_code_compiles_against_tensorrt_headers(version, cuda_includes):
    if tc.gxx() is None:
        pytest.skip("g++ not found")
    include = tc.trt_include(version)
    if include is None:
        pytest.skip(f"TensorRT {version} headers not found under {tc.TRT_HEADERS}")
    sources = sorted(tc.SOURCES.glob("*.cpp"))
    assert {s.name for s in sources} >= {"entry.cpp", "token_plugin.cpp", "tome_plugin.cpp", "prune_plugin.cpp"}
    result = tc.host_compile(["-fsyntax-only", *map(str, sources)], include, *cuda_includes)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("version", tc.TRT_SETS)
def test_version_macros_see_the_intended_header_set(version, cuda_includes, tmp_path):
    """The sources' version switches read the header set under test (not some other NvInfer.h on the path)."""
    if tc.gxx() is None:
        pytest.skip("g++ not found")
    include = tc.trt_include(version)
    if include is None:
        pytest.skip(f"TensorRT {version} headers not found under {tc.TRT_HEADERS}")
    major, minor = (version.split(".") + ["0"])[:2]
    probe = tmp_path / "probe.cpp"
    probe.write_text('#include "token_plugin.h"\n'
                     f"static_assert(NV_TENSORRT_MAJOR == {major}, \"major\");\n"
                     + (f"static_assert(NV_TENSORRT_MINOR == {minor}, \"minor\");\n" if "." in version else "")
                     + "static_assert(TCEXPORT_HAS_BF16 == 1, \"bf16 exists from TensorRT 9\");\n")
    result = tc.host_compile(["-fsyntax-only", str(probe)], include, *cuda_includes)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------- 2. NVRTC and ptxas


@pytest.fixture(scope="session")
def ptx_by_file_arch():
    nvrtc = _need(tc.Nvrtc.find(), "NVRTC (nvidia-cuda-nvrtc-cu12)")
    compiled = {}
    for name in KERNEL_FILES:
        for arch in ARCHS:
            ok, ptx, log = nvrtc.compile(tc.KERNELS / name, [f"--gpu-architecture=compute_{arch[3:]}",
                                                             "-std=c++17", f"-I{tc.KERNELS}", *tc.NVRTC_IEEE])
            compiled[name, arch] = (ok, ptx, log)
    return compiled


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(KERNEL_FILES))
def test_kernels_compile_with_nvrtc_and_assemble_with_ptxas(name, arch, ptx_by_file_arch, tmp_path):
    ok, ptx, log = ptx_by_file_arch[name, arch]
    assert ok, f"NVRTC rejected {name}:\n{log}"
    assert re.search(rf"^\.target {arch}\b", ptx, re.M), "PTX for the wrong target"
    # No fused multiply-add: with the build's IEEE flags the device rounds like the host harness tested below.
    assert "fma.rn.f32" not in ptx
    entries = re.findall(r"\.entry (\w+)\(", ptx)
    for kernel in KERNEL_FILES[name]:  # both kernels, for each of fp32 / fp16 / bf16
        assert sum(kernel in entry for entry in entries) == 3, (kernel, entries)

    assembler = _need(tc.ptxas(), "ptxas (nvidia-cuda-nvcc-cu12)")
    source, cubin = tmp_path / "kernels.ptx", tmp_path / "kernels.cubin"
    source.write_text(ptx)
    result = subprocess.run([str(assembler), f"-arch={arch}", "-v", str(source), "-o", str(cubin)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    assembled = re.findall(rf"Compiling entry function '(\w+)' for '{arch}'", result.stderr)
    assert sorted(assembled) == sorted(entries)


# ------------------------------------------------------------------------ 3. per-row code vs reference


def _ptr(array):
    return None if array is None else array.ctypes.data


def _encode(harness, values: np.ndarray, element: str) -> np.ndarray:
    """float32 values in the kernels' element layout (fp16/bf16 as raw uint16, through the kernels' rounding)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if element == "f32":
        return values
    bits = np.empty(values.shape, np.uint16)
    convert = harness.tc_float_to_f16 if element == "f16" else harness.tc_float_to_bf16
    convert(_ptr(values), _ptr(bits), values.size)
    return bits


def _decode(bits: np.ndarray, element: str) -> np.ndarray:
    if element == "f32":
        return bits
    return bits.view(np.float16 if element == "f16" else ml_dtypes.bfloat16).astype(np.float32)


def _outputs(batch, n_out, c, element):
    dtype = np.float32 if element == "f32" else np.uint16
    fill = np.nan if element == "f32" else 0x7E00  # NaN: a slot the kernel forgot stays visible
    return (np.full((batch, n_out, c), fill, dtype), np.full((batch, n_out), np.nan, np.float32),
            np.full((batch, n_out), np.nan, np.float32))


def run_tome(harness, x, metric, size, mask, r, protected, threads, element="f32"):
    batch, n, c = x.shape
    n_out = n - r
    x_out, size_out, mask_out = _outputs(batch, n_out, c, element)
    x_in, metric_in = _encode(harness, x, element), _encode(harness, metric, element)
    size_in = np.ascontiguousarray(size[..., 0], dtype=np.float32)
    status = harness.tc_tome_host(ELEMENTS[element], batch, n, c, metric.shape[-1], r, protected, threads,
                                  _ptr(x_in), _ptr(metric_in), _ptr(size_in), _ptr(mask), _ptr(x_out),
                                  _ptr(size_out), _ptr(mask_out))
    assert status == 0
    return _decode(x_out, element), size_out, mask_out


def run_prune(harness, x, score, size, mask, k, protected, fuse, keep_order, threads, element="f32"):
    batch, n, c = x.shape
    n_out = protected + k + int(fuse)
    x_out, size_out, mask_out = _outputs(batch, n_out, c, element)
    x_in, score_in = _encode(harness, x, element), _encode(harness, score, element)
    size_in = np.ascontiguousarray(size[..., 0], dtype=np.float32)
    status = harness.tc_prune_host(ELEMENTS[element], batch, n, c, k, protected, int(fuse), int(keep_order),
                                   threads, _ptr(x_in), _ptr(score_in), _ptr(size_in), _ptr(mask), _ptr(x_out),
                                   _ptr(size_out), _ptr(mask_out))
    assert status == 0
    return _decode(x_out, element), size_out, mask_out


def tome_inputs(rng, batch, n, c, ck, with_mask):
    x = rng.standard_normal((batch, n, c)).astype(np.float32)
    metric = rng.standard_normal((batch, n, ck)).astype(np.float32)
    if n >= 6:  # ties: a duplicated B row (equal scores for every A token) and a duplicated A row
        metric[:, 5] = metric[:, 3]
        metric[:, 4] = metric[:, 2]
    if n >= 8:
        metric[:, 7] = 0.0  # an all-zero row: the clamped norm gives zero scores, not NaN
    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    mask = None
    if with_mask:
        mask = (rng.random((batch, n)) < 0.6).astype(np.float32)
        mask[:, -max(1, n // 3):] = 0.0  # padding at the end, as a tokenizer pads
        mask[:, 0] = 1.0
    return x, metric, size, mask


def assert_same(got, ref, context):
    x_out, size_out, mask_out = got
    assert x_out.shape == tuple(ref.x.shape), context
    np.testing.assert_array_equal(size_out, ref.size.numpy()[..., 0], err_msg=f"sizes {context}")
    np.testing.assert_allclose(x_out, ref.x.numpy(), rtol=0, atol=1e-5, err_msg=f"x {context}")
    if ref.mask is None:
        np.testing.assert_array_equal(mask_out, np.ones_like(mask_out), err_msg=f"mask without input {context}")
    else:
        np.testing.assert_array_equal(mask_out, ref.mask.numpy(), err_msg=f"mask {context}")


def _t(array):
    return None if array is None else torch.from_numpy(array)


@pytest.mark.parametrize("n", [7, 8, 13, 24])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_tome_rows_equal_reference(harness, n, protected):
    rng = np.random.default_rng(1000 * n + protected)
    cap = (n - protected) // 2
    for r in sorted({0, 1, cap // 2, cap}):
        for batch in (1, 3):
            for with_mask in (False, True):
                c, ck = (6, 4) if n < 20 else (48, 32)
                x, metric, size, mask = tome_inputs(rng, batch, n, c, ck, with_mask)
                ref = ToMe(r=r).reference(_t(x), _t(metric), _t(size), _t(mask), protected)
                for threads in THREADS:
                    got = run_tome(harness, x, metric, size, mask, r, protected, threads)
                    assert_same(got, ref, dict(n=n, p=protected, r=r, batch=batch, mask=with_mask, threads=threads))


def test_tome_rows_break_ties_like_the_reference(harness):
    """Every metric row equal: all scores tie, so only the tie rules decide (first argmax, lower A index)."""
    n, protected, r = 11, 1, 4
    x = np.random.default_rng(3).standard_normal((2, n, 5)).astype(np.float32)
    metric = np.ones((2, n, 4), np.float32)
    size = np.ones((2, n, 1), np.float32)
    ref = ToMe(r=r).reference(_t(x), _t(metric), _t(size), None, protected)
    got = run_tome(harness, x, metric, size, None, r, protected, 7)
    assert_same(got, ref, "all ties")
    # The tie rule really decides something: with the B tokens reversed the merged pairs change.
    reverse = ToMe(r=r).reference(_t(x[:, ::-1].copy()), _t(metric), _t(size), None, protected)
    assert not torch.equal(reverse.x, ref.x)


@pytest.mark.parametrize("n", [6, 9, 16])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_prune_rows_equal_reference(harness, n, protected):
    rng = np.random.default_rng(2000 * n + protected)
    m = n - protected
    for k in sorted({1, m // 2, m - 1}):
        for fuse in (False, True):
            for keep_order in (False, True):
                for batch, with_mask in ((1, False), (3, True), (3, False)):
                    x = rng.standard_normal((batch, n, 5)).astype(np.float32)
                    score = rng.random((batch, n)).astype(np.float32)
                    score[:, -3:] = score[:, protected:protected + 1]  # ties with an earlier token
                    score[0] = np.round(score[0] * 2) / 2  # many equal scores in row 0
                    if batch > 1:
                        score[1, protected:] = 0.0  # every score zero: the fused token is the plain mean
                    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
                    mask = (rng.random((batch, n)) < 0.7).astype(np.float32) if with_mask else None
                    method = TopK(keep_count=k, fuse=fuse, keep_order=keep_order)
                    ref = method.reference(_t(x), None, _t(size), _t(mask), protected, {"cls_attention": _t(score)})
                    for threads in THREADS:
                        got = run_prune(harness, x, score, size, mask, k, protected, fuse, keep_order, threads)
                        assert_same(got, ref, dict(n=n, p=protected, k=k, fuse=fuse, keep_order=keep_order,
                                                   batch=batch, mask=with_mask, threads=threads))


@pytest.mark.parametrize("element", ["f16", "bf16"])
def test_low_precision_io_decides_in_fp32(harness, element):
    """fp16/bf16 I/O: the same decisions as the fp32 reference on the same (rounded) inputs; x rounded once."""
    rng = np.random.default_rng(7)
    low = np.float16 if element == "f16" else ml_dtypes.bfloat16
    rounded = lambda a: a.astype(low).astype(np.float32)  # noqa: E731
    tol = 1e-2 if element == "bf16" else 2e-3
    x, metric, size, mask = tome_inputs(rng, 3, 13, 16, 8, True)
    x, metric = rounded(x), rounded(metric)
    ref = ToMe(r=5).reference(_t(x), _t(metric), _t(size), _t(mask), 1)
    x_out, size_out, mask_out = run_tome(harness, x, metric, size, mask, 5, 1, 7, element)
    np.testing.assert_array_equal(size_out, ref.size.numpy()[..., 0])
    np.testing.assert_array_equal(mask_out, ref.mask.numpy())
    np.testing.assert_allclose(x_out, ref.x.numpy(), rtol=tol, atol=tol)

    score = rounded(rng.random((3, 13)).astype(np.float32))
    ref = TopK(keep_count=6, fuse=True).reference(_t(x), None, _t(size), None, 1, {"cls_attention": _t(score)})
    x_out, size_out, mask_out = run_prune(harness, x, score, size, None, 6, 1, True, False, 7, element)
    np.testing.assert_array_equal(size_out, ref.size.numpy()[..., 0])
    np.testing.assert_array_equal(x_out[:, :7], ref.x.numpy()[:, :7])  # kept tokens are copied bit for bit
    np.testing.assert_allclose(x_out, ref.x.numpy(), rtol=tol, atol=tol)


def test_kernel_float_conversions_match_numpy(harness):
    """The kernels' software fp16/bf16 rounding (host side) is IEEE round-to-nearest-even, like NumPy's."""
    rng = np.random.default_rng(11)
    values = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 20000),
        np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.996, 65520, 1e-8, 2.0 ** -25, 2.0 ** -24 * 1.5,
                  2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11), 3.4e38], np.float32),
        # exact halfway cases for fp16 (ties to even) and bf16
        (np.arange(1, 2000, dtype=np.float32) * 2 + 1) * np.float32(2.0 ** -11),
        (np.arange(1, 2000, dtype=np.float32) * 2 + 1) * np.float32(2.0 ** -8),
    ]).astype(np.float32)
    half = np.empty(values.shape, np.uint16)
    harness.tc_float_to_f16(_ptr(values), _ptr(half), values.size)
    with np.errstate(over="ignore"):  # values beyond fp16's range become inf, as intended
        np.testing.assert_array_equal(half, values.astype(np.float16).view(np.uint16))
    brain = np.empty(values.shape, np.uint16)
    harness.tc_float_to_bf16(_ptr(values), _ptr(brain), values.size)
    np.testing.assert_array_equal(brain, values.astype(ml_dtypes.bfloat16).view(np.uint16))

    every_half = np.arange(65536, dtype=np.uint16)
    back = np.empty(every_half.shape, np.float32)
    harness.tc_f16_to_float(_ptr(every_half), _ptr(back), every_half.size)
    expected = every_half.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(back), nan)
    np.testing.assert_array_equal(back[~nan], expected[~nan])


# ------------------------------------------------------------------ 4. the plugins behind TensorRT's interfaces


@pytest.mark.slow
def test_cmake_builds_the_plugin_library_with_nvcc(tmp_path, cuda_includes):
    """Where a CUDA toolkit exists (never in CI; some development machines), the user's build works end to end:
    CMake + nvcc against the TensorRT headers that match the toolkit, exporting exactly the two entry points."""
    nvcc, cmake = tc.nvcc(), shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip("nvcc or cmake not found (no PyPI package ships nvcc)")
    major = tc.nvcc_major(nvcc)
    version = "11" if major >= 13 else "10.13"  # TensorRT 11 is built for CUDA 13, 10.x for CUDA 12
    include = tc.trt_include(version)
    if include is None:
        pytest.skip(f"TensorRT {version} headers not found under {tc.TRT_HEADERS}")
    build = tmp_path / "build"
    configure = subprocess.run([cmake, "-S", str(tc.PLUGINS), "-B", str(build), f"-DTENSORRT_ROOT={include.parent}",
                                f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=87"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run([cmake, "--build", str(build), "-j2"], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    library = build / "libtcexport_plugins.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in symbols.stdout.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == {"getCreators", "setLoggerFinder"}


# Built against 10.3 (JetPack 6) by default; the 10.13 and 11 builds, another full compile each, run with the
# slow tests.
@pytest.fixture(scope="session", params=[pytest.param(v, marks=[] if v == "10.3" else [pytest.mark.slow])
                                         for v in tc.TRT_SETS])
def probe(request, tmp_path_factory, cuda_includes):
    if tc.gxx() is None:
        pytest.skip("g++ not found")
    if tc.cudart_dir() is None:
        pytest.skip(f"libcudart.so.12 not found ({tc.INSTALL_HINT})")
    trt = tc.trt_include(request.param)
    if trt is None:
        pytest.skip(f"TensorRT {request.param} headers not found under {tc.TRT_HEADERS}")
    return tc.build_probe(tmp_path_factory.mktemp(f"probe{request.param}"), trt, cuda_includes)


@pytest.fixture(scope="session")
def probe_api(probe):
    result = subprocess.run([str(probe), "api"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        answers.setdefault(key, []).append(value)
    return answers, result.stderr


def test_creators_declare_the_contract(probe_api):
    answers, _ = probe_api
    assert answers["creators"] == ["2"]
    assert sorted(answers["creator"]) == [
        "ToMeMerge tcexport 1 PLUGIN CREATOR_V3ONE r:i32 protected:i32",
        "TokenPrune tcexport 1 PLUGIN CREATOR_V3ONE k:i32 protected:i32 fuse:i32 keep_order:i32",
    ]
    # The same fields, in the same order, as the plugin table the graph side and the lint read.
    from tcexport.methods import registry
    from tcexport.methods.plugin import PLUGIN_DOMAIN

    for line in answers["creator"]:
        name, namespace, version = line.split()[:3]
        spec = registry.plugin_spec(name)
        assert spec.cpp and (namespace, version) == (PLUGIN_DOMAIN, spec.version)
        assert tuple(field.split(":")[0] for field in line.split()[5:]) == spec.fields
    assert answers["tome.kinds"] == ["PLUGIN_V3ONE_CORE PLUGIN_V3ONE_BUILD PLUGIN_V3ONE_RUNTIME"]
    assert answers["prune.core"] == ["TokenPrune tcexport 1"]
    assert answers["tome.outputs"] == ["3"]


def test_output_shapes_follow_the_fields(probe_api):
    answers, stderr = probe_api
    # ToMeMerge r=3, protected=1 on N=13; TokenPrune k=4, protected=1, fuse=1 -> 6 tokens; batch stays symbolic.
    assert answers["tome.shapes"] == ["0 Bx10x6 Bx10x1 Bx10"]
    assert answers["tome.shapes_nomask"] == ["0 Bx10x6 Bx10x1 Bx10"]
    assert answers["prune.shapes"] == ["0 Bx6x5 Bx6x1 Bx6"]
    assert answers["fields.prune_clone_shapes"] == ["0 Bx6x5 Bx6x1 Bx6"]
    assert answers["tome.shapes_cap"] == ["0 Bx7x6 Bx7x1 Bx7"]  # r = (13 - 1) // 2 is allowed
    for refused in ("tome.shapes_over", "tome.shapes_dynamic_n", "tome.shapes_bad_rank", "prune.shapes_keep_all"):
        assert answers[refused] == ["-1"], refused
    assert "r=7 must be in [0, (N - protected) // 2 = 6]" in stderr
    assert "the token count N must be static" in stderr
    assert answers["configure.tome"] == ["0 -1"]


def test_types_and_formats(probe_api):
    answers, _ = probe_api
    assert answers["tome.types"] == ["0 1 0 0"]  # x fp16 in -> x fp16 out; size and mask fp32 (kFLOAT = 0)
    for element in ("f32", "f16", "bf16"):
        assert answers[f"formats.{element}"] == ["1111111"], element
    # x fp16 with an fp32 metric, fp16 size, fp32 x out, fp16 size out: only x, mask and mask out accepted.
    assert answers["formats.mixed"] == ["1001001"]
    assert answers["formats.int"][0].startswith("0")  # int32 x refused
    assert answers["formats.chw4"] == ["000000"]  # LINEAR only


def test_fields_serialize_clone_and_validate(probe_api):
    answers, stderr = probe_api
    assert answers["fields.tome"] == ["r=3,protected=1"]
    assert answers["fields.prune"] == ["k=4,protected=1,fuse=1,keep_order=1"]
    assert answers["fields.prune_clone"] == ["k=4,protected=1,fuse=1,keep_order=1"]
    assert answers["fields.tome_restored"] == ["r=3,protected=1"]
    assert answers["create.tome_default_protected"] == ["r=2,protected=0"]
    for refused in ("tome_missing_r", "tome_int64_r", "tome_unknown", "prune_missing_k", "prune_fuse_2"):
        assert answers[f"create.{refused}"] == ["null"], refused
    assert "field r must be one INT32 (an ONNX INT attribute)" in stderr
    small, large = map(int, answers["workspace.tome"][0].split())
    assert small > 0 and large == 8 * small  # scratch per batch row, for the profile's largest batch


def _probe_run(probe, directory, mode, args, arrays):
    for name, array in arrays.items():
        if array is not None:
            np.ascontiguousarray(array, dtype=np.float32).tofile(directory / f"{name}.bin")
    result = subprocess.run([str(probe), mode, str(directory), *map(str, args)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("enqueue 0 ")
    return [np.fromfile(directory / f"out_{name}.bin", np.float32) for name in ("x", "size", "mask")]


@pytest.mark.parametrize("with_mask", [False, True])
def test_tome_enqueue_equals_reference(probe, tmp_path, with_mask):
    b, n, c, ck, r, p = 3, 13, 6, 4, 4, 1
    x, metric, size, mask = tome_inputs(np.random.default_rng(21), b, n, c, ck, with_mask)
    ref = ToMe(r=r).reference(_t(x), _t(metric), _t(size), _t(mask), p)
    x_out, size_out, mask_out = _probe_run(probe, tmp_path, "tome", [b, n, c, ck, r, p, int(with_mask)],
                                           {"x": x, "decision": metric, "size": size, "mask": mask})
    assert_same((x_out.reshape(b, n - r, c), size_out.reshape(b, n - r), mask_out.reshape(b, n - r)), ref, "enqueue")


@pytest.mark.parametrize("fuse, keep_order, with_mask", [(True, True, True), (False, False, False), (True, False, False)])
def test_prune_enqueue_equals_reference(probe, tmp_path, fuse, keep_order, with_mask):
    b, n, c, k, p = 3, 11, 5, 4, 1
    rng = np.random.default_rng(22)
    x = rng.standard_normal((b, n, c)).astype(np.float32)
    score = rng.random((b, n)).astype(np.float32)
    score[:, -2:] = score[:, 2:3]  # ties
    size = rng.integers(1, 5, (b, n, 1)).astype(np.float32)
    mask = (rng.random((b, n)) < 0.7).astype(np.float32) if with_mask else None
    ref = TopK(keep_count=k, fuse=fuse, keep_order=keep_order).reference(
        _t(x), None, _t(size), _t(mask), p, {"cls_attention": _t(score)})
    n_out = p + k + int(fuse)
    x_out, size_out, mask_out = _probe_run(probe, tmp_path, "prune", [b, n, c, k, p, int(fuse), int(keep_order),
                                                                      int(with_mask)],
                                           {"x": x, "decision": score, "size": size, "mask": mask})
    assert_same((x_out.reshape(b, n_out, c), size_out.reshape(b, n_out), mask_out.reshape(b, n_out)), ref, "enqueue")


# --------------------------------------------------------------------- 5. on a GPU: kernels == host harness


@pytest.fixture(scope="session")
def gpu_harness(tmp_path_factory, harness):
    nvcc = tc.nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no PyPI package ships nvcc)")
    lib = ctypes.CDLL(str(tc.build_gpu_harness(tmp_path_factory.mktemp("gpu"), nvcc)))
    ptr = ctypes.c_void_p
    lib.tc_tome_gpu.argtypes = [ctypes.c_int] * 8 + [ptr] * 7
    lib.tc_prune_gpu.argtypes = [ctypes.c_int] * 9 + [ptr] * 7
    lib.tc_tome_gpu_timed.argtypes = [ctypes.c_int] * 7 + [ptr] * 7 + [ctypes.c_int, ptr]
    lib.tc_prune_gpu_timed.argtypes = [ctypes.c_int] * 8 + [ptr] * 7 + [ctypes.c_int, ptr]
    return lib


@pytest.mark.slow
def test_gpu_harness_builds_with_nvcc(gpu_harness):
    assert gpu_harness.tc_gpu_devices() >= 0  # the launchers, kernels and C ABI compile and link


class _GpuAsHost:
    """The GPU library behind the host harness's names, so run_tome / run_prune drive either."""

    def __init__(self, gpu, host):
        self.tc_tome_host, self.tc_prune_host = gpu.tc_tome_gpu, gpu.tc_prune_gpu
        self.tc_float_to_f16, self.tc_float_to_bf16 = host.tc_float_to_f16, host.tc_float_to_bf16


def _same_bits(a, b):
    return np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("element", ["f32", "f16", "bf16"])
def test_gpu_kernels_equal_host_harness_bit_for_bit(request, harness, element):
    if not torch.cuda.is_available():  # checked before building: nvcc may exist without a GPU
        pytest.skip("no CUDA GPU")
    gpu_harness = request.getfixturevalue("gpu_harness")
    assert gpu_harness.tc_gpu_devices() >= 1
    device = _GpuAsHost(gpu_harness, harness)
    rng = np.random.default_rng(31)
    for n, c, ck, batch in ((13, 6, 4, 3), (197, 64, 64, 4), (128, 32, 32, 2)):
        for protected in (0, 1, 2):
            for with_mask in (False, True):
                x, metric, size, mask = tome_inputs(rng, batch, n, c, ck, with_mask)
                for r in (0, 1, (n - protected) // 2):
                    host = run_tome(harness, x, metric, size, mask, r, protected, 128, element)
                    gpu = run_tome(device, x, metric, size, mask, r, protected, 128, element)
                    for h, g in zip(host, gpu):
                        assert _same_bits(h, g), dict(n=n, p=protected, r=r, mask=with_mask)
                score = rng.random((batch, n)).astype(np.float32)
                score[:, -3:] = score[:, protected:protected + 1]
                for k in (1, (n - protected) // 2):
                    for fuse, keep_order in ((False, False), (True, True)):
                        host = run_prune(harness, x, score, size, mask, k, protected, fuse, keep_order, 128, element)
                        gpu = run_prune(device, x, score, size, mask, k, protected, fuse, keep_order, 128, element)
                        for h, g in zip(host, gpu):
                            assert _same_bits(h, g), dict(n=n, p=protected, k=k, fuse=fuse, mask=with_mask)


@pytest.mark.gpu
def test_gpu_kernel_time_vs_torch_reference(request, harness):
    """ViT-B/16 shapes (N=197, C=768, keys 64, r=16 / keep 70 %): one plugin call (both kernels) timed with CUDA
    events next to the PyTorch reference on the same GPU, printed for the benchmark notes (`-s` shows it)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu = request.getfixturevalue("gpu_harness")
    rng = np.random.default_rng(41)
    n, c, ck, r, k, protected, iterations = 197, 768, 64, 16, 137, 1, 50
    for batch in (1, 8, 64):
        x, metric, size, _ = tome_inputs(rng, batch, n, c, ck, False)
        score = rng.random((batch, n)).astype(np.float32)
        x_out, size_out, mask_out = _outputs(batch, n - r, c, "f32")
        us = ctypes.c_float()
        assert gpu.tc_tome_gpu_timed(0, batch, n, c, ck, r, protected, _ptr(x), _ptr(metric),
                                     _ptr(np.ascontiguousarray(size[..., 0])), None, _ptr(x_out), _ptr(size_out),
                                     _ptr(mask_out), iterations, ctypes.byref(us)) == 0
        tome_us = us.value
        px_out, psize_out, pmask_out = _outputs(batch, protected + k + 1, c, "f32")
        assert gpu.tc_prune_gpu_timed(0, batch, n, c, k, protected, 1, 0, _ptr(x), _ptr(score),
                                      _ptr(np.ascontiguousarray(size[..., 0])), None, _ptr(px_out), _ptr(psize_out),
                                      _ptr(pmask_out), iterations, ctypes.byref(us)) == 0
        prune_us = us.value
        assert 0 < tome_us < 1e6 and 0 < prune_us < 1e6

        tx, tm, ts = (torch.from_numpy(a).cuda() for a in (x, metric, size))
        tscore = torch.from_numpy(score).cuda()
        ref_tome = ToMe(r=r)
        ref_prune = TopK(keep_count=k, fuse=True)
        timings = {}
        for label, call in (("tome", lambda: ref_tome.reference(tx, tm, ts, None, protected)),
                            ("topk", lambda: ref_prune.reference(tx, None, ts, None, protected,
                                                                 {"cls_attention": tscore}))):
            call()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                call()
            stop.record()
            torch.cuda.synchronize()
            timings[label] = start.elapsed_time(stop) * 1000 / iterations
        host = run_tome(harness, x, metric, size, None, r, protected, 128)
        assert _same_bits(x_out, host[0]) and _same_bits(size_out, host[1])  # timed launches did not disturb it
        print(f"batch {batch}: ToMeMerge plugin {tome_us:.1f} us vs torch reference {timings['tome']:.1f} us; "
              f"TokenPrune plugin {prune_us:.1f} us vs torch reference {timings['topk']:.1f} us")


# ------------------------------------------- 6. the contract end to end: the plugins vs the function bodies


def _call_node_tensors(model_path, feeds):
    """Every tcexport call node of the model with its attributes, input and output values (ONNX Runtime runs
    the model-local function bodies: what TensorRT inlines when no plugin is registered)."""
    import onnxruntime as ort

    model = onnx.load(model_path)
    calls = [node for node in model.graph.node if node.domain == "tcexport"]
    names = sorted({name for node in calls for name in [*node.input, *node.output]})
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for node in calls:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        yield node, attributes, [values[name] for name in node.input], [values[name] for name in node.output]


@pytest.mark.slow  # exports and compresses a tiny BERT: about a minute on 2 shared cores
@pytest.mark.parametrize("method_args", [["--method", "tome", "--r", "5"],
                                         ["--method", "topk", "--keep", "0.5", "--fuse", "--keep-order"]])
def test_plugins_compute_what_the_function_bodies_compute(harness, bert_onnx, tmp_path, method_args):
    """A text model with padding: each --impl function call node's own attributes and input tensors, given to
    the plugins' per-row code, give the call's outputs (the contract's fields, input order and mask handling)."""
    compressed = tmp_path / "bert_fn.onnx"
    result = run_cli("compress", bert_onnx, *method_args, "--impl", "function", "-o", compressed)
    assert result.returncode == 0, result.stderr
    rng = np.random.default_rng(5)
    input_ids = rng.integers(1, 100, (3, 24)).astype(np.int64)
    attention_mask = np.ones((3, 24), np.int64)
    attention_mask[1, 15:] = 0
    attention_mask[2, 7:] = 0
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    feeds = {name: feeds.get(name, np.zeros_like(input_ids)) for name in
             [i.name for i in onnx.load(compressed).graph.input]}
    seen = 0
    for node, fields, inputs, outputs in _call_node_tensors(compressed, feeds):
        assert fields["plugin_namespace"] == b"tcexport" and fields["plugin_version"] == b"1"
        x, decision, size = inputs[:3]
        mask = inputs[3] if len(inputs) == 4 else None
        assert mask is not None  # the text model's padding reaches the plugin
        if node.op_type == "ToMeMerge":
            got = run_tome(harness, x, decision, size, mask, fields["r"], fields["protected"], 7)
        else:
            assert node.op_type == "TokenPrune"
            got = run_prune(harness, x, decision, size, mask, fields["k"], fields["protected"], fields["fuse"],
                            fields["keep_order"], 7)
        np.testing.assert_array_equal(got[1], outputs[1][..., 0], err_msg=node.name)
        np.testing.assert_array_equal(got[2], outputs[2], err_msg=node.name)
        np.testing.assert_allclose(got[0], outputs[0], rtol=0, atol=1e-5, err_msg=node.name)
        seen += 1
    assert seen >= 2
