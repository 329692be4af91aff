"""Benchmark artifacts, built once and cached in the work dir.

Layout under the work dir (each step is skipped when its output exists; a step writes into a
temporary name and renames it into place, so an interrupted run never leaves a half artifact):

    hf-qwen2-0.5b-random/        Qwen2-0.5B shapes, random fp32 weights (seed 0) + a small
                                 byte-level BPE tokenizer trained on Python's stdlib sources
    stage-onnx/, stage-int4/     our pipeline's export and quantize stages (edge_build)
    bundle-int4-b128-acc4/       the signed bundle (MatMulNBits int4, block 128, symmetric,
                                 accuracy level 4, last-position logits)
    keys/                        the key pair that signs it
    llama.cpp-src/<version>/     llama-cpp-python sdist, for convert_hf_to_gguf.py + gguf-py
    gguf/model-f16.gguf          converter output
    gguf/model-q4_0.gguf         llama_model_quantize(..., LLAMA_FTYPE_MOSTLY_Q4_0)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

# Qwen2-0.5B's shapes (https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json).
QWEN2_05B_SHAPES: dict[str, object] = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
}
# Qwen2-1.5B's shapes (https://huggingface.co/Qwen/Qwen2-1.5B/blob/main/config.json): the size
# class the product targets (DeepSeek-R1-Distill-Qwen-1.5B has these shapes, untied head).
QWEN2_15B_SHAPES: dict[str, object] = {
    **QWEN2_05B_SHAPES,
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
}
SEED = 0
TOKENIZER_VOCAB = 8192
HF_DIR = "hf-qwen2-0.5b-random"
BUNDLE_DIR = "bundle-int4-b128-acc4"
FUSED_BUNDLE_DIR = "bundle-int4-b128-acc4-fused"
FUSED_FP16_BUNDLE_DIR = "bundle-int4-b128-acc4-fused-fp16"
GGUF_DIR = "gguf"
INT4_BLOCK_SIZE = 128
INT4_ACCURACY_LEVEL = 4


def add_bundle_args(ap: argparse.ArgumentParser) -> None:
    """The serving benchmarks' model options: the demo bundle (else edge-runtime serve's own,
    built if missing) and whether to add the Qwen2-0.5B-shape bundles built in --workdir."""
    ap.add_argument("--demo-bundle", type=Path,
                    help="the demo bundle (default: edge-runtime serve's, built if missing)")
    ap.add_argument("--demo-pubkey", type=Path)
    ap.add_argument("--no-qwen05", action="store_true", help="skip the Qwen2-0.5B shapes")
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/edge-bench"))


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _build_into(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmpdir)` and rename tmpdir to `final` (skipped when `final` exists)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- 1. random HF checkpoint + tokenizer ---------------------------------------------------


def _tokenizer_corpus(limit_bytes: int = 8 << 20) -> list[str]:
    """Local text to train the BPE on: the stdlib's own .py sources (sorted, deterministic)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def _save_tokenizer(out: Path) -> int:
    """Train a byte-level BPE and save it as a transformers fast tokenizer; return eos id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[eos, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=eos, bos_token=None, unk_token=None
    )
    fast.save_pretrained(out)
    eos_id = tok.token_to_id(eos)
    assert eos_id is not None
    return int(eos_id)


def build_hf_model(workdir: Path, shapes: dict[str, object] | None = None) -> Path:
    """Qwen2-0.5B-shaped model (or `shapes`) with random weights (torch.manual_seed(0)), fp32
    safetensors."""
    shapes = shapes or QWEN2_05B_SHAPES

    def build(tmp: Path) -> None:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        _log("training tokenizer (byte-level BPE on stdlib sources)")
        eos_id = _save_tokenizer(tmp)
        _log(f"building Qwen2 model of {shapes['num_hidden_layers']} layers x "
             f"{shapes['hidden_size']} with random weights (seed 0)")
        torch.manual_seed(SEED)
        config = Qwen2Config(**shapes, bos_token_id=eos_id, eos_token_id=eos_id)
        config.dtype = torch.float32
        model = Qwen2ForCausalLM(config).eval()
        model.generation_config.eos_token_id = eos_id
        model.generation_config.bos_token_id = eos_id
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "bench_model.json").write_text(
            json.dumps({"seed": SEED, "shapes": shapes, "eos_id": eos_id}, indent=2)
        )

    return _build_into(workdir / HF_DIR, build)


# --- 2. the int4 bundle, made by our own pipeline -------------------------------------------


def build_bundle(workdir: Path, hf_dir: Path, name: str = "qwen2-0.5b-shapes") -> Path:
    """export → quantize (RTN, block 128, accuracy level 4) → package, via `edge_build`.

    Both "ours" and "ort-bare" run the bundle's decoder graph, so the comparison isolates the
    generator's overhead; the graph is what a user of this project would actually ship.
    """
    final = workdir / BUNDLE_DIR
    if (final / "manifest.json").is_file():
        return final
    from edge_build import export, package, quantize
    from edge_build.corpus import stdlib_corpus
    from edge_build.evaluate import eval_windows
    from edge_runtime.signing import generate_keypair

    keys = workdir / "keys"
    if not (keys / "bench.key").is_file():
        generate_keypair(keys / "bench.key", keys / "bench.pub", overwrite=True)
    onnx_dir, int4_dir = workdir / "stage-onnx", workdir / "stage-int4"
    if not (onnx_dir / "stage.json").is_file():
        _log("export: Optimum, text-generation-with-past, checked against PyTorch")
        export.run(hf_dir, onnx_dir)
    if not (int4_dir / "stage.json").is_file():
        _log(f"quantize: int4 RTN, block {INT4_BLOCK_SIZE}, accuracy level {INT4_ACCURACY_LEVEL}")
        windows = eval_windows(hf_dir / "tokenizer.json", stdlib_corpus().heldout, 4, 128)
        quantize.run(onnx_dir, int4_dir, eval_windows=windows, block_size=INT4_BLOCK_SIZE,
                     accuracy_level=INT4_ACCURACY_LEVEL, symmetric=True)
    _log("package: signed bundle")
    return package.run(int4_dir, final, keys / "bench.key", name=name,
                       version="bench", context_length=4096, overwrite=True)


def build_fused_bundle(workdir: Path, hf_dir: Path, name: str = "qwen2-0.5b-shapes") -> Path:
    """The same int4 graph after `edge_build.fuse` (GroupQueryAttention, fused norms)."""
    final = workdir / FUSED_BUNDLE_DIR
    if (final / "manifest.json").is_file():
        return final
    build_bundle(workdir, hf_dir, name)
    from edge_build import fuse, package

    fused_dir = workdir / "stage-int4-fused"
    if not (fused_dir / "stage.json").is_file():
        _log("fuse: GroupQueryAttention + SkipSimplifiedLayerNormalization")
        fuse.run(workdir / "stage-int4", fused_dir, max_positions=4096)
    _log("package: signed fused bundle")
    return package.run(fused_dir, final, workdir / "keys" / "bench.key",
                       name=f"{name}-fused", version="bench", context_length=4096,
                       overwrite=True)


def build_fused_fp16_bundle(workdir: Path, hf_dir: Path, name: str = "qwen2-0.5b-shapes") -> Path:
    """The fused int4 graph with fp16 activations, KV cache and logits (edge_build.fp16, the
    pipeline's stage; MatMulNBits scales become fp16): ONNX Runtime's CUDA
    GroupQueryAttention takes fp16/bf16 only, so on a GPU the fp32 fused graph runs its
    attention on the CPU."""
    final = workdir / FUSED_FP16_BUNDLE_DIR
    if (final / "manifest.json").is_file():
        return final
    build_fused_bundle(workdir, hf_dir, name)
    from edge_build import fp16, package

    src, stage = workdir / "stage-int4-fused", workdir / "stage-int4-fused-fp16"
    if not (stage / "stage.json").is_file():
        # The pipeline's stage (fuse.activations = "float16"). Its greedy agreement is
        # recorded in stage.json but not gated: these weights are random, their logits
        # near-tied everywhere, so float16 rounding flips tokens that say nothing of the
        # conversion (the pipeline gates it on trained models).
        _log("fp16: activations, cache and logits of the fused graph to float16")
        fp16.run(src, stage, check_tokens=8, min_top1=0.0)
    _log("package: signed fused fp16 bundle")
    return package.run(stage, final, workdir / "keys" / "bench.key",
                       name=f"{name}-fused-fp16", version="bench", context_length=4096,
                       overwrite=True)


# --- 3. GGUF Q4_0 ----------------------------------------------------------------------------


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def fetch_llama_cpp_sources(workdir: Path, version: str) -> Path:
    """The vendored llama.cpp tree (convert_hf_to_gguf.py, gguf-py) of the installed version.

    Downloads the llama-cpp-python sdist of exactly `version` with pip (PyPI, no build) and
    extracts only what the converter needs.
    """

    def build(tmp: Path) -> None:
        _log(f"downloading llama-cpp-python=={version} sdist for convert_hf_to_gguf.py")
        dl = tmp / "dl"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(dl),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (sdist,) = list(dl.glob("*.tar.gz"))
        wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/vendor/llama.cpp/", 1)
                if len(parts) == 2 and parts[1].startswith(wanted):
                    m.name = parts[1]
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(dl)
        if not (tmp / "convert_hf_to_gguf.py").exists():
            raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")

    return _build_into(workdir / "llama.cpp-src" / version, build)


# Run by a subprocess: imports the converter and makes its BPE pre-tokenizer check accept our
# home-made tokenizer. The converter hashes the token ids of a check string and looks the hash
# up in a table of known tokenizers; a tokenizer trained here is in no table, so pin "qwen2"
# (the model's own pre-tokenizer; the regex only matters for text -> ids, and the benchmark
# feeds ids). Also lets the SentencePiece probe fail as "no tokenizer.model" without the
# sentencepiece package. Handles the split layout (conversion/base.py, 2025+) and the
# monolithic one.
_CONVERTER_SHIM = r"""
import sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
sys.path.insert(1, src + "/gguf-py")
patched = []
def _pre(self, tokenizer):
    return "qwen2"
def _wrap_sp(orig):
    # Qwen2's set_vocab tries SentencePiece first and falls back to BPE only on
    # FileNotFoundError, but imports sentencepiece before looking for tokenizer.model:
    # without the package installed that is a ModuleNotFoundError. Look first.
    def create(self, *a, **k):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(self.dir_model / "tokenizer.model")
        return orig(self, *a, **k)
    return create
def _patch(cls, where):
    cls.get_vocab_base_pre = _pre
    if hasattr(cls, "_create_vocab_sentencepiece"):
        cls._create_vocab_sentencepiece = _wrap_sp(cls._create_vocab_sentencepiece)
    patched.append(where)
try:
    import conversion.base as base
    _patch(base.TextModel, "conversion.base.TextModel")
except ImportError:
    pass
import convert_hf_to_gguf as conv
for cls_name in ("TextModel", "Model"):
    cls = getattr(conv, cls_name, None)
    if cls is not None and hasattr(cls, "get_vocab_base_pre") and not patched:
        _patch(cls, "convert_hf_to_gguf." + cls_name)
if not patched:
    raise SystemExit("could not find get_vocab_base_pre to patch in convert_hf_to_gguf")
print("patched get_vocab_base_pre -> 'qwen2' in", patched, file=sys.stderr)
sys.argv[0] = conv.__file__
conv.main()
"""


def build_gguf_f16(workdir: Path, hf_dir: Path) -> Path:
    out = workdir / GGUF_DIR / "model-f16.gguf"
    if out.exists():
        return out
    src = fetch_llama_cpp_sources(workdir, llama_cpp_version())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    _log("converting HF checkpoint to GGUF f16 (convert_hf_to_gguf.py)")
    env = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the shim puts the vendored gguf-py on the path
    log_path = out.parent / "convert.log"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _CONVERTER_SHIM,
                str(src),
                str(hf_dir),
                "--outfile",
                str(tmp),
                "--outtype",
                "f16",
            ],
            check=False,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeError(f"convert_hf_to_gguf.py failed (log: {log_path}):\n" + "\n".join(tail))
    tmp.rename(out)
    return out


def build_gguf_q4_0(workdir: Path, hf_dir: Path, threads: int) -> Path:
    out = workdir / GGUF_DIR / "model-q4_0.gguf"
    if out.exists():
        return out
    f16 = build_gguf_f16(workdir, hf_dir)
    import llama_cpp

    _log("quantizing GGUF to Q4_0 (llama_model_quantize)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    tmp = out.with_suffix(".tmp.gguf")
    rc = llama_cpp.llama_model_quantize(
        str(f16).encode(), str(tmp).encode(), llama_cpp.byref(params)
    )
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with code {rc}")
    tmp.rename(out)
    return out
