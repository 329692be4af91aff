"""OrtEngine's execution providers when TensorRT's library is missing: onnxruntime-gpu lists
TensorrtExecutionProvider whether or not TensorRT is installed."""

from __future__ import annotations

import logging

import pytest

from edge_runtime.engines import ort as ort_engine
from edge_runtime.engines.ort import choose_providers, tensorrt_missing

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_tensorrt_left_out_with_the_reason_when_its_library_does_not_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_runtime.engines.ort"):
        chosen = choose_providers(GPU_BUILD, trt_missing=lambda: "TensorRT is not installed")
    assert chosen == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    (record,) = caplog.records
    assert "TensorrtExecutionProvider left out: TensorRT is not installed" in record.message
    assert "using CUDAExecutionProvider" in record.message


def test_tensorrt_kept_first_when_its_library_loads(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert choose_providers(GPU_BUILD, trt_missing=lambda: None) == GPU_BUILD
    assert not caplog.records


def test_cpu_build_is_not_probed_for_tensorrt() -> None:
    def probe() -> str | None:
        raise AssertionError("TensorRT probed on a build without its provider")

    assert choose_providers(["CPUExecutionProvider"], trt_missing=probe) == [
        "CPUExecutionProvider"
    ]


def test_tensorrt_missing_names_the_library_and_the_loader_error() -> None:
    def fail(name: str) -> object:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    reason = tensorrt_missing(load=fail)
    assert reason is not None
    assert ort_engine.TENSORRT_LIBRARY in reason and "cannot open shared object" in reason
    assert tensorrt_missing(load=lambda name: object()) is None
