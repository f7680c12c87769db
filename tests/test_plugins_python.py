"""The Triton kernels behind tcexport's Python TensorRT plugins, checked on the CPU.

1. Under TRITON_INTERPRET=1 the kernels equal the methods' PyTorch references (ToMe.reference, TopK.reference)
   on random inputs with many exact ties, N odd and even, several C, r/K, protected 0/1/2, batch 1 and 3, with
   and without a mask. Sizes are small integers, so every size sum is exact: equal sizes mean equal decisions.
2. They compile ahead of time (triton.compile for GPUTarget cuda 87 and 90, no GPU needed) to PTX ISA 8.0.

The interpreter is chosen when a kernel is defined, so this module sets TRITON_INTERPRET=1 before importing the
kernels, and reloads them if another module imported them first; the AOT checks run in a subprocess without it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

from tcexport.methods.tome import ToMe, effective_r  # noqa: E402
from tcexport.methods.topk import TopK  # noqa: E402
from tcexport.plugins import kernels  # noqa: E402

if not type(kernels.tome_merge_kernel).__name__.startswith("Interpreted"):
    kernels = importlib.reload(kernels)


def _state(batch: int, n: int, c: int, seed: int, masked: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()  # integer sizes: exact sums
    mask = None
    if masked:  # a different amount of padding per row, at least one real token after the protected ones
        lengths = torch.randint(max(3, n // 2), n + 1, (batch,), generator=g)
        mask = (torch.arange(n)[None, :] < lengths[:, None]).float()
    return g, x, size, mask


def _tied_metric(g, batch: int, n: int, ck: int) -> torch.Tensor:
    """Entries from {0, 1}: many tokens share a metric row, so scores tie exactly (argmax and ranking)."""
    return torch.randint(0, 2, (batch, n, ck), generator=g).float()


def _assert_same(actual, expected) -> None:
    x, size, mask = actual
    ex, esize, emask = expected
    assert x.shape == ex.shape and size.shape == esize.shape
    assert torch.equal(size, esize), "different sizes: the kernel merged or kept other tokens"
    torch.testing.assert_close(x, ex, rtol=1e-5, atol=1e-5)
    if emask is None:
        assert mask is None
    else:
        assert torch.equal(mask, emask)


TOME_CASES = [  # batch, N, C, Ck, r, protected, mask
    (1, 17, 8, 4, 3, 1, False),
    (3, 16, 40, 8, 5, 2, True),
    (3, 11, 3, 5, 5, 0, True),  # r at the cap (N - protected) // 2
    (1, 20, 70, 3, 9, 2, False),  # C > the channel tile: two channel steps
    (3, 33, 16, 6, 1, 1, True),
    (1, 9, 5, 2, 4, 1, False),
]


@pytest.mark.parametrize("tied", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("case", TOME_CASES, ids=[f"B{c[0]}-N{c[1]}-C{c[2]}-r{c[4]}-p{c[5]}-m{int(c[6])}"
                                                  for c in TOME_CASES])
def test_tome_kernel_equals_reference(case, tied):
    batch, n, c, ck, r, protected, masked = case
    g, x, size, mask = _state(batch, n, c, seed=n * 7 + r, masked=masked)
    metric = _tied_metric(g, batch, n, ck) if tied else torch.randn(batch, n, ck, generator=g)
    r = effective_r(r, n, protected)
    expected = ToMe(r=r).reference(x, metric, size, mask, protected)
    _assert_same(kernels.tome_merge(x, metric, size, mask, r, protected), expected)


def test_tome_kernel_r0_is_the_identity():
    _, x, size, mask = _state(2, 12, 6, seed=1, masked=True)
    x_out, size_out, mask_out = kernels.tome_merge(x, torch.randn(2, 12, 4), size, mask, 0, 1)
    assert torch.equal(x_out, x) and torch.equal(size_out, size) and torch.equal(mask_out, mask)


def test_tome_kernel_keeps_fp16_io_and_fp32_decisions():
    g, x, size, _ = _state(3, 15, 24, seed=4, masked=False)
    metric = _tied_metric(g, 3, 15, 4)
    expected = ToMe(r=5).reference(x.half().float(), metric.half().float(), size, None, 1)
    x_out, size_out, _ = kernels.tome_merge(x.half(), metric.half(), size, None, 5, 1)
    assert x_out.dtype == torch.float16 and size_out.dtype == torch.float32
    assert torch.equal(size_out, expected.size)
    torch.testing.assert_close(x_out.float(), expected.x, rtol=2e-3, atol=2e-3)


PRUNE_CASES = [  # batch, N, C, K, protected, fuse, keep_order, mask
    (1, 17, 8, 5, 1, False, False, False),
    (3, 16, 40, 6, 2, True, True, True),
    (3, 12, 3, 4, 0, True, False, True),
    (1, 21, 70, 19, 1, True, True, False),  # one dropped token fused
    (3, 10, 16, 1, 1, False, True, True),
    (1, 30, 5, 10, 2, False, False, True),
]


@pytest.mark.parametrize("tied", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("case", PRUNE_CASES, ids=[f"B{c[0]}-N{c[1]}-C{c[2]}-k{c[3]}-p{c[4]}-f{int(c[5])}"
                                                   f"o{int(c[6])}-m{int(c[7])}" for c in PRUNE_CASES])
def test_prune_kernel_equals_reference(case, tied):
    batch, n, c, k, protected, fuse, keep_order, masked = case
    g, x, size, mask = _state(batch, n, c, seed=n * 5 + k, masked=masked)
    if tied:  # a few distinct values, zeros among them (padding scores exactly 0)
        score = torch.randint(0, 3, (batch, n), generator=g).float() / 4
    else:
        score = torch.softmax(torch.randn(batch, n, generator=g), dim=-1)
    if mask is not None:
        score = score * mask
    method = TopK(keep_count=k, fuse=fuse, keep_order=keep_order)
    assert method.kept(n, protected) == k < n - protected
    expected = method.reference(x, None, size, mask, protected, {"cls_attention": score})
    _assert_same(kernels.token_prune(x, score, size, mask, k, protected, fuse, keep_order), expected)


def test_prune_kernel_fuses_all_zero_scores_uniformly():
    _, x, size, _ = _state(1, 9, 4, seed=2, masked=False)
    score = torch.zeros(1, 9)
    score[0, 1:4] = torch.tensor([0.5, 0.3, 0.2])
    expected = TopK(keep_count=3, fuse=True).reference(x, None, size, None, 1, {"cls_attention": score})
    actual = kernels.token_prune(x, score, size, None, 3, 1, True, False)
    _assert_same(actual, expected)
    torch.testing.assert_close(actual[0][0, -1], x[0, 4:].mean(dim=0))  # the dropped scores sum to 0


# ---------------------------------------------------------------- ahead of time, for the GPU


AOT_SCRIPT = textwrap.dedent("""
    import json
    from tcexport.plugins import aot
    found = []
    for cc in aot.TARGETS:
        for kernel in (aot.compile_tome(17, 32, 16, capability=cc),
                       aot.compile_tome(17, 32, 16, capability=cc, has_mask=True, dtype="float16"),
                       aot.compile_prune(17, 32, 1, fuse=True, keep_order=True, capability=cc, dtype="bfloat16")):
            entry = kernel.ptx.split(".entry", 1)[1].split(")", 1)[0]
            found.append({"cc": cc, "name": kernel.name, "header": aot.ptx_header(kernel.ptx),
                          "params": entry.count(".param"), "threads": kernel.threads,
                          "scratch": kernel.global_scratch_bytes})
    print(json.dumps(found))
""")


def test_kernels_compile_ahead_of_time_to_ptx_8_0_for_sm87_and_sm90():
    from tcexport.plugins import aot

    assert aot.PTX_VERSION == 80
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(f["cc"], f["name"]) for f in found] == [(cc, name) for cc in (87, 90) for name in
                                                    ("tome_merge_kernel", "tome_merge_kernel", "token_prune_kernel")]
    for f in found:
        assert f["header"] == {"version": "8.0", "target": "sm_87" if f["cc"] == 87 else "sm_90a"}
        assert f["threads"] == 128 and f["scratch"] == 0  # no global scratch: TensorRT passes none
    # declared parameters: inputs, fields, outputs (+2 scratch pointers Triton appends); None masks are constexpr
    params = [f["params"] for f in found[:3]]
    assert params == [3 + 5 + 2 + 2, 4 + 5 + 3 + 2, 3 + 4 + 2 + 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs its checks instead of skipping")
def test_gpu_check_script_skips_cleanly_without_a_gpu(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIP part 1: torch has no CUDA device" in done.stdout and "SKIP part 2: no CUDA device" in done.stdout


# ---------------------------------------------------------------- the tensorrt.plugin registrations, on a fake

FAKE_TRTP_SCRIPT = textwrap.dedent('''
    import json, sys
    from tests.fake_trtp import Desc, make_modules

    modules, registry = make_modules()
    sys.modules.update(modules)

    from tcexport.plugins import python as plugins
    plugins._capability = lambda: 87
    found = {"registered": {k: sorted(v) for k, v in registry.items()}}
    x, metric, size = Desc(33, 48), Desc(33, 16), Desc(33, 1)
    found["tome_desc"] = registry["tcexport::ToMeMerge"]["register"](x, metric, size, 7, 1)
    name, ptx, launch, extra = registry["tcexport::ToMeMerge"]["aot_impl"](x, metric, size, 7, 1, (), 0)
    found["tome_aot"] = {"name": name, "version": ptx.split(".version", 1)[1].split()[0], "grid": repr(launch.grid_x),
                         "block": launch.block_x, "extra": list(extra),
                         "params": ptx.split(".entry", 1)[1].split(")", 1)[0].count(".param")}
    score = Desc(33)
    found["prune_desc"] = registry["tcexport::TokenPrune"]["register"](Desc(33, 48, dtype="HALF"), score, size,
                                                                      10, 2, 1, 0)
    name, ptx, launch, extra = registry["tcexport::TokenPrune"]["aot_impl"](Desc(33, 48, dtype="HALF"), score, size,
                                                                           10, 2, 1, 0, (), 0)
    found["prune_aot"] = {"name": name, "extra": list(extra), "f16": ".f16" in ptx or "b16" in ptx}
    print(json.dumps(found))
''')


def test_python_plugins_register_and_compile_on_a_fake_tensorrt_plugin_module():
    """tcexport/plugins/python.py against a stand-in for tensorrt.plugin: what it registers, the output shapes it
    declares, and what aot_impl returns (real PTX from triton.compile; extra args in the kernel's scalar order)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", FAKE_TRTP_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    both = ["aot_impl", "impl", "register"]
    assert found["registered"] == {"tcexport::ToMeMerge": both, "tcexport::TokenPrune": both}
    assert found["tome_desc"] == [[["batch", "26", "48"], "FLOAT"], [["batch", "26", "1"], "FLOAT"]]  # N - r
    assert found["tome_aot"] == {"name": "tome_merge_kernel", "version": "8.0", "grid": "batch", "block": 128,
                                 "extra": [33, 48, 16, 7, 1], "params": 3 + 5 + 2 + 2}
    assert found["prune_desc"] == [[["batch", "13", "48"], "HALF"], [["batch", "13", "1"], "FLOAT"]]  # 2 + 10 + 1
    assert found["prune_aot"] == {"name": "token_prune_kernel", "extra": [33, 48, 10, 2], "f16": True}


def test_python_plugins_jit_impl_writes_the_outputs_it_is_given(monkeypatch):
    """impl (JIT) on a fake tensorrt.plugin: the kernels run (interpreter, CPU) into TensorRT's output buffers."""
    import contextlib

    from tests.fake_trtp import make_modules

    modules, registry = make_modules()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    # Imported afresh against the fake, and gone again afterwards (monkeypatch undoes both).
    import tcexport.plugins

    monkeypatch.delitem(sys.modules, "tcexport.plugins.python", raising=False)
    monkeypatch.setattr(tcexport.plugins, "python", None, raising=False)
    plugins = importlib.import_module("tcexport.plugins.python")
    monkeypatch.setattr(plugins, "kernels", kernels)  # the interpreted kernels of this module
    monkeypatch.setattr(plugins, "_torch", list)  # CPU tensors stand in for TensorRT's device tensors
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle: handle)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    g, x, size, _ = _state(3, 15, 24, seed=8, masked=False)
    metric = _tied_metric(g, 3, 15, 4)
    outputs = (torch.full((3, 10, 24), float("nan")), torch.full((3, 10, 1), float("nan")))
    registry["tcexport::ToMeMerge"]["impl"](x, metric, size, 5, 2, outputs, 0xC0DA)
    _assert_same((*outputs, None), ToMe(r=5).reference(x, metric, size, None, 2))

    score = torch.randint(0, 3, (3, 15), generator=g).float() / 4
    outputs = (torch.full((3, 9, 24), float("nan")), torch.full((3, 9, 1), float("nan")))
    registry["tcexport::TokenPrune"]["impl"](x, score, size, 7, 1, 1, 1, outputs, 0xC0DA)
    method = TopK(keep_count=7, fuse=True, keep_order=True)
    expected = method.reference(x, None, size, None, 1, {"cls_attention": score})
    _assert_same((*outputs, None), expected)
