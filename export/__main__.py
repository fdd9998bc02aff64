"""`python -m export {onnx,generate,bench}`. Each command imports only what it needs: `generate`
never imports torch."""

from __future__ import annotations

import argparse
import sys

from distgan.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    onnx = commands.add_parser("onnx", help="export a trained generator to ONNX, and verify it")
    source = onnx.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a training output folder (uses its generator.safetensors)")
    source.add_argument("--generator", help="a generator.safetensors (generator.json beside it)")
    onnx.add_argument("--out", required=True, help="the .onnx file to write")
    onnx.add_argument(
        "--uint8",
        action="store_true",
        help="output [batch, H, W, 3] uint8 pixels instead of [batch, 3, H, W] float32 in [-1, 1]",
    )
    onnx.add_argument(
        "--fp16",
        action="store_true",
        help="half-precision weights and compute (input and output stay float32)",
    )

    gen = commands.add_parser("generate", help="write generated images (onnxruntime only)")
    gen.add_argument("--model", required=True, help="the exported .onnx file")
    gen.add_argument("--num", type=int, required=True, help="how many images")
    gen.add_argument("--batch-size", type=int, default=64, help="images per run (default 64)")
    gen.add_argument("--out-dir", required=True, help="folder for 000000.png, 000001.png, ...")
    gen.add_argument("--grid", help="also write a grid of the first 64 images to this PNG")
    gen.add_argument("--seed", type=int, default=0, help="latent seed: same seed, same images")
    gen.add_argument(
        "--truncation",
        type=float,
        help="redraw latent components beyond +-T (e.g. 0.7: more typical faces)",
    )
    gen.add_argument(
        "--interpolate",
        type=int,
        metavar="K",
        help="also write a K-frame latent interpolation (PNG strip and GIF)",
    )
    gen.add_argument("--z-dim", type=int, help="latent size, for models without distgan metadata")
    gen.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")

    bench = commands.add_parser("bench", help="images/s: onnxruntime vs PyTorch eager")
    bench.add_argument("--model", required=True, help="the exported .onnx file")
    bench.add_argument(
        "--generator",
        help="generator.safetensors for the PyTorch side "
        "(default: the one the model was exported from)",
    )
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "onnx":
            from export.onnx_export import export_onnx, resolve_generator

            export_onnx(
                resolve_generator(args.run, args.generator),
                args.out,
                uint8=args.uint8,
                fp16=args.fp16,
            )
            print(f"wrote {args.out}")
        elif args.command == "generate":
            from export.generate import generate

            paths = generate(
                args.model,
                args.num,
                args.batch_size,
                args.out_dir,
                grid=args.grid,
                seed=args.seed,
                truncation=args.truncation,
                interpolate=args.interpolate,
                z_dim=args.z_dim,
                device=args.device,
            )
            print(f"wrote {len(paths)} images to {args.out_dir}")
        else:
            from export.bench import bench

            bench(args.model, args.generator, args.batch_sizes, args.repeats)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
