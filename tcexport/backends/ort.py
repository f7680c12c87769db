"""ONNX Runtime backend: build (save the graph-optimized model and a sidecar) and run sessions."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tcexport import __version__
from tcexport.models import inputs
from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.core.artifacts import SIDECAR
from tcexport.core.atomic import atomic_dir
from tcexport.core.errors import UsageError
from tcexport.plugins import ort_library

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def provider_name(provider: str) -> str:
    name = PROVIDERS.get(provider)
    if name is None:
        raise UsageError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    if name not in ort.get_available_providers():
        raise UsageError(
            f"ONNX Runtime provider '{provider}' is not available in this installation "
            f"(have: {', '.join(ort.get_available_providers())}); install tcexport[gpu] on a machine with a GPU"
        )
    return name


def session_options(threads: int | None = None, opt_level: str = "all",
                    interleaved: bool = False, model: onnx.ModelProto | None = None,
                    where: str | object = "the model") -> ort.SessionOptions:
    """interleaved: the session takes turns with others (timing); its idle worker threads then sleep instead of
    spinning, since a spinning pool would steal cores from the next session's run.

    model: the graph the session will run; when it holds --impl plugin nodes, tcexport's op library is
    registered on the options (or a UsageError names what is missing, `where` naming the model)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[opt_level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if interleaved:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if model is not None:
        register_plugin_ops(options, model, where)
    return options


def register_plugin_ops(options: ort.SessionOptions, model: onnx.ModelProto, where: str | object) -> list[str]:
    """Register tcexport's ONNX Runtime op library on `options` when `model` has --impl plugin nodes (only then:
    an --impl function graph keeps running its own bodies). Returns the plugin ops; UsageError when the library
    cannot run them (not built: the one line says how to get it)."""
    ops = ort_library.require(model, where)
    if ops:
        ort_library.register(options)
    return ops


def open_session(model_path: str | Path, provider: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    options = options or session_options(threads, opt_level)
    register_plugin_ops(options, onnxfile.load(model_path, load_external_data=False), model_path)
    try:
        return ort.InferenceSession(str(model_path), options, providers=[provider_name(provider)])
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
        first_line = str(exc).strip().splitlines()[0][:300]
        raise UsageError(f"{model_path}: ONNX Runtime cannot load it: {first_line}") from None


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = MODEL_FILE + onnxfile.DATA_SUFFIX
EXTERNAL_FILE_KEY = "session.optimized_model_external_initializers_file_name"
EXTERNAL_MIN_SIZE_KEY = "session.optimized_model_external_initializers_min_size_in_bytes"


def _source_weights(model_path: str | Path, source: onnx.ModelProto) -> list[Path]:
    """The external data files the source reads, each checked to exist (ONNX Runtime's own error is cryptic)."""
    files = [Path(model_path).parent / name for name in onnxfile.external_data_locations(source)]
    for path in files:
        if not path.is_file():
            raise UsageError(f"{model_path}: its weights file {path.name} is missing (it must sit beside the "
                             ".onnx file); copy it there or re-export")
    return files


def _self_contained_files(directory: Path, optimized: onnx.ModelProto) -> list[str]:
    """The files of the build; every weights file the optimized model names must be inside `directory`."""
    names = onnxfile.external_data_locations(optimized)
    outside = [n for n in names if n != MODEL_DATA_FILE or not (directory / n).is_file()]
    if outside:
        raise UsageError(f"ONNX Runtime saved the optimized model with weights outside the build ({outside[0]}); "
                         "please report this to tcexport")
    return [MODEL_FILE, *names]


def build(model_path: str | Path, out_dir: str | Path, provider: str = "cpu", threads: int | None = None,
          opt_level: str = "all", batch: int = 1, source_model: str | None = None) -> dict:
    """Optimize `model_path` with ONNX Runtime and write OUT_DIR/{model.onnx, tcexport-build.json} atomically.

    source_model: what the sidecar names as the source (default: model_path, resolved); a build from a model
    spec passes the spec, since the file it exported to is temporary.

    ORT_ENABLE_ALL may fuse nodes into provider-specific kernels, so the saved model belongs to the provider it
    was built for; the sidecar records which. Returns the sidecar.
    """
    source = onnxfile.load(model_path, load_external_data=False)
    specs = inputs.specs_from_graph(source)
    provider_full = provider_name(provider)
    weights = _source_weights(model_path, source)
    with atomic_dir(out_dir) as tmp:
        options = session_options(threads, opt_level)
        options.optimized_model_filepath = str(tmp / MODEL_FILE)
        if weights:  # the onnxfile layout rule: external data in, external data out (re-saved into OUT_DIR)
            options.add_session_config_entry(EXTERNAL_FILE_KEY, MODEL_DATA_FILE)
            options.add_session_config_entry(EXTERNAL_MIN_SIZE_KEY, "1024")
        session = open_session(model_path, provider, options=options)
        plugin_ops = ort_library.plugin_only_ops(source)
        # Run once so a graph that loads but cannot execute fails the build, not the first user.
        feeds = (inputs.decoder_smoke_feeds(specs, batch) if inputs.is_decoder_graph(specs)
                 else inputs.random_feeds(specs, batch))
        session.run(None, feeds)
        optimized = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
        model_files = _self_contained_files(tmp, optimized)
        sidecar = {
            "tool": f"tcexport {__version__}",
            "backend": "ort",
            "model_file": "model.onnx",
            "provider": provider_full,
            "onnxruntime_version": ort.__version__,
            "onnx_version": onnx.__version__,
            "options": {"graph_optimization_level": opt_level, "intra_op_num_threads": threads},
            "inputs": [s.to_json() for s in specs],
            "outputs": [o.name for o in session.get_outputs()],
            "source_model": source_model or str(Path(model_path).resolve()),
            "source_sha256": file_sha256(model_path),
            # The weights, when they sit beside the .onnx file: hashed too, so a swapped .data file shows.
            "source_weights": [{"file": str(w.resolve()), "sha256": file_sha256(w)} for w in weights],
            "model_files": model_files,
            "nodes_before": len(source.graph.node),
            "nodes_after": len(optimized.graph.node),
            # The optimized graph may drop metadata_props; keep the provenance with the build.
            "records": metadata.all_records(source),
            # --impl plugin nodes run on tcexport's op library; validate and bench register it again.
            **({"custom_ops": {**ort_library.record(), "nodes": plugin_ops}} if plugin_ops else {}),
            "host": {"machine": platform.machine(), "processor": platform.processor() or platform.machine()},
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar
