"""Everything around TensorRT that runs without it: the plan cache, graph selection, the
`auto` fallback, `build-engine`'s refusals, the self-test's verdicts and CUDA buffer pooling.

TensorRT itself is never imitated here: where a test needs "tensorrt is absent" on a machine
that might have it, `sys.modules["tensorrt"] = None` makes the import fail for real. The path
through the library is checked by scripts/trt_selftest.py on a GPU.
"""

from __future__ import annotations

import enum
import gc
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_runtime.bundle.manifest import Bundle, Manifest, verify_bundle, write_bundle
from edge_runtime.cli import main
from edge_runtime.engines.cuda_mem import BufferPool, CudaTensor, check, size_class
from edge_runtime.engines.load import load_engine
from edge_runtime.engines.trt_cache import (
    BUILD_RECIPE,
    CACHE_ENV,
    PlanRecord,
    Target,
    check_precision,
    default_cache_dir,
    find_plan,
    graph_sha256,
    plan_key,
    plan_paths,
    select_graph,
    write_record,
)
from edge_runtime.engines.trt_plan import ProfileLimits
from edge_runtime.errors import ConfigError, EngineError
from edge_runtime.signing import load_private_key, load_public_key

ROOT = Path(__file__).resolve().parents[2]
ORIN = Target(trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
LIMITS = ProfileLimits(max_batch=4, max_context=1024)


def manifest_dict(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def qdq_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle plus a graph marked as TensorRT's (weights.format "qdq"), signed with
    the same key. Its file is the serving graph itself: nothing here parses it, the tests only
    need the manifest to name a graph TensorRT would take."""
    src = tiny_bundle.path
    fields = manifest_dict(src)
    files = {rel: src / rel for rel in fields.pop("files")}
    fields.pop("schema_version")
    trt_graph = dict(fields["graphs"]["decoder"])
    trt_graph["weights"] = {"dtype": "int4", "format": "qdq", "block_size": 32, "symmetric": True}
    fields["graphs"]["decoder_trt"] = trt_graph
    out = tmp_path_factory.mktemp("qdq") / "bundle"
    return write_bundle(out, files, fields, load_private_key(tiny_bundle.key))


def verified(path: Path, pubkey: Path) -> Bundle:
    return verify_bundle(path, [load_public_key(pubkey)])


def fake_record(cache: Path, sha: str, target: Target = ORIN, limits: ProfileLimits = LIMITS,
                recipe: int = BUILD_RECIPE) -> PlanRecord:  # fmt: skip
    """A cache entry as build-engine writes it; the plan bytes are not a plan (never read)."""
    key = plan_key(sha, target, limits, "fp16")
    plan, _ = plan_paths(cache, key)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"not a plan")
    record = PlanRecord(key=key, graph="decoder_trt", graph_sha256=sha, target=target,
                        profile=limits.as_dict(), precision="fp16", build_recipe=recipe,
                        plan_bytes=10, plan_sha256="0" * 64, build_seconds=1.0)  # fmt: skip
    write_record(cache, record)
    return record


# -- cache keys and records -------------------------------------------------------------


def test_plan_key_covers_exactly_what_changes_the_plan():
    base = plan_key("a" * 64, ORIN, LIMITS, "fp16")
    assert base == plan_key("a" * 64, ORIN, LIMITS, "fp16")
    variants = [
        plan_key("b" * 64, ORIN, LIMITS, "fp16"),
        plan_key("a" * 64, replace(ORIN, trt_version="10.4.0"), LIMITS, "fp16"),
        plan_key("a" * 64, replace(ORIN, gpu_name="Orin (nvgpu)"), LIMITS, "fp16"),
        plan_key("a" * 64, replace(ORIN, compute_capability="8.6"), LIMITS, "fp16"),
        plan_key("a" * 64, ORIN, ProfileLimits(max_batch=8, max_context=1024), "fp16"),
        plan_key("a" * 64, ORIN, ProfileLimits(4, 1024, opt_context=128), "fp16"),
        plan_key("a" * 64, ORIN, LIMITS, "fp32"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_find_plan_picks_this_targets_widest_plan_and_skips_foreign_files(tmp_path):
    cache = tmp_path / "cache"
    sha = "c" * 64
    assert find_plan(cache, sha) is None  # no cache directory yet
    small = fake_record(cache, sha, limits=ProfileLimits(2, 512))
    wide = fake_record(cache, sha, limits=ProfileLimits(8, 1024))
    other_gpu = fake_record(cache, sha, target=replace(ORIN, gpu_name="RTX 4090",
                                                       compute_capability="8.9"))  # fmt: skip
    fake_record(cache, sha, limits=ProfileLimits(16, 1024), recipe=BUILD_RECIPE - 1)  # stale
    orphan = fake_record(cache, sha, limits=ProfileLimits(32, 1024))
    plan_paths(cache, orphan.key)[0].unlink()  # a record whose plan is gone: not usable
    (cache / "junk.json").write_text("{not json")
    (cache / "timing-x.cache").write_bytes(b"\0")
    assert find_plan(cache, sha, ORIN) == wide
    assert find_plan(cache, sha, other_gpu.target) == other_gpu
    assert find_plan(cache, sha) in (wide, other_gpu)  # "does any plan exist" (no tensorrt)
    assert find_plan(cache, "d" * 64) is None
    assert find_plan(cache, sha, replace(ORIN, trt_version="10.7.0")) is None
    assert small != wide


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "plans"))
    assert default_cache_dir() == tmp_path / "plans"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "edge-runtime" / "trt"


# -- which graph TensorRT builds ---------------------------------------------------------


def test_select_graph_refuses_an_ort_only_bundle_saying_why(tiny_bundle):
    m = Manifest.from_dict(manifest_dict(tiny_bundle.path))
    with pytest.raises(EngineError) as e:
        select_graph(m)
    assert "MatMulNBits" in str(e.value) and "--format qdq" in str(e.value)


def test_select_graph_refuses_a_fused_gqa_bundle(tiny_fused_bundle):
    m = Manifest.from_dict(manifest_dict(tiny_fused_bundle))
    with pytest.raises(EngineError, match=r"MatMulNBits|GroupQueryAttention"):
        select_graph(m)
    d = manifest_dict(tiny_fused_bundle)
    d["graphs"]["decoder"]["weights"] = {"dtype": "float32"}  # a float fused graph
    with pytest.raises(EngineError, match="fused GroupQueryAttention graph"):
        select_graph(Manifest.from_dict(d))


def test_select_graph_prefers_the_qdq_graph_then_a_float_one(qdq_bundle, tiny_bundle):
    name, graph = select_graph(Manifest.from_dict(manifest_dict(qdq_bundle)))
    assert name == "decoder_trt" and graph.weights["format"] == "qdq"
    d = manifest_dict(tiny_bundle.path)
    d["graphs"]["decoder"]["weights"] = {"dtype": "float32"}
    assert select_graph(Manifest.from_dict(d))[0] == "decoder"


def test_a_bundle_packaged_from_the_fp32_export_is_tensorrts_as_is(tiny_bundle, tmp_path,
                                                                   capsys, monkeypatch):
    """The float route that works before int4 bundles carry a QDQ graph (and the one
    `trt_selftest.py --make-demo` takes): `package` on the fp32 export."""
    pytest.importorskip("torch")
    from edge_build import package

    out = package.run(tiny_bundle.work / "onnx", tmp_path / "fp32", tiny_bundle.key,
                      name="fp32", version="1", probe_spec=None)  # fmt: skip
    m = Manifest.from_dict(manifest_dict(out))
    name, graph = select_graph(m)
    assert name == "decoder" and graph.weights == {"dtype": "float32"}
    assert check_precision("auto", graph) == "fp16"
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", str(out), "--pubkey", str(tiny_bundle.pubkey)]) == 1
    assert "needs tensorrt" in capsys.readouterr().err  # selected, then stopped at the import


def test_precision_follows_the_graph(qdq_bundle):
    m = Manifest.from_dict(manifest_dict(qdq_bundle))
    qdq, plain = m.graphs["decoder_trt"], replace(m.graphs["decoder"], weights={})
    assert check_precision("auto", qdq) == "strongly-typed"
    assert check_precision("auto", plain) == "fp16"
    assert check_precision("fp32", plain) == "fp32"
    with pytest.raises(ConfigError, match=r"explicitly quantized .* not with precision 'fp16'"):
        check_precision("fp16", qdq)
    with pytest.raises(ConfigError, match="precision 'int8' is not one of"):
        check_precision("int8", plain)


# -- load_engine ------------------------------------------------------------------------


def test_auto_without_a_plan_uses_ort_and_never_imports_tensorrt(tiny_bundle, tmp_path):
    code = (
        "import sys; from pathlib import Path; "
        "from edge_runtime.bundle.manifest import verify_bundle; "
        "from edge_runtime.engines.load import load_engine; "
        "from edge_runtime.signing import load_public_key; "
        f"b = verify_bundle(Path({str(tiny_bundle.path)!r}), "
        f"[load_public_key(Path({str(tiny_bundle.pubkey)!r}))]); "
        "e, g = load_engine(b); "
        "print(e.name, g.file, 'tensorrt' in sys.modules, 'cuda' in sys.modules)"
    )
    env = {"PATH": "/usr/bin:/bin", CACHE_ENV: str(tmp_path / "empty"),
           "PYTHONPATH": ":".join(sys.path)}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()  # fmt: skip
    assert out[0].startswith("onnxruntime:") and out[1:] == ["model/decoder.onnx", "False", "False"]


def test_auto_with_a_plan_but_no_tensorrt_falls_back_to_ort(qdq_bundle, tiny_bundle, tmp_path,
                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # absent here, whatever is installed
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    m = Manifest.from_dict(manifest_dict(qdq_bundle))
    fake_record(tmp_path / "cache", graph_sha256(m, m.graphs["decoder_trt"]))
    bundle = verified(qdq_bundle, tiny_bundle.pubkey)
    engine, graph = load_engine(bundle)
    assert engine.name.startswith("onnxruntime:") and graph.file == "model/decoder.onnx"
    with pytest.raises(EngineError) as e:
        load_engine(bundle, backend="tensorrt")
    assert "needs tensorrt" in str(e.value) and "python3-libnvinfer" in str(e.value)


def test_backend_tensorrt_on_an_ort_only_bundle_says_what_to_package(tiny_bundle):
    bundle = verified(tiny_bundle.path, tiny_bundle.pubkey)
    with pytest.raises(EngineError, match="ships only an ONNX Runtime graph"):
        load_engine(bundle, backend="tensorrt")
    with pytest.raises(EngineError, match=r"unknown engine backend 'trt' \(known: auto"):
        load_engine(bundle, backend="trt")


# -- edge-runtime build-engine ----------------------------------------------------------


def test_build_engine_refusals_are_one_line_errors(tiny_bundle, qdq_bundle, capsys, monkeypatch):
    pub = str(tiny_bundle.pubkey)
    assert main(["build-engine", str(tiny_bundle.path), "--pubkey", pub]) == 1
    assert "ships only an ONNX Runtime graph" in capsys.readouterr().err
    assert main(["build-engine", str(qdq_bundle), "--pubkey", pub, "--profile",
                 "max_batch=0"]) == 1  # fmt: skip
    assert "max_batch must be >= 1, got 0" in capsys.readouterr().err
    assert main(["build-engine", str(qdq_bundle), "--pubkey", pub, "--profile",
                 "max_context=99999"]) == 1  # fmt: skip
    assert "max_context 99999 exceeds the bundle's context length" in capsys.readouterr().err
    assert main(["build-engine", str(qdq_bundle), "--pubkey", pub, "--precision",
                 "fp16"]) == 1  # fmt: skip
    assert "explicitly quantized" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", str(qdq_bundle), "--pubkey", pub]) == 1
    assert "python3-libnvinfer" in capsys.readouterr().err


def test_build_engine_verifies_the_bundle_first(qdq_bundle, tmp_path, capsys):
    from edge_runtime.signing import generate_keypair

    other = tmp_path / "other.pub"
    generate_keypair(tmp_path / "other.key", other)
    assert main(["build-engine", str(qdq_bundle), "--pubkey", str(other)]) == 1
    assert "which is not trusted" in capsys.readouterr().err


# -- the self-test script ---------------------------------------------------------------


def _selftest():
    spec = importlib.util.spec_from_file_location("trt_selftest", ROOT / "scripts" /
                                                  "trt_selftest.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["trt_selftest"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_selftest_exits_3_without_a_gpu_or_fails_clearly_with_one(tiny_bundle):
    st = _selftest()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "trt_selftest.py"), "--bundle",
         str(tiny_bundle.path), "--pubkey", str(tiny_bundle.pubkey)],
        check=False, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                             "PYTHONPATH": ":".join(sys.path)},
    )  # fmt: skip
    if st.gpu_missing() is not None:  # this machine: no TensorRT, no GPU
        assert proc.returncode == st.EXIT_NO_GPU == 3, proc.stdout + proc.stderr
        assert "SKIPPED — no TensorRT/GPU on this machine" in proc.stdout
    else:  # a GPU machine: the int4 ONNX Runtime bundle is refused by name
        assert proc.returncode == st.EXIT_FAIL, proc.stdout + proc.stderr
        assert "ships only an ONNX Runtime graph" in proc.stdout


def test_selftest_verdicts_quote_the_numbers():
    import numpy as np

    st = _selftest()
    ref = [np.array([1.0, 5.0, 2.0]), np.array([3.0, 0.0, 1.0])]
    same = st.compare(ref, [r.copy() for r in ref])
    assert same["rel"] == 0.0 and same["top1"] == 1.0
    tol = st.tolerance_for("fp16")
    assert st.failures(same, [True, True], True, tol) == []
    off = st.compare(ref, [np.array([1.0, 5.0, 2.5]), np.array([0.0, 3.5, 1.0])])
    assert off["max_abs"] == 3.5 and off["rel"] == 3.5 / 5.0 and off["top1"] == 0.5
    failed = st.failures(off, [True, False], False, tol)
    assert failed[0] == "relative max |Δlogits| 0.7000 > 0.03"
    assert failed[1] == "top-1 agreement 0.5000 < 0.98"
    assert "prompts [1]" in failed[2] and "batch-4" in failed[3]
    assert st.tolerance_for("fp32").rel_logits < tol.rel_logits
    assert st.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert st.common_prefix([1, 2], [1, 2, 3]) == 2


# -- CUDA helpers (pool policy and error mapping; no CUDA call) ---------------------------


class CudaErr(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def test_check_turns_cuda_errors_into_engine_errors():
    assert check((CudaErr.cudaSuccess, 1234), "cudaMalloc") == 1234
    assert check((CudaErr.cudaSuccess,), "cudaFree") is None
    assert check((CudaErr.cudaSuccess, 1, 2), "x") == (1, 2)
    with pytest.raises(EngineError, match=r"CUDA cudaMalloc failed: "
                       r"cudaErrorMemoryAllocation \(2\)"):  # fmt: skip
        check((CudaErr.cudaErrorMemoryAllocation, None), "cudaMalloc")


def test_size_classes():
    assert [size_class(n) for n in (0, 1, 256, 257, 1000, 4096, 4097)] == [
        256, 256, 256, 512, 1024, 4096, 8192]  # fmt: skip
    with pytest.raises(ValueError):
        size_class(-1)


def test_buffer_pool_reuses_released_buffers_within_its_idle_cap():
    mallocs, frees = [], []

    def malloc(n: int) -> int:
        mallocs.append(n)
        return 0x1000 * len(mallocs)

    pool = BufferPool(malloc, frees.append, max_idle_bytes=1024)
    a, cap = pool.acquire(300)
    assert cap == 512 and pool.live == 1
    pool.release(a, cap)
    assert pool.idle_bytes == 512 and pool.acquire(400) == (a, 512)  # reused, no cudaMalloc
    assert len(mallocs) == 1
    b, _ = pool.acquire(1000)
    pool.release(b, 1024)  # kept: exactly the idle cap
    assert frees == [] and pool.idle_bytes == 1024
    pool.release(a, 512)  # past the cap: freed at once
    assert frees == [a] and pool.idle_bytes == 1024
    pool.close()
    assert frees == [a, b] and pool.live == 0 and pool.idle_bytes == 0
    with pytest.raises(EngineError, match="closed"):
        pool.acquire(1)


def test_a_dropped_tensor_returns_its_buffer_to_the_pool():
    counter = iter(range(1, 100))
    pool = BufferPool(lambda n: next(counter) * 4096, lambda p: None)
    t = CudaTensor(pool, (2, 2, 0, 48), "float32")  # an empty KV cache still gets a buffer
    assert t.nbytes == 0 and t.ptr == 4096 and pool.live == 1
    ptr = t.ptr
    del t
    gc.collect()
    assert pool.live == 0 and pool.idle_bytes == 256
    u = CudaTensor(pool, (4, 8), "int64")
    assert u.ptr == ptr and u.nbytes == 256  # the step-before-last's buffer, reused
