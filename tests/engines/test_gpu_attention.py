"""A fused graph with float32 activations under ONNX Runtime's CUDA provider runs its
GroupQueryAttention on the CPU (the CUDA kernel is float16/bfloat16 only) and copies the KV
cache over PCIe every step: seen on an H100 (issue #13). The loader says so once, with the
fix; it decides from the session's providers and the manifest's graph entry alone."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from edge_runtime.bundle.manifest import GraphSpec, verify_bundle
from edge_runtime.engines.load import cpu_attention_warning, load_engine
from edge_runtime.signing import load_public_key

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
TRT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def specs(tiny_bundle, tiny_fused_bundle: Path) -> dict[str, GraphSpec]:  # type: ignore[no-untyped-def]
    keys = [load_public_key(tiny_bundle.pubkey)]
    fused = verify_bundle(tiny_fused_bundle, keys).graph("decoder")
    plain = verify_bundle(tiny_bundle.path, keys).graph("decoder")
    assert fused.right_padded_batch and not plain.right_padded_batch
    assert fused.kv_cache is not None and fused.kv_cache.dtype == "float32"
    half = dataclasses.replace(fused, kv_cache=dataclasses.replace(fused.kv_cache,
                                                                   dtype="float16"))
    return {"fused": fused, "unfused": plain, "fused-fp16": half}


@pytest.mark.parametrize(("providers", "graph", "warns"), [
    (CUDA, "fused", True),
    (TRT, "fused", True),  # TensorRT takes no com.microsoft operator either
    (CPU, "fused", False),  # the CPU's own kernels: float32 is what they want
    (CUDA, "unfused", False),  # decomposed attention runs on CUDA in float32
    (CUDA, "fused-fp16", False),  # the fix: fuse.activations = "float16"
])
def test_the_warning_is_for_fp32_fused_attention_on_a_gpu(
        specs: dict[str, GraphSpec], providers: list[str], graph: str, warns: bool) -> None:
    msg = cpu_attention_warning(providers, specs[graph], "decoder")
    assert (msg is not None) == warns
    if msg is not None:
        assert "runs on the CPU" in msg and "KV cache is copied" in msg
        assert 'fuse.activations = "float16"' in msg and providers[0] in msg
        assert specs[graph].file in msg


def test_a_cpu_session_loads_the_fused_graph_without_the_warning(
        tiny_bundle, tiny_fused_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    bundle = verify_bundle(tiny_fused_bundle, [load_public_key(tiny_bundle.pubkey)])
    with caplog.at_level(logging.WARNING, logger="edge_runtime.engines.load"):
        engine, _ = load_engine(bundle, backend="onnxruntime", threads=1)
    assert engine.providers == CPU  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if "GroupQueryAttention" in r.message]
