"""Shared fixtures: tiny models exported once per test run, even when pytest-xdist runs several workers."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
# py: specs in tests import tests.fixtures.factories
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `tcexport ARGS` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "tcexport.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def cli_here(*args):
    """`tcexport ARGS` in this process (click's runner): exit code, stdout and stderr as run_cli gives them, without
    a fresh interpreter importing torch and transformers for every call."""
    import subprocess

    from click.testing import CliRunner

    from tcexport.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_usage_error(result: subprocess.CompletedProcess) -> None:
    """tcexport's contract for bad input: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A directory holding what make(directory) writes, made once per test run.

    Under pytest-xdist every worker is its own session, so a session fixture would export the same model once
    per worker; instead the first worker makes it, under a file lock, in the run's shared temporary root
    (the workers' basetemps share a parent), and the others wait for it and reuse it.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        make(directory)
        return directory
    root = tmp_path_factory.getbasetemp().parent / "made_once"
    root.mkdir(exist_ok=True)
    directory, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a worker that failed half-way left this
            directory.mkdir()
            make(directory)
            done.touch()
    return directory


def exported(tmp_path_factory, name: str, spec: str, filename: str, **load_options) -> Path:
    """`spec` exported to ONNX once per test run (see made_once)."""

    def make(directory: Path) -> None:
        from tcexport.export import exporter as export
        from tcexport.models import sources

        export.export_to_file(sources.load(spec, **load_options), directory / filename)

    return made_once(tmp_path_factory, name, make) / filename


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory) -> Path:
    """A vit_tiny state dict with seeded random weights, saved as a user's checkpoint file would be."""

    def make(directory: Path) -> None:
        import timm
        import torch

        torch.manual_seed(1234)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        torch.save(model.state_dict(), directory / "vit_tiny.pth")

    return made_once(tmp_path_factory, "ckpt", make) / "vit_tiny.pth"


@pytest.fixture(scope="session")
def vit_onnx(tmp_path_factory, vit_checkpoint) -> Path:
    return exported(tmp_path_factory, "vit", "timm:vit_tiny_patch16_224", "vit_tiny.onnx", checkpoint=vit_checkpoint)


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "minilm", "st:all-MiniLM-L6-v2", "minilm.onnx", seq_len=128)


@pytest.fixture(scope="session")
def deit_distilled_onnx(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "deit", "timm:deit_tiny_distilled_patch16_224", "deit_tiny_distilled.onnx", seed=3)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a transformers directory (what hf:DIR loads offline)."""

    def make(directory: Path) -> None:
        import torch
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(0)
        BertModel(config).save_pretrained(directory / "bert")

    return made_once(tmp_path_factory, "bert", make) / "bert"


@pytest.fixture(scope="session")
def bert_onnx(tmp_path_factory, bert_dir) -> Path:
    return exported(tmp_path_factory, "bert_onnx", f"hf:{bert_dir}", "bert.onnx", seq_len=24)


# The default run (`bash scripts/test.sh`) leaves out the end-to-end tests below; `bash scripts/test.sh --all`
# (what CI runs) includes them. Each took over ~15 s on the 2-core development machine (pytest --durations,
# 2026-12-01), or repeats a path the default run already covers with a cheaper model (the family tests keep one
# model per mechanism: relative position bias, rotary, average pooling, attention pooling, registers, shared
# layers, a position bias in a text encoder, a vision tower, a speech encoder).
HEAVY = (
    "tests/test_compare_methods.py",
    "tests/test_opsets.py::test_exported_model_compresses_and_validates[minilm",
    "tests/test_opsets.py::test_exported_model_compresses_and_validates[vit-18]",
    "tests/test_opsets.py::test_exported_model_compresses_and_validates[vit-20]",
    "tests/test_recipes.py::test_vit_tiny_recipe_end_to_end",
    "tests/test_recipes.py::test_rerun_into_its_own_output",
    "tests/test_recipes.py::test_failed_validation_exits_1",
    "tests/test_recipes.py::test_multistage_recipe_end_to_end",
    "tests/test_recipes.py::test_query_recipe",
    "tests/test_compress.py::test_cli_compress_then_validate",
    "tests/test_compress.py::test_validate_on_user_inputs",
    "tests/test_compress.py::test_fused_attention_graph_fails_clearly",
    "tests/test_compress.py::test_validate_fails_with_exit_1",
    "tests/test_compress.py::test_compressing_twice_and_bad_graphs",
    "tests/test_compress.py::test_vit_tiny_matches_reference[r16-first-half]",
    "tests/test_compress.py::test_vit_tiny_matches_reference[per-layer-r]",
    "tests/test_sources_families.py::test_no_traceback_from_broken_hf_directories",
    "tests/test_sources_families.py::test_model_arg_on_the_cli",
    "tests/test_sources_families.py::test_hf_kind_exports_and_has_one_block_per_layer",
    "tests/test_sources_families.py::test_timm_tiny_variant_exports_and_has_one_block_per_layer",
    "tests/test_sources_families.py::test_st_kind_exports_the_pipeline",
    # timm structures compress refuses: test_families_structures.py exports them already (MViTv2 alone takes 40 s)
    *(f"tests/test_sources_families.py::test_timm_models_without_global_attention_still_export[{name}]"
      for name in ("levit_128s", "cait_xxs24_224", "xcit_nano_12_p16_224", "mvitv2_tiny", "pit_ti_224")),
    "tests/test_ux.py::test_export_refuses_a_file_it_did_not_write_unless_forced",
    "tests/test_ux.py::test_cli_build_from_a_spec_shows_each_stage_on_stderr",
    "tests/test_ux.py::test_export_prints_the_check_before_wrote",
    "tests/test_ux.py::test_build_refuses_a_directory_that_is_not_a_build",
    "tests/test_external_data.py::test_compress_build_bench_validate_with_external_weights",
    "tests/test_reference_onnx.py::test_text_model_bounds_ids",
    "tests/test_method_query.py::test_vit_takes_a_query_and_validates",
    "tests/test_export.py::test_unreadable_and_mismatched_checkpoints",
    "tests/test_export.py::test_export_mismatch_exits_1_and_writes_nothing",
    "tests/test_export.py::test_py_factory_image_and_text",
    "tests/test_bench.py::test_cli_shapes_load_inputs_and_warmup_ms",
    "tests/test_functions.py::test_cli_impl_function_with_two_methods",
    "tests/test_plugins_cpp.py::test_plugins_compute_what_the_function_bodies_compute",
    "tests/test_method_pool.py::test_vit_pool_at_block_6_matches_reference",
    "tests/test_cli.py::test_build_from_model_spec",
    # end-to-end runs of each method on the 12-block vit_tiny and MiniLM: the default run keeps one per method
    "tests/test_method_baselines.py::test_vit_matches_reference",
    "tests/test_method_baselines.py::test_minilm_matches_reference[random]",
    "tests/test_method_baselines.py::test_bad_cli_request_exits_2",
    "tests/test_method_adjacent.py::test_minilm_sequences_match_reference",
    "tests/test_method_adjacent.py::test_bad_cli_request_exits_2",
    "tests/test_method_prune_merge.py::test_minilm_matches_reference",
    "tests/test_method_prune_merge.py::test_bad_cli_request_exits_2",
    "tests/test_method_topk.py::test_vit_validates",
    "tests/test_method_topk.py::test_minilm_validates[keep0.7]",
    "tests/test_method_query.py::test_minilm_validates",
    "tests/test_export.py::test_hf_bert_directory_export",
    "tests/test_export.py::test_safetensors_checkpoint",
    "tests/test_export.py::test_fixed_batch_and_torchscript_exporter",
    "tests/test_compress.py::test_deit_distilled_keeps_both_prefix_tokens",
    "tests/test_compress.py::test_tome_graph_lints_clean_for_tensorrt_10_3",
    "tests/test_compress.py::test_metric_leaves_the_logits_chain_to_the_logits[minilm_onnx]",
    # every method on vit_tiny and MiniLM, each count against a run (the default run does it on tiny models)
    "tests/test_flops_accounting.py::test_vit_and_minilm_every_method_inspect_matches_a_run",
    "tests/test_flops_accounting.py::test_the_issue_case_on_the_command_line",
    # every sentence-transformers pooling mode end to end: the default run keeps cls and max (the two that were
    # broken) with tome, and all six modes concatenated, which takes every mode's path in one pipeline
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[cls-topk]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[max-topk]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[mean-tome]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[mean-topk]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[mean_sqrt_len_tokens-tome]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[mean_sqrt_len_tokens-topk]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[weightedmean-tome]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[weightedmean-topk]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[lasttoken-tome]",
    "tests/test_pooling_modes.py::test_each_mode_compresses_and_validates[lasttoken-topk]",
    "tests/test_pooling_modes.py::test_all_modes_concatenated_compress_and_validate[topk]",
)
KEPT_FAMILIES = ("beit_base", "eva02", "vit_medium_patch16_gap", "siglip_224", "reg4_dinov2", "[mpnet-tome]",
                 "[albert-topk]", "[dinov2_registers-topk]", "[clip_vision-tome]", "test_whisper_encoder[adjacent]",
                 "test_register_tokens", "refused")
# test_families_structures.py: parallel blocks with tome, the refusals that take under ~10 s (one per mechanism:
# pooled tokens, talking heads, attention over channels, a bottleneck, folded heads) and the exporter's unit test;
# the default run leaves out MViTv2 (53 s), Funnel, WavLM, Longformer, BigBird and the subprocess runs.
KEPT_FAMILIES += ("test_parallel_blocks_compress_and_validate[tome", "test_parallel_blocks_are_one_block",
                  "one_accurate_line[timm-levit_128s]", "one_accurate_line[timm-cait_xxs24_224]",
                  "one_accurate_line[timm-xcit_nano_12_p16_224]", "one_accurate_line[hf-mobilebert]",
                  "one_accurate_line[hf-deberta-v2]", "test_mobilebert_reference_refuses",
                  "test_exporter_failures_are_named_by_their_cause", "test_a_skip_around_compressed_blocks",
                  "test_exporter_output_is_muted")


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        node = item.nodeid
        family = node.startswith("tests/test_families_")
        if node.startswith(HEAVY) or (family and not any(keep in node for keep in KEPT_FAMILIES)):
            item.add_marker(slow)
