"""The model bundle: the contract between the offline pipeline and the daemon.

A bundle is a directory with `manifest.json` at its root and `manifest.sig` beside it:

    manifest.json   what the bundle is: name, version, task, tokenizer, generation defaults,
                    the I/O spec of each graph, every file with size and SHA-256, the build
                    record (each stage's parameters and metrics) and the engines that exist
    manifest.sig    detached ed25519 signature over manifest.json's exact bytes
    ...             the files the manifest lists (graphs, tokenizer, reference data)

`load_bundle` verifies before anything else: the signature against trusted keys, then each
listed file's size and hash, and refuses files the manifest does not list. The first problem
found is raised as a `BundleError` subclass naming the file. `write_bundle` builds the whole
directory under a temporary name and renames it into place, so a crash never leaves a
half-written bundle under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime import signing
from edge_runtime.atomic import atomic_write_bytes, fsync_dir
from edge_runtime.errors import BundleError, BundleIntegrityError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
TASKS = ("text-generation",)
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Symbolic dims are strings (`"batch"`), fixed ones ints."""

    name: str
    dtype: str
    shape: list[str | int]


@dataclass(frozen=True)
class KVCacheSpec:
    """How a decoder graph carries its KV cache, so a generator needs no name guessing.

    Past inputs and present outputs are named by templates with `{layer}`; tensors are
    [batch, num_kv_heads, seq, head_dim].
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"


@dataclass(frozen=True)
class GraphSpec:
    """A graph file and its interface. `weights` says how it was quantized."""

    file: str
    format: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kv_cache: KVCacheSpec | None = None
    # `logits` covers only the last position ([batch, 1, vocab]) when True: serving needs
    # nothing else, and full-prompt logits would cost prompt_len x vocab floats per prefill.
    last_token_logits: bool = False
    left_padded_batch: bool = True
    """The graph decodes a left-padded batch correctly (continuous batching). False for
    fused GroupQueryAttention graphs, whose kernel assumes right-padded KV."""
    right_padded_batch: bool = False
    """The graph decodes a right-padded batch correctly: GroupQueryAttention reads each
    row's length from the mask (`seqlens_k`) and writes its new key/value right after it."""
    weights: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizerSpec:
    """Tokenizer files (HF `tokenizer.json` format) and the chat template to render prompts."""

    file: str
    config_file: str | None
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: list[int]
    context_length: int
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    pad_token_id: int | None = None


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class EngineEntry:
    """A compiled engine and the one target it is valid for (TensorRT is not portable)."""

    graph: str
    file: str
    backend: str
    compute_capability: str
    backend_version: str
    precision: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    task: str
    tokenizer: TokenizerSpec
    generation: GenerationDefaults
    graphs: dict[str, GraphSpec]
    files: dict[str, FileEntry]
    build: dict[str, Any] = field(default_factory=dict)
    engines: list[EngineEntry] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """Parse and validate; every problem is a BundleError naming the key."""
        try:
            version = d["schema_version"]
            if version != SCHEMA_VERSION:
                raise BundleError(
                    f"manifest schema_version {version} is not supported "
                    f"(this runtime reads {SCHEMA_VERSION})"
                )
            if d["task"] not in TASKS:
                raise BundleError(f"manifest task {d['task']!r} is not one of {TASKS}")
            graphs = {}
            for gname, g in d["graphs"].items():
                kv = g.get("kv_cache")
                graphs[gname] = GraphSpec(
                    file=g["file"],
                    format=g["format"],
                    inputs=[TensorSpec(**t) for t in g["inputs"]],
                    outputs=[TensorSpec(**t) for t in g["outputs"]],
                    kv_cache=KVCacheSpec(**kv) if kv else None,
                    last_token_logits=bool(g.get("last_token_logits", False)),
                    left_padded_batch=bool(g.get("left_padded_batch", True)),
                    right_padded_batch=bool(g.get("right_padded_batch", False)),
                    weights=dict(g.get("weights", {})),
                )
            return cls(
                schema_version=version,
                name=str(d["name"]),
                version=str(d["version"]),
                task=d["task"],
                tokenizer=TokenizerSpec(**d["tokenizer"]),
                generation=GenerationDefaults(**d["generation"]),
                graphs=graphs,
                files={k: FileEntry(**v) for k, v in d["files"].items()},
                build=dict(d.get("build", {})),
                engines=[EngineEntry(**e) for e in d.get("engines", [])],
            )
        except KeyError as e:
            raise BundleError(f"manifest is missing required key {e}") from e
        except (TypeError, AttributeError) as e:
            raise BundleError(f"manifest has a malformed entry: {e}") from e


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest
    signer: str

    def path(self, rel: str) -> Path:
        return self.root / rel

    def graph(self, name: str = "decoder") -> GraphSpec:
        try:
            return self.manifest.graphs[name]
        except KeyError:
            raise BundleError(
                f"bundle has no graph {name!r} (has {sorted(self.manifest.graphs)})"
            ) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _bundle_files(root: Path) -> list[str]:
    """Every file under `root` (bundle-relative, sorted), refusing anything but plain files and
    directories. A symlink is refused wherever it is (the manifest, the signature, a graph, a
    directory): it would let the bytes that were verified differ from the bytes that are
    loaded, or point the loader outside the bundle. The root itself may be a link the operator
    made (`current -> v2`); what it holds may not."""
    found: list[str] = []
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as entries:
            for e in entries:
                path = Path(e.path)
                rel = path.relative_to(root).as_posix()
                if e.is_symlink():
                    raise BundleIntegrityError(
                        f"{rel}: is a symbolic link (to {os.readlink(path)}); a bundle holds "
                        "only plain files and directories",
                        rel,
                    )
                if e.is_dir(follow_symlinks=False):
                    stack.append(path)
                elif e.is_file(follow_symlinks=False):
                    found.append(rel)
                else:
                    raise BundleIntegrityError(
                        f"{rel}: is not a plain file (a socket, FIFO or device)", rel
                    )
    return sorted(found)


def verify_bundle(root: str | os.PathLike[str], trusted: list[Ed25519PublicKey]) -> Bundle:
    """Verify signature, then every file; raise on the first problem, naming it."""
    root = Path(root)
    manifest_path, sig_path = root / MANIFEST, root / SIGNATURE
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a directory")
    on_disk = _bundle_files(root)  # first: no symlink is followed, not even to the manifest
    for p in (manifest_path, sig_path):
        if p.name not in on_disk:
            raise BundleIntegrityError(f"bundle {root} has no {p.name}", p.name)
    raw = manifest_path.read_bytes()
    signer = signing.verify(raw, sig_path.read_bytes(), trusted)
    try:
        manifest = Manifest.from_dict(json.loads(raw))
    except json.JSONDecodeError as e:
        raise BundleError(f"{MANIFEST} is not valid JSON: {e}") from e
    for rel, entry in sorted(manifest.files.items()):
        p = root / rel
        # A listed path must stay inside the bundle and be a plain file.
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BundleIntegrityError(f"manifest lists a path outside the bundle: {rel}", rel)
        if Path(rel).as_posix() not in on_disk:
            raise BundleIntegrityError(f"{rel}: missing from the bundle", rel)
        size = p.stat().st_size
        if size != entry.size:
            raise BundleIntegrityError(f"{rel}: size {size} bytes, manifest says {entry.size}", rel)
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise BundleIntegrityError(
                f"{rel}: SHA-256 {digest[:16]}… does not match the manifest's {entry.sha256[:16]}…",
                rel,
            )
    listed = {Path(r).as_posix() for r in manifest.files}
    for rel in on_disk:
        if rel not in listed and rel not in (MANIFEST, SIGNATURE):
            raise BundleIntegrityError(f"{rel}: file is not listed in the manifest", rel)
    for gname, g in manifest.graphs.items():
        if g.file not in manifest.files:
            raise BundleError(f"graph {gname!r} file {g.file} is not listed in the manifest")
    return Bundle(root=root, manifest=manifest, signer=signer)


def write_bundle(
    out: str | os.PathLike[str],
    files: Mapping[str, Path],
    manifest_fields: Mapping[str, Any],
    key: Ed25519PrivateKey,
    overwrite: bool = False,
) -> Path:
    """Copy `files` (bundle-relative name -> source path) into a new signed bundle at `out`.

    `manifest_fields` holds everything but `files` and `schema_version`, which are computed.
    The bundle is assembled in a sibling temporary directory and renamed into place.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for rel, src in sorted(files.items()):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())
            entries[rel] = {"size": dst.stat().st_size, "sha256": sha256_file(dst)}
        manifest = Manifest.from_dict(
            {**manifest_fields, "files": entries, "schema_version": SCHEMA_VERSION}
        )
        raw = manifest.to_json()
        atomic_write_bytes(tmp / MANIFEST, raw)
        atomic_write_bytes(tmp / SIGNATURE, signing.sign(raw, key))
        for d in sorted({(tmp / r).parent for r in files}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        if out.exists():
            # Swap aside then remove: the final name never points at a partial bundle.
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
