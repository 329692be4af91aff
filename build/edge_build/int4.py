"""Group-wise 4-bit weights: the integer codes, their scales and zero points, and the file
that carries them from the model-space quantizer (awq.py) to the ONNX lowering (lower.py).

One layout everywhere, that of a PyTorch `Linear` weight W [N, K] (N outputs, K inputs):
groups of `group_size` consecutive inputs along K share a scale.

    codes        uint8 [N, K]   in 0..15
    scales       fp32  [N, G]   G = K / group_size, always > 0 (TensorRT requires it)
    zero_points  uint8 [N, G]   in 0..15; None when symmetric (implicitly 8)
    W ≈ (codes - zero_point) · scale

Symmetric codes are round(w / scale) + 8 with scale = absmax / 7 — the unsigned form of a
signed int4 in [-8, 7]; ONNX Runtime's MatMulNBits takes 8 as its default zero point, and the
QDQ form stores them signed (codes - 8) with no zero point. An embedding table [V, D] is the
same layout with N = V, K = D, which is why a tied LM head and its embedding share one set of
codes.

On disk (`quant.safetensors` + `quant.json`), codes are packed two per byte, low nibble
first — the order MatMulNBits and ONNX's INT4 use — so the file is what a 4-bit model weighs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.stage import StageError

QUANT_WEIGHTS = "quant.safetensors"
QUANT_INDEX = "quant.json"
FORMAT = "edge-int4/1"


@dataclass
class QTensor:
    """One quantized weight. Arrays are numpy (the ONNX side has no torch)."""

    codes: np.ndarray  # uint8 [N, K], 0..15
    scales: np.ndarray  # float32 [N, G]
    zero_points: np.ndarray | None  # uint8 [N, G], or None = symmetric (8)
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return int(n), int(k)

    def dequantize(self) -> np.ndarray:
        """fp32 [N, K], computed exactly as the fake-quant PyTorch model holds it."""
        n, k = self.shape
        zp = 8.0 if self.zero_points is None else self.zero_points.astype(np.float32)[..., None]
        q = self.codes.astype(np.float32).reshape(n, k // self.group_size, self.group_size)
        return ((q - zp) * self.scales[..., None]).reshape(n, k).astype(np.float32)


def check_group_size(group_size: int) -> None:
    if group_size < 16 or group_size & (group_size - 1):
        raise StageError(f"group_size must be a power of two >= 16, got {group_size}")


def _round(g: Any, symmetric: bool, clip: Any) -> tuple[Any, Any, Any]:
    """Groups g [N, G, gs] → (codes, scale, zero point), float tensors; codes in 0..15."""
    import torch

    ratio = 1.0 if clip is None else clip[..., None]
    if symmetric:
        absmax = g.abs().amax(-1, keepdim=True) * ratio  # [N, G, 1]
        scale = torch.where(absmax > 0, absmax / 7.0, torch.ones_like(absmax))
        zp = torch.full_like(scale, 8.0)
    else:
        hi = g.amax(-1, keepdim=True) * ratio
        lo = g.amin(-1, keepdim=True) * ratio
        scale = (hi - lo) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / scale), 0, 15)
    return torch.clamp(torch.round(g / scale) + zp, 0, 15), scale, zp


def _groups(w: Any, group_size: int) -> Any:
    n, k = w.shape
    if k % group_size:
        raise StageError(f"weight [{n}, {k}]: K={k} is not a multiple of group_size {group_size}")
    return w.detach().float().reshape(n, k // group_size, group_size)  # [N, G, gs]


def quantize_tensor(w: Any, group_size: int, symmetric: bool, clip: Any = None) -> QTensor:
    """Round-to-nearest of a torch weight [N, K] in groups along K. `clip` [N, G] (optional)
    shrinks each group's range before rounding (AWQ's clipping search picks it)."""
    import torch

    n, k = w.shape
    q, scale, zp = _round(_groups(w, group_size), symmetric, clip)
    return QTensor(
        codes=q.reshape(n, k).to(torch.uint8).cpu().numpy(),
        scales=scale[..., 0].cpu().numpy().astype(np.float32),
        zero_points=None if symmetric else zp[..., 0].to(torch.uint8).cpu().numpy(),
        group_size=group_size,
    )


def fake_quantize(w: Any, group_size: int, symmetric: bool, clip: Any = None) -> Any:
    """quantize → dequantize, in torch on w's device: the searches' inner loop. Same
    arithmetic as QTensor.dequantize, so the numbers agree bit for bit."""
    q, scale, zp = _round(_groups(w, group_size), symmetric, clip)
    return ((q - zp) * scale).reshape(w.shape)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 [..., K] of 0..15 → uint8 [..., K/2], element 2i in the low nibble."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


@dataclass
class QuantizedWeights:
    """Every quantized weight of a model, by HF parameter owner (module name)."""

    tensors: dict[str, QTensor]
    kinds: dict[str, str]  # module → "linear" | "embedding"
    aliases: dict[str, str]  # module → module whose codes it shares (a tied LM head)
    meta: dict[str, Any]  # method, group_size, symmetric, bits

    def get(self, module: str) -> QTensor:
        return self.tensors[self.aliases.get(module, module)]

    def modules(self) -> list[str]:
        return sorted([*self.tensors, *self.aliases])

    def save(self, root: Path) -> None:
        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {}
        for name, qt in self.tensors.items():
            arrays[f"{name}.qweight"] = pack_nibbles(qt.codes)
            arrays[f"{name}.scales"] = qt.scales
            if qt.zero_points is not None:
                arrays[f"{name}.zero_points"] = qt.zero_points
        save_file(arrays, str(Path(root) / QUANT_WEIGHTS))
        index = {
            "format": FORMAT,
            **self.meta,
            "modules": {
                name: {"kind": self.kinds[name], "shape": list(self.get(name).shape),
                       **({"same_as": self.aliases[name]} if name in self.aliases else {})}
                for name in self.modules()
            },
        }  # fmt: skip
        (Path(root) / QUANT_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> QuantizedWeights:
        from safetensors.numpy import load_file

        idx_file, w_file = Path(root) / QUANT_INDEX, Path(root) / QUANT_WEIGHTS
        if not idx_file.is_file() or not w_file.is_file():
            raise StageError(
                f"{root} has no {QUANT_INDEX} / {QUANT_WEIGHTS}: not a quantize artifact "
                "(run `edge-build quantize` on the HF model first)"
            )
        index = json.loads(idx_file.read_text())
        if index.get("format") != FORMAT:
            raise StageError(f"{idx_file}: format {index.get('format')!r}, expected {FORMAT!r}")
        arrays = load_file(str(w_file))
        gs = int(index["group_size"])
        tensors, kinds, aliases = {}, {}, {}
        for name, entry in index["modules"].items():
            kinds[name] = entry["kind"]
            if "same_as" in entry:
                aliases[name] = entry["same_as"]
                continue
            tensors[name] = QTensor(
                codes=unpack_nibbles(arrays[f"{name}.qweight"]),
                scales=arrays[f"{name}.scales"],
                zero_points=arrays.get(f"{name}.zero_points"),
                group_size=gs,
            )
        meta = {k: v for k, v in index.items() if k not in ("format", "modules")}
        return cls(tensors, kinds, aliases, meta)
