"""tcexport.bench: statistics, interleaving, real runs on tiny ONNX models, outputs, and the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tcexport.bench import report, session, stats, timing
from tcexport.core.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_matmul_model(path: Path, widths: list[int], batch: int | str = "batch") -> Path:
    """x[batch, widths[0]] -> MatMul chain through widths -> y. More/wider MatMuls make a slower model."""
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    current = "x"
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        weight = f"w{i}"
        initializers.append(numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32) * 0.05, weight))
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, weight], [out]))
        current = out
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, widths[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def small_onnx(tmp_path: Path) -> Path:
    return make_matmul_model(tmp_path / "small.onnx", [64, 64])


@pytest.fixture()
def big_onnx(tmp_path: Path) -> Path:
    return make_matmul_model(tmp_path / "big.onnx", [64, 256, 256, 256, 256, 64])


# ---------------------------------------------------------------------------------------------- statistics


def test_latency_stats_match_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 10.0, 2.5, 3.5, 7.0]
    summary = stats.latency_stats(values)
    array = np.asarray(values)
    assert summary["min"] == 1.0 and summary["max"] == 10.0
    assert summary["mean"] == pytest.approx(array.mean())
    assert summary["median"] == pytest.approx(np.median(array))
    for name, q in (("p90", 90), ("p95", 95), ("p99", 99)):
        assert summary[name] == pytest.approx(np.percentile(array, q))
    assert summary["std"] == pytest.approx(array.std())


def test_summarize_and_speedup():
    base_ns = [2_000_000, 2_000_000, 4_000_000]  # median 2 ms, mean 8/3 ms
    fast_ns = [1_000_000, 500_000, 1_000_000]  # median 1 ms
    # The wall-clock the runs held is longer than their latencies (loop overhead between runs): 12 ms for 3 runs.
    entries = [stats.summarize("base", 4, base_ns, 12_000_000), stats.summarize("fast", 4, fast_ns, 3_000_000),
               stats.summarize("base", 1, [3_000_000], 3_000_000), stats.summarize("fast", 1, [6_000_000], 6_000_000)]
    stats.add_speedups(entries)
    base4, fast4, base1, fast1 = entries
    assert base4["latency_ms"]["median"] == pytest.approx(2.0)
    assert base4["throughput_qps"] == pytest.approx(3 / 0.012)  # runs / wall-clock, not 1 / mean latency
    assert base4["throughput_qps"] != pytest.approx(1000 / (8 / 3))
    assert base4["throughput_samples_per_s"] == pytest.approx(4 * 3 / 0.012)
    assert base4["wall_s"] == pytest.approx(0.012)
    assert base4["iters"] == 3
    assert base4["speedup"] == 1.0 and base1["speedup"] == 1.0
    assert fast4["speedup"] == pytest.approx(base4["latency_ms"]["median"] / fast4["latency_ms"]["median"])
    assert fast4["speedup"] == pytest.approx(2.0)
    assert fast1["speedup"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- interleaving


class RecordingRunner:
    def __init__(self, name: str, calls: list[str]):
        self.name = name
        self.calls = calls

    def run(self, feeds):
        self.calls.append(self.name)


def test_round_order_rotates():
    assert [timing.round_order(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_time_interleaved_rotates_and_warms_up():
    calls: list[str] = []
    runners = [RecordingRunner(n, calls) for n in "abc"]
    rounds = []
    latencies = timing.time_interleaved(runners, [{}, {}, {}], warmup=2, iters=4, on_round=rounds.append).latencies_ns
    warm, timed = calls[:6], calls[6:]
    assert sorted(warm) == sorted("aabbcc")
    assert timed == list("abc" "bca" "cab" "abc")
    firsts = [timed[i] for i in range(0, len(timed), 3)]
    assert set(firsts) == {"a", "b", "c"}  # no artifact always goes first
    assert [len(lat) for lat in latencies] == [4, 4, 4]
    assert rounds == [3, 3, 3, 3]


def test_time_interleaved_duration_runs_at_least_three_rounds():
    calls: list[str] = []
    runners = [RecordingRunner(n, calls) for n in "ab"]
    latencies = timing.time_interleaved(runners, [{}, {}], warmup=0, duration=1e-9).latencies_ns
    assert [len(lat) for lat in latencies] == [timing.MIN_ROUNDS_WITH_DURATION] * 2


def test_time_interleaved_default_iters():
    calls: list[str] = []
    latencies = timing.time_interleaved([RecordingRunner("a", calls)], [{}], warmup=0).latencies_ns
    assert len(latencies[0]) == timing.DEFAULT_ITERS


# ---------------------------------------------------------------------------------------------- real runs


def test_run_two_onnx_files(small_onnx, big_onnx):
    results = session.run([small_onnx, big_onnx], batches=[1, 2], warmup=1, iters=5)
    json.dumps(results)  # plain data all the way down
    assert [a["label"] for a in results["artifacts"]] == ["small", "big"]
    assert all(a["backend"] == "ort" and a["provider"] == "cpu" for a in results["artifacts"])
    keys = [(e["artifact"], e["batch"]) for e in results["results"]]
    assert sorted(keys) == sorted((a, b) for a in ("small", "big") for b in (1, 2))
    for entry in results["results"]:
        latency = entry["latency_ms"]
        assert entry["iters"] == 5
        assert latency["min"] > 0
        assert latency["min"] <= latency["median"] <= latency["p99"] <= latency["max"]
        assert entry["throughput_samples_per_s"] == pytest.approx(entry["batch"] * entry["throughput_qps"])
        if entry["artifact"] == "small":
            assert entry["speedup"] == 1.0
    env = results["environment"]
    assert env["onnxruntime_version"] and env["cpu_count"] and env["timestamp"] and "threads" in env


def test_run_with_duration_and_threads(small_onnx):
    results = session.run([small_onnx], batches=[1], threads=1, warmup=0, duration=0.05)
    assert results["results"][0]["iters"] >= timing.MIN_ROUNDS_WITH_DURATION
    assert results["environment"]["threads"] == 1


def test_run_build_dir(small_onnx, tmp_path):
    from tcexport.backends import ort as ort_backend

    build_dir = tmp_path / "b"
    ort_backend.build(small_onnx, build_dir, opt_level="extended")
    results = session.run([small_onnx, build_dir], batches=[1, 3], warmup=1, iters=3)
    built = results["artifacts"][1]
    assert built["label"] == "b" and built["provider"] == "cpu" and built["opt_level"] == "extended"
    assert len(results["results"]) == 4


def test_same_stem_labels_are_made_unique(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = make_matmul_model(tmp_path / "a" / "model.onnx", [64, 64])
    two = make_matmul_model(tmp_path / "b" / "model.onnx", [64, 64])
    results = session.run([one, two, one], batches=[1], warmup=0, iters=2)
    labels = [a["label"] for a in results["artifacts"]]
    assert len(set(labels)) == 3


def test_static_batch_model_at_other_batch(tmp_path):
    static = make_matmul_model(tmp_path / "static.onnx", [64, 64], batch=1)
    assert session.run([static], batches=[1], warmup=0, iters=2)["results"][0]["batch"] == 1
    with pytest.raises(UsageError, match="fixed batch size of 1"):
        session.run([static], batches=[4], warmup=0, iters=2)


def test_progress_off_a_terminal_is_one_line_per_step(small_onnx, capsys, monkeypatch):
    monkeypatch.setenv("TCEXPORT_PROGRESS", "lines")
    results = session.run([small_onnx], batches=[1, 2], warmup=0, iters=300)
    assert results["results"][0]["iters"] == 300
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines  # open, then one per batch size: no bar redraws in a log
    assert lines[0].startswith("open 1 artifact") and lines[1].startswith("time 1 artifact at batch 1")
    assert all(line.endswith(" s)") and "\x1b" not in line for line in lines)  # elapsed time, no control codes


def test_library_calls_are_quiet_by_default(small_onnx, capsys, monkeypatch):
    monkeypatch.delenv("TCEXPORT_PROGRESS", raising=False)
    session.run([small_onnx], batches=[1], warmup=0, iters=3)
    assert capsys.readouterr().err == ""


def test_missing_artifact(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        session.run([tmp_path / "nope.onnx"], batches=[1])


def test_trt_backend_is_a_usage_error(tmp_path):
    build_dir = tmp_path / "engine"
    build_dir.mkdir()
    (build_dir / "model.plan").write_bytes(b"\0")
    (build_dir / "tcexport-build.json").write_text(json.dumps({"backend": "trt", "model_file": "model.plan"}))
    with pytest.raises(UsageError, match="tensorrt"):
        session.run([build_dir], batches=[1])


def test_iters_and_duration_together():
    with pytest.raises(UsageError):
        session.run(["x.onnx"], iters=5, duration=1.0)


# ---------------------------------------------------------------------------------------------- outputs


@pytest.fixture()
def fake_results() -> dict:
    entries = [stats.summarize(label, batch, [int(ns * 1e6) for ns in lat], int(sum(lat) * 1.1e6))
               for label, batch, lat in (("base", 1, [1.0, 1.2, 1.1]), ("tome", 1, [0.6, 0.7, 0.9]),
                                         ("base", 8, [5.0, 6.0, 5.5]), ("tome", 8, [3.0, 3.2, 3.1]))]
    return {"artifacts": [], "environment": {}, "settings": {}, "results": stats.add_speedups(entries)}


def test_print_table(fake_results, capsys):
    report.print_table(fake_results)
    out = capsys.readouterr().out
    for word in ("artifact", "median", "p99", "samples/s", "speedup", "base", "tome"):
        assert word in out
    assert "1.00x" in out and "1.57x" in out  # tome at batch 1: 1.1 ms / 0.7 ms


def test_print_table_fits_a_narrow_terminal(fake_results, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    report.print_table(fake_results)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out  # compact layout instead of numbers cut short
    assert "0.700" in out and "1.57x" in out and "speedup" in out


def test_write_json(fake_results, tmp_path):
    path = tmp_path / "sub" / "bench.json"
    report.write_json(fake_results, path)
    assert json.loads(path.read_text())["results"][1]["speedup"] == pytest.approx(1.1 / 0.7)
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temporary left behind


def test_write_plot(fake_results, tmp_path):
    path = tmp_path / "bench.png"
    report.write_plot(fake_results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_write_plot_needs_png_suffix(fake_results, tmp_path):
    with pytest.raises(UsageError, match=r"\.png"):
        report.write_plot(fake_results, tmp_path / "bench.jpg")
    assert not (tmp_path / "bench.jpg").exists()


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "tcexport.cli", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bench_end_to_end(small_onnx, big_onnx, tmp_path):
    proc = run_cli(str(small_onnx), str(big_onnx), "--batch", "1,2", "--iters", "5", "--warmup", "1",
                   "--json", "out.json", "--plot", "out.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout and "small" in proc.stdout and "big" in proc.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    assert len(data["results"]) == 4
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_iters_and_duration(small_onnx, tmp_path):
    proc = run_cli(str(small_onnx), "--iters", "5", "--duration", "1", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


# ---------------------------------------------------------------------------------------------- device timing


class FakeDeviceRunner:
    """A runner that reports device times like TrtRunner: synthetic, known values per run."""

    def __init__(self, name: str, fields=("gpu_compute_ms",), start_ms: float = 1.0):
        self.name = name
        self.device_fields = tuple(fields)
        self.next_ms = start_ms
        self.staged: list[dict] = []
        self.runs = 0
        self._times: dict[str, list[float]] = {f: [] for f in self.device_fields}
        self.cuda_graph_used, self.cuda_graph_note = False, "off"

    def stage(self, feeds):
        self.staged.append(feeds)

    def run(self, feeds):
        self.runs += 1
        for name in self.device_fields:
            self._times[name].append(self.next_ms if name == "gpu_compute_ms" else 0.1)
        self.next_ms += 1.0
        return None

    def pop_device_times(self):
        times = {k: list(v) for k, v in self._times.items()}
        for v in self._times.values():
            v.clear()
        return times


def test_device_fields_of_runners():
    assert timing.device_fields_of(RecordingRunner("ort", [])) == ()
    assert timing.pop_device_times(RecordingRunner("ort", [])) == {}
    assert timing.device_fields_of(FakeDeviceRunner("trt", ("h2d_ms", "gpu_compute_ms", "d2h_ms"))) == \
        ("h2d_ms", "gpu_compute_ms", "d2h_ms")
    with pytest.raises(ValueError, match="unknown device time fields"):
        timing.device_fields_of(FakeDeviceRunner("odd", ("power_w",)))


def test_time_interleaved_stages_and_drops_warmup_device_times():
    calls: list[str] = []
    device = FakeDeviceRunner("trt")
    feeds = [{}, {"x": 1}]
    latencies = timing.time_interleaved([RecordingRunner("ort", calls), device], feeds, warmup=2,
                                       iters=3).latencies_ns
    assert device.staged == [feeds[1]]  # staged once, before its warm-up
    assert device.runs == 5 and [len(lat) for lat in latencies] == [3, 3]
    # The warm-up runs (1 ms, 2 ms) were dropped; what is left lines up with the three timed runs.
    assert timing.pop_device_times(device) == {"gpu_compute_ms": [3.0, 4.0, 5.0]}


def test_summarize_merges_device_stats_next_to_host_latency():
    entry = stats.summarize("trt", 2, [4_000_000, 5_000_000, 6_000_000], 15_000_000,
                            {"gpu_compute_ms": [1.0, 2.0, 3.0], "h2d_ms": [0.1, 0.1, 0.4], "d2h_ms": [0.2] * 3})
    assert entry["latency_ms"]["median"] == pytest.approx(5.0)  # host wall time is untouched
    assert entry["gpu_compute_ms"] == stats.latency_stats([1.0, 2.0, 3.0])
    assert entry["h2d_ms"]["max"] == pytest.approx(0.4) and entry["d2h_ms"]["median"] == pytest.approx(0.2)
    assert entry["throughput_qps"] == pytest.approx(3 / 0.015)  # throughput stays host-based, as trtexec's
    plain = stats.summarize("ort", 2, [4_000_000, 5_000_000, 6_000_000], 15_000_000, {})
    assert not set(stats.DEVICE_FIELDS) & set(plain)
    assert stats.summarize("ort", 2, [1, 2, 3], 6).keys() == plain.keys()
    with pytest.raises(ValueError, match="2 gpu_compute_ms samples for 3 timed runs"):
        stats.summarize("trt", 1, [1, 2, 3], 6, {"gpu_compute_ms": [1.0, 2.0]})


@pytest.fixture()
def mixed_results() -> dict:
    entries = [stats.summarize("ort", 1, [2_000_000, 2_000_000], 4_000_000),
               stats.summarize("trt", 1, [1_000_000, 1_000_000], 2_000_000, {"gpu_compute_ms": [0.25, 0.75]}),
               stats.summarize("trt-copies", 1, [1_500_000, 1_500_000], 3_000_000,
                               {"gpu_compute_ms": [0.5, 0.5], "h2d_ms": [0.125, 0.125], "d2h_ms": [0.0625, 0.0625]})]
    return {"artifacts": [], "environment": {}, "settings": {}, "results": stats.add_speedups(entries)}


def test_table_columns_for_each_mix(fake_results, mixed_results):
    assert report.table_columns(fake_results) == report.TABLE_COLUMNS  # ONNX Runtime only: as before
    assert report.table_columns(mixed_results) == ("artifact", "batch", "runs", "min", "median", "mean", "p90", "p95",
                                                  "p99", "gpu", "h2d", "d2h", "qps", "samples/s", "speedup")
    compute_only = {"results": mixed_results["results"][:2]}
    assert report.table_columns(compute_only)[9:11] == ("gpu", "qps")
    columns = report.table_columns(mixed_results)
    decimals = report.column_formats(mixed_results["results"], columns)
    ort_row, trt_row, copies_row = (report.table_row(e, columns, decimals) for e in mixed_results["results"])
    assert ort_row[2] == "2" and ort_row[9:12] == [report.MISSING_CELL] * 3 and ort_row[-1] == "1.00x"
    # One format per column: gpu's smallest median is 0.5 -> 3 decimals for all; d2h's 0.0625 -> 4.
    assert trt_row[9:12] == ["0.500", "-", "-"] and trt_row[-1] == "2.00x"
    assert copies_row[9:12] == ["0.500", "0.125", "0.0625"]
    assert "gpu/h2d/d2h = median device time" in report.table_caption(columns)
    assert report.table_caption(report.TABLE_COLUMNS) == "speedup = first artifact's median / median, same batch"


def test_print_table_mixed(mixed_results, capsys):
    report.print_table(mixed_results)
    out = capsys.readouterr().out
    assert "gpu" in out and "h2d" in out and "0.500" in out and "0.0625" in out and "2.00x" in out


def make_engine_dir(tmp_path: Path, onnx_path: Path, name: str = "engine", batch_max: int = 4) -> Path:
    """A directory that resolves as a TensorRT build (the runner is faked, so the engine bytes never load)."""
    from tcexport.models import inputs as inputs_mod

    specs = inputs_mod.specs_from_graph(onnx.load(str(onnx_path)))
    directory = tmp_path / name
    directory.mkdir()
    (directory / "model.engine").write_bytes(b"\0")
    profile = {s.name: {"min": [1, *s.shape[1:]], "opt": [1, *s.shape[1:]], "max": [batch_max, *s.shape[1:]]}
               for s in specs}
    (directory / "tcexport-build.json").write_text(json.dumps({
        "backend": "trt", "model_file": "model.engine", "precision": "fp16", "tensorrt_version": "10.13.0.35",
        "gpu_name": "Fake GPU", "inputs": [s.to_json() for s in specs], "profile": profile}))
    return directory


@pytest.fixture()
def fake_engines(monkeypatch):
    """bench opens engine directories with FakeDeviceRunner; returns the options each was opened with."""
    from tcexport.backends import trt_engine

    opened = []

    def open_engine_runner(artifact, label=None, *, include_copies=False, cuda_graph=False):
        opened.append({"label": label, "include_copies": include_copies, "cuda_graph": cuda_graph})
        fields = ("h2d_ms", "gpu_compute_ms", "d2h_ms") if include_copies else ("gpu_compute_ms",)
        runner = FakeDeviceRunner(label, fields)
        runner.cuda_graph_used, runner.cuda_graph_note = cuda_graph, "on" if cuda_graph else "off"
        return runner

    monkeypatch.setattr(trt_engine, "open_engine_runner", open_engine_runner)
    return opened


def test_run_mixed_ort_and_engine(small_onnx, tmp_path, fake_engines):
    engine = make_engine_dir(tmp_path, small_onnx)
    results = session.run([small_onnx, engine], batches=[1, 2], warmup=2, iters=4, cuda_graph=True)
    json.dumps(results)
    assert fake_engines == [{"label": "engine", "include_copies": False, "cuda_graph": True}]
    ort_artifact, engine_artifact = results["artifacts"]
    assert ort_artifact["provider"] == "cpu" and "cuda_graph" not in ort_artifact
    assert engine_artifact["backend"] == "trt" and engine_artifact["provider"] is None
    assert engine_artifact["precision"] == "fp16" and engine_artifact["cuda_graph"] is True
    assert engine_artifact["device_fields"] == ["gpu_compute_ms"] and engine_artifact["threads"] is None
    assert results["settings"]["cuda_graph"] is True and results["settings"]["include_copies"] is False
    by_key = {(e["artifact"], e["batch"]): e for e in results["results"]}
    assert set(by_key) == {(a, b) for a in ("small", "engine") for b in (1, 2)}
    for batch in (1, 2):
        assert "gpu_compute_ms" not in by_key[("small", batch)]
        assert by_key[("engine", batch)]["speedup"] > 0 and by_key[("small", batch)]["speedup"] == 1.0
    # Synthetic device times count up by 1 ms per run; warm-ups (2 per batch) are not samples.
    first, second = by_key[("engine", 1)]["gpu_compute_ms"], by_key[("engine", 2)]["gpu_compute_ms"]
    assert (first["min"], first["max"]) == (3.0, 6.0)
    assert second["min"] == 9.0 and by_key[("engine", 2)]["iters"] == 4


def test_run_engine_with_copies_reports_h2d_d2h(small_onnx, tmp_path, fake_engines):
    engine = make_engine_dir(tmp_path, small_onnx)
    results = session.run([engine, small_onnx], batches=[1], warmup=0, iters=2, include_copies=True)
    entry = results["results"][0]
    assert entry["artifact"] == "engine" and entry["h2d_ms"]["median"] == pytest.approx(0.1)
    assert {"gpu_compute_ms", "h2d_ms", "d2h_ms"} <= set(entry) and "h2d_ms" not in results["results"][1]


def test_run_engine_batch_outside_profile(small_onnx, tmp_path, fake_engines):
    engine = make_engine_dir(tmp_path, small_onnx, batch_max=4)
    with pytest.raises(UsageError, match="engine: batch 8 is outside the engine's optimization profile"):
        session.run([small_onnx, engine], batches=[1, 8], warmup=0, iters=1)


def test_engine_options_need_an_engine(small_onnx):
    for options in ({"cuda_graph": True}, {"include_copies": True}):
        with pytest.raises(UsageError, match="apply|applies"):
            session.run([small_onnx], batches=[1], warmup=0, iters=1, **options)


def test_cli_engine_option_without_engine(small_onnx, tmp_path):
    proc = run_cli(str(small_onnx), "--include-copies", "--cuda-graph", "--iters", "1", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --include-copies/--cuda-graph apply to TensorRT")


def test_cli_cuda_provider_build_on_a_cpu_only_machine(small_onnx, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider; the missing-provider path is not reachable")
    from tcexport.backends import ort as ort_backend

    build_dir = tmp_path / "cuda-build"
    ort_backend.build(small_onnx, build_dir)  # a real build, then recorded as made for CUDA
    sidecar_path = build_dir / "tcexport-build.json"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["provider"] = "CUDAExecutionProvider"
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(UsageError, match="built for CUDAExecutionProvider"):
        session.run([build_dir], batches=[1], warmup=0, iters=1)
    proc = run_cli(str(small_onnx), str(build_dir), "--iters", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: {build_dir}: built for CUDAExecutionProvider")
    assert "'cuda' is not available" in lines[0] and "tcexport[gpu]" in lines[0]


# ---------------------------------------------------------------------------------------------- trustworthy numbers


class FakeClock:
    """perf_counter_ns that advances by `overhead_ns` per reading; runners advance it by their run time."""

    def __init__(self, overhead_ns: int):
        self.now = 0
        self.overhead_ns = overhead_ns

    def perf_counter_ns(self) -> int:
        self.now += self.overhead_ns
        return self.now

    def perf_counter(self) -> float:
        return self.perf_counter_ns() / 1e9


class ClockedRunner:
    def __init__(self, name: str, clock: FakeClock, run_ns: int):
        self.name, self.clock, self.run_ns = name, clock, run_ns

    def run(self, feeds):
        self.clock.now += self.run_ns


def test_throughput_comes_from_wall_time_not_mean_latency(monkeypatch):
    clock = FakeClock(overhead_ns=1_000_000)  # 1 ms of loop overhead per clock reading
    monkeypatch.setattr(timing, "time", clock)
    runners = [ClockedRunner("a", clock, 2_000_000), ClockedRunner("b", clock, 4_000_000)]
    timed = timing.time_interleaved(runners, [{}, {}], warmup=0, iters=5)
    # A run is timed from one reading to the next: its run time plus one reading (1 ms).
    assert timed.latencies_ns == [[3_000_000] * 5, [5_000_000] * 5]
    # Its wall-clock slice runs to the next run's start: one more reading, so 4 ms and 6 ms per run.
    assert timed.wall_ns == [5 * 4_000_000, 5 * 6_000_000]
    # The slices tile the timed region, from the first start, except the 4 pauses between the 5 rounds (one
    # reading each), where the progress bar is drawn: that is tcexport's time, not an artifact's.
    assert sum(timed.wall_ns) == clock.now - 1_000_000 - 4 * 1_000_000
    entry = stats.summarize("a", 2, timed.latencies_ns[0], timed.wall_ns[0])
    assert entry["throughput_qps"] == pytest.approx(1 / 0.004)  # 250 runs/s from wall time
    assert entry["throughput_qps"] != pytest.approx(1000 / entry["latency_ms"]["mean"])  # 333/s would be 1/mean
    assert entry["throughput_samples_per_s"] == pytest.approx(2 / 0.004)


def test_warmup_ms_runs_for_a_time_budget(monkeypatch):
    clock = FakeClock(overhead_ns=0)
    monkeypatch.setattr(timing, "time", clock)
    runner = ClockedRunner("a", clock, 3_000_000)
    assert timing.warm_up(runner, {}, runs=99, ms=10.0) == 4  # 3 ms runs until 10 ms have passed
    assert timing.warm_up(runner, {}, runs=2) == 2
    assert timing.warm_up(runner, {}, runs=0, ms=1e-6) == 1  # at least one run


def _entry(label: str, latencies_ms: list[float]) -> dict:
    ns = [int(v * 1e6) for v in latencies_ms]
    return stats.summarize(label, 1, ns, sum(ns))


def test_noise_warning_for_a_long_tail_and_for_too_few_runs():
    steady = _entry("steady", [1.0] * 200)
    assert stats.noise_warnings([steady]) == []
    spiky = _entry("spiky", [1.0] * 190 + [10.0] * 10)  # p99 = 10 ms = 10x the median
    warnings = stats.noise_warnings([steady, spiky])
    assert len(warnings) == 1 and warnings[0].startswith("spiky at batch 1: p99") and "too noisy" in warnings[0]
    short = stats.noise_warnings([_entry("short", [1.0] * 15)])
    assert len(short) == 1 and "15 timed runs are too few for p95, p99" in short[0] and "--iters 100" in short[0]
    assert [stats.runs_needed(q) for q in (90, 95, 99)] == [10, 20, 100]


def test_run_reports_runs_warmup_and_warnings(small_onnx):
    results = session.run([small_onnx], batches=[1], warmup=3, iters=12)
    entry = results["results"][0]
    assert entry["iters"] == 12 and entry["warmup_runs"] == 3 and entry["wall_s"] > 0
    assert entry["throughput_qps"] == pytest.approx(12 / entry["wall_s"])
    assert any("too few for p95, p99" in w for w in results["warnings"])
    assert results["settings"]["warmup"] == 3 and "wall-clock" in results["settings"]["throughput"]


def test_one_number_format_per_column():
    entries = [_entry("slow", [75.923] * 3), _entry("fast", [0.5] * 3)]
    stats.add_speedups(entries)
    columns = report.table_columns({"results": entries})
    decimals = report.column_formats(entries, columns)
    rows = [report.table_row(e, columns, decimals) for e in entries]
    for index, column in enumerate(columns):
        if column in ("artifact", "batch", "runs", "speedup"):
            continue
        places = {len(row[index].partition(".")[2]) for row in rows}
        assert len(places) == 1, (column, [row[index] for row in rows])  # same decimals down the column
        assert not any("," in row[index] for row in rows)
    assert rows[0][columns.index("median")] == "75.923" and rows[1][columns.index("median")] == "0.500"


def test_summary_names_both_artifacts(fake_results):
    fake_results["artifacts"] = [{"label": "base", "path": "b/base"}, {"label": "tome", "path": "b/tome"}]
    assert report.summary_lines(fake_results) == ["tome (b/tome) vs base (b/base): 1.57x at batch 1, 1.77x at batch 8 "
                                                 "(median latency)"]


def test_plot_has_one_panel_per_batch_and_a_caption(fake_results, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))  # keep the figure to look at it
    fake_results["environment"] = {"processor": "TestCPU", "usable_cpus": 2, "onnxruntime_version": "9.9"}
    fake_results["settings"] = {"iters": 3, "warmup": 1, "threads": 2}
    report.write_plot(fake_results, tmp_path / "bench.png")
    fig = figures[0]
    assert [ax.get_title() for ax in fig.axes] == ["batch 1", "batch 8"]
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert labels == ["1.00x", "1.57x", "1.00x", "1.77x"]
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "TestCPU" in caption and "onnxruntime 9.9" in caption and "threads 2" in caption and "1 warm-up run" in caption
    close(fig)


def test_shapes_set_the_inputs_and_the_batch(small_onnx):
    results = session.run([small_onnx], batches=None, shapes="x:4x64", warmup=0, iters=2)
    assert results["settings"]["batches"] == [4] and results["settings"]["shapes"] == {"x": [4, 64]}
    assert results["results"][0]["batch"] == 4
    with pytest.raises(UsageError, match="fixed at 64"):
        session.run([small_onnx], batches=None, shapes="x:4x32", warmup=0, iters=1)
    with pytest.raises(UsageError, match="no artifact takes an input named pixel_values"):
        session.run([small_onnx], batches=None, shapes="x:1x64,pixel_values:1x3", warmup=0, iters=1)
    with pytest.raises(UsageError, match="NAME:DIMS"):
        session.run([small_onnx], batches=None, shapes="x=1x64", warmup=0, iters=1)
    with pytest.raises(UsageError, match="drop --batch"):
        session.run([small_onnx], batches=[2], shapes="x:1x64", warmup=0, iters=1)


def test_load_inputs_times_the_users_arrays(small_onnx, tmp_path, monkeypatch):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.ones((3, 64), dtype=np.float32))
    seen = []
    original = timing.OrtRunner.run
    monkeypatch.setattr(timing.OrtRunner, "run", lambda self, feeds: (seen.append(feeds), original(self, feeds))[1])
    results = session.run([small_onnx], batches=None, load_inputs=path, warmup=0, iters=2)
    assert results["results"][0]["batch"] == 3 and results["settings"]["inputs"] == f"--load-inputs {path}"
    assert all(np.array_equal(feeds["x"], np.ones((3, 64), dtype=np.float32)) for feeds in seen) and len(seen) == 2
    np.savez(path, y=np.ones((3, 64), dtype=np.float32))  # a typo in the array's name
    with pytest.raises(UsageError, match="no artifact takes an input named y"):
        session.run([small_onnx], batches=None, load_inputs=path, warmup=0, iters=1)


def test_cli_shapes_load_inputs_and_warmup_ms(small_onnx, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 64), dtype=np.float32))
    proc = run_cli(str(small_onnx), "--load-inputs", "in.npz", "--iters", "3", "--warmup-ms", "5", "--json", "o.json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["results"][0]["batch"] == 2 and data["settings"]["warmup_ms"] == 5
    assert data["results"][0]["warmup_runs"] >= 1
    assert "warning: 3 timed runs are too few" in proc.stderr
    for bad in (["--shapes", "x:1x64", "--batch", "2"], ["--warmup", "3", "--warmup-ms", "5"],
                ["--load-inputs", "missing.npz"], ["--shapes", "x:1xA"]):
        proc = run_cli(str(small_onnx), *bad, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (bad, proc.stderr)
