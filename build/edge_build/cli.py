"""`edge-build`: the offline pipeline's command line.

    edge-build keygen   --out DIR [--name NAME]       ed25519 signing key pair
    edge-build export   MODEL_DIR OUT                 HF causal LM → ONNX with KV cache
    edge-build quantize HF_DIR OUT [--method awq|rtn] HF model → 4-bit, fake-quant + codes
    edge-build lower    ONNX QUANT OUT [--format F]   export of it → MatMulNBits or QDQ INT4
    edge-build quantize ONNX_DIR OUT                  fp32 ONNX → 4-bit MatMulNBits (RTN)
    edge-build fuse     IN OUT                        attention → GroupQueryAttention
    edge-build package  IN OUT --key KEY --name N     artifact → signed bundle
    edge-build distill  TEACHER OUT [--data F...]     teacher → shallower distilled student
    edge-build prune    IN OUT [--mlp-ratio R ...]    structured width / depth pruning
    edge-build demo     --out DIR [--preset default]  a local demo model, end to end
    edge-build run      --recipe models/NAME.toml     a recipe's whole chain, cached and gated

Every failure the user can fix is an `EdgeError`: printed as one line, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.errors import EdgeError


def _print_record(record: dict) -> None:
    print(
        json.dumps(
            {"stage": record["stage"], "metrics": record["metrics"], "seconds": record["seconds"]},
            indent=2,
        )
    )


def _windows(artifact: Path, count: int, length: int, text_file: Path | None) -> list[list[int]]:
    from edge_build.corpus import stdlib_corpus
    from edge_build.evaluate import eval_windows

    texts = [text_file.read_text()] if text_file else stdlib_corpus().heldout
    windows = eval_windows(artifact / "tokenizer.json", texts, count=count, length=length)
    if not windows:
        raise EdgeError(f"no {length}-token evaluation window could be cut from the text")
    return windows


def cmd_keygen(a: argparse.Namespace) -> None:
    from edge_runtime.signing import generate_keypair

    out = Path(a.out)
    kid = generate_keypair(out / f"{a.name}.key", out / f"{a.name}.pub", overwrite=a.force)
    print(
        f"key {kid}: private {out / (a.name + '.key')} (keep secret), "
        f"public {out / (a.name + '.pub')} (give to devices)"
    )


def cmd_export(a: argparse.Namespace) -> None:
    from edge_build import export

    _print_record(export.run(Path(a.model_dir), Path(a.out), opset=a.opset, atol=a.atol))


def cmd_quantize(a: argparse.Namespace) -> None:
    from edge_build import quantize

    src, out = Path(a.input), Path(a.out)
    if (src / "model.onnx").is_file():  # an fp32 export: ONNX Runtime's RTN on the graph
        if a.method not in (None, "rtn"):
            raise EdgeError(
                f"--method {a.method} works on the Hugging Face model directory (quantize, "
                f"then export, then `edge-build lower`); {src} is an ONNX export"
            )
        windows = _windows(src, a.eval_windows, a.eval_tokens, a.eval_text)
        record = quantize.run(src, out, eval_windows=windows, block_size=a.group_size,
                              accuracy_level=a.accuracy_level, symmetric=not a.asymmetric,
                              min_top1=a.min_top1, max_kl=a.max_kl)  # fmt: skip
    else:
        from edge_build.evaluate import eval_windows
        from edge_build.textdata import train_heldout

        tok = src / "tokenizer.json"
        if not tok.is_file():
            raise EdgeError(f"{src} has neither model.onnx nor tokenizer.json")
        train, held = train_heldout([Path(p) for p in a.data] if a.data else None)
        calib = eval_windows(tok, train, a.calib_windows, a.eval_tokens)
        held_windows = (
            _windows(src, a.eval_windows, a.eval_tokens, a.eval_text)
            if a.eval_text
            else eval_windows(tok, held, a.eval_windows, a.eval_tokens)
        )
        record = quantize.quantize_model(
            src, out, calib, held_windows, method=a.method or "awq", group_size=a.group_size,
            symmetric=not a.asymmetric, max_ppl_increase=a.max_ppl_increase,
            min_top1=a.min_top1, max_kl=a.max_kl, progress=not a.no_progress, device=a.device,
        )  # fmt: skip
    _print_record(record)


def cmd_lower(a: argparse.Namespace) -> None:
    from edge_build import quantize

    _print_record(
        quantize.lower(
            Path(a.onnx_dir),
            Path(a.quant_dir),
            Path(a.out),
            fmt=a.format,
            accuracy_level=a.accuracy_level,
            atol=a.atol,
        )
    )


def cmd_package(a: argparse.Namespace) -> None:
    from edge_build import package

    path = package.run(
        Path(a.input),
        Path(a.out),
        Path(a.key),
        name=a.name,
        version=a.version,
        context_length=a.context_length,
        max_new_tokens=a.max_new_tokens,
        overwrite=a.force,
        trt_dir=Path(a.trt_graph) if a.trt_graph else None,
    )
    print(f"bundle {path}")


def cmd_distill(a: argparse.Namespace) -> None:
    from edge_build import distill

    layers = a.layers if a.layers == "every_other" else tuple(int(x) for x in a.layers.split(","))
    cfg = distill.DistillConfig(
        layers=layers,
        steps=a.steps,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        grad_accum=a.grad_accum,
        learning_rate=a.lr,
        warmup_steps=a.warmup_steps,
        temperature=a.temperature,
        hidden_weight=a.hidden_weight,
        checkpoint_every=a.checkpoint_every,
        seed=a.seed,
        eval_windows=a.eval_windows,
        eval_tokens=a.eval_tokens,
    )
    record = distill.run(
        Path(a.teacher),
        Path(a.out),
        cfg,
        data=[Path(p) for p in a.data] if a.data else None,
        init_from=Path(a.init_from) if a.init_from else None,
        resume=not a.no_resume,
        max_steps=a.max_steps,
        device=a.device,
        progress=not a.no_progress,
        min_top1=a.min_top1,
        max_kl=a.max_kl,
    )
    if record is None:
        print(f"stopped at --max-steps {a.max_steps}; rerun to resume from the checkpoint")
    else:
        _print_record(record)


def cmd_prune(a: argparse.Namespace) -> None:
    from edge_build import prune

    _print_record(
        prune.run(
            Path(a.input),
            Path(a.out),
            mlp_ratio=a.mlp_ratio,
            heads_ratio=a.heads_ratio,
            drop_layers=a.drop_layers,
            data=[Path(p) for p in a.data] if a.data else None,
            teacher_dir=Path(a.teacher) if a.teacher else None,
            calib_windows=a.calib_windows,
            eval_windows_count=a.eval_windows,
            window_tokens=a.eval_tokens,
            device=a.device,
            min_top1=a.min_top1,
            max_kl=a.max_kl,
        )
    )


def _add_quality_flags(p: argparse.ArgumentParser, windows: int) -> None:
    p.add_argument("--data", nargs="+", default=None, help=".txt/.jsonl files (default: stdlib)")
    p.add_argument("--eval-windows", type=int, default=windows)
    p.add_argument("--eval-tokens", type=int, default=128)
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--min-top1", type=float, default=None, help="fail below this agreement")
    p.add_argument("--max-kl", type=float, default=None, help="fail above this mean KL")


def cmd_fuse(a: argparse.Namespace) -> None:
    from edge_build import fuse

    _print_record(fuse.run(Path(a.input), Path(a.out), max_positions=a.max_positions))


def cmd_demo(a: argparse.Namespace) -> None:
    from edge_build.extras import require_build_extra

    require_build_extra("edge-build demo")  # before anything is imported or written
    from edge_build.demo import build_demo

    key = Path(a.key) if a.key else None
    path = build_demo(Path(a.out), preset=a.preset, key_path=key)
    pub = (
        Path(a.key).with_suffix(".pub")
        if a.key
        else Path(a.out).with_name(Path(a.out).name + ".work") / "signing.pub"
    )
    print(f"bundle {path}\nverify with: edge-runtime verify {path} --pubkey {pub}")


def cmd_run(a: argparse.Namespace) -> None:
    from edge_build.pipeline import run_recipe
    from edge_build.recipe import load_recipe

    recipe = load_recipe(Path(a.recipe), a.set)
    out = Path(a.out) if a.out else Path("work") / Path(a.recipe).stem
    result = run_recipe(recipe, out, Path(a.key) if a.key else None, progress=not a.no_progress)
    ran = ", ".join(result.executed) or "nothing (all cached)"
    print(f"bundle {result.bundle}\nran: {ran} in {result.seconds:.1f}s")
    if result.public_key:
        print(f"verify with: edge-runtime verify {result.bundle} --pubkey {result.public_key}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    k = sub.add_parser("keygen", help="make an ed25519 signing key pair")
    k.add_argument("--out", default=".", help="directory for NAME.key and NAME.pub")
    k.add_argument("--name", default="signing")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(fn=cmd_keygen)

    e = sub.add_parser("export", help="HF causal-LM directory → ONNX with KV cache")
    e.add_argument("model_dir")
    e.add_argument("out")
    e.add_argument("--opset", type=int, default=None)
    e.add_argument("--atol", type=float, default=1e-3, help="max |logit diff| vs PyTorch")
    e.set_defaults(fn=cmd_export)

    q = sub.add_parser(
        "quantize",
        help="4-bit weight-only: HF model dir → fake-quant HF dir + codes (AWQ or RTN); "
        "an ONNX export → MatMulNBits (RTN)",
    )
    q.add_argument("input", help="HF model directory (or an fp32 ONNX export, RTN only)")
    q.add_argument("out")
    q.add_argument("--method", choices=["awq", "rtn"], default=None, help="default: awq")
    q.add_argument("--group-size", "--block-size", dest="group_size", type=int, default=128,
                   help="inputs per scale, along K")  # fmt: skip
    q.add_argument("--asymmetric", action="store_true", help="keep zero points")
    q.add_argument("--accuracy-level", type=int, default=4, choices=range(5),
                   help="ONNX input only (for the HF path see `lower`)")  # fmt: skip
    q.add_argument("--data", nargs="+", default=None, help=".txt/.jsonl files (default: stdlib)")
    q.add_argument(
        "--eval-text",
        type=Path,
        default=None,
        help="text file for the fixed evaluation windows (default: held-out split of the data)",
    )
    q.add_argument("--calib-windows", type=int, default=32, help="AWQ calibration windows")
    q.add_argument("--eval-windows", type=int, default=8)
    q.add_argument("--eval-tokens", type=int, default=128)
    q.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--min-top1", type=float, default=None, help="fail below this agreement")
    q.add_argument("--max-kl", type=float, default=None, help="fail above this mean KL")
    q.add_argument(
        "--max-ppl-increase",
        type=float,
        default=None,
        help="fail when perplexity rises by more than this share (0.05 = 5%%)",
    )
    q.set_defaults(fn=cmd_quantize)

    lo = sub.add_parser("lower", help="export of a quantize artifact → int4 ONNX from its codes")
    lo.add_argument("onnx_dir", help="edge-build export of the quantize artifact")
    lo.add_argument("quant_dir", help="the quantize artifact (quant.safetensors + quant.json)")
    lo.add_argument("out")
    lo.add_argument("--format", choices=["matmulnbits", "qdq"], default="matmulnbits")
    lo.add_argument("--accuracy-level", type=int, default=4, choices=range(5))
    lo.add_argument("--atol", type=float, default=1e-3,
                    help="max |logit diff| vs the fp32 graph, fp32 activations")  # fmt: skip
    lo.set_defaults(fn=cmd_lower)
    f = sub.add_parser("fuse", help="ONNX decoder → fused GroupQueryAttention + RMSNorm ops")
    f.add_argument("input")
    f.add_argument("out")
    f.add_argument("--max-positions", type=int, default=None,
                   help="rotary table length (default: the model's max_position_embeddings)")
    f.set_defaults(fn=cmd_fuse)

    g = sub.add_parser("package", help="artifact → signed bundle")
    g.add_argument("input")
    g.add_argument("out")
    g.add_argument("--key", required=True, help="ed25519 private key (edge-build keygen)")
    g.add_argument("--name", required=True, help="model name clients will ask for")
    g.add_argument("--version", default="0.1.0")
    g.add_argument("--context-length", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--trt-graph", metavar="QDQ_DIR",
                   help="also ship this QDQ lowering (edge-build lower --format qdq) as the "
                        "decoder_trt graph TensorRT builds from")
    g.add_argument("--force", action="store_true", help="replace an existing bundle")
    g.set_defaults(fn=cmd_package)

    t = sub.add_parser("distill", help="teacher → student from a subset of its layers, by KD")
    t.add_argument("teacher")
    t.add_argument("out")
    t.add_argument("--layers", default="every_other", help="'every_other' or e.g. 0,2,5")
    t.add_argument("--init-from", default=None, help="start from this model dir (e.g. pruned)")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup-steps", type=int, default=20)
    t.add_argument("--temperature", type=float, default=2.0)
    t.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state MSE weight")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-steps", type=int, default=None, help="stop early; rerun resumes")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--no-progress", action="store_true")
    _add_quality_flags(t, windows=16)
    t.set_defaults(fn=cmd_distill)

    r = sub.add_parser("prune", help="structured pruning: MLP channels, KV groups, layers")
    r.add_argument("input")
    r.add_argument("out")
    r.add_argument("--mlp-ratio", type=float, default=0.0, help="share of MLP channels removed")
    r.add_argument("--heads-ratio", type=float, default=0.0, help="share of KV groups removed")
    r.add_argument("--drop-layers", type=int, default=0, help="whole layers removed")
    r.add_argument("--teacher", default=None, help="also measure against this model")
    r.add_argument("--calib-windows", type=int, default=32)
    _add_quality_flags(r, windows=16)
    r.set_defaults(fn=cmd_prune)

    d = sub.add_parser("demo", help="build the local demo model into a bundle")
    d.add_argument("--out", required=True)
    d.add_argument("--preset", default="default", choices=["tiny", "default"])
    d.add_argument("--key", default=None, help="signing key (default: a new one beside OUT)")
    d.set_defaults(fn=cmd_demo)

    u = sub.add_parser(
        "run", help="run a recipe: distill → prune → quantize → export → lower → fuse → package"
    )
    u.add_argument("--recipe", required=True, help="models/NAME.toml")
    u.add_argument("--out", default=None, help="build directory (default: work/NAME)")
    u.add_argument("--key", default=None, help="signing key (overrides package.key)")
    u.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set source.path=/models/x (repeatable)",
    )
    u.add_argument("--no-progress", action="store_true")
    u.set_defaults(fn=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not sys.stderr.isatty():  # no progress bar there: long stages log their progress
        logging.getLogger("edge_build.progress").setLevel(logging.INFO)
    try:
        args.fn(args)
    except (EdgeError, FileExistsError) as e:
        print(f"edge-build {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # an optional package the base install lacks
        from edge_build.extras import missing_module_hint

        print(f"edge-build {args.cmd}: error: {missing_module_hint(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
