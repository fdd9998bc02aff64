"""`python -m export {onnx,generate,bench}`. Each command imports only what it needs: `generate`
never imports torch."""

from __future__ import annotations

import argparse

from distgan.errors import UserError, exit_on_user_error


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

    gen = commands.add_parser(
        "generate",
        help="write generated images (onnxruntime only)",
        description="Write one PNG per seed (onnxruntime, numpy and Pillow only). Each image's z "
        "comes from its seed alone, so a face is the same at any batch size and in the web page; "
        "z is N(0, 1) or U[-1, 1] as the model was trained (its metadata says which), and "
        "grayscale models give grayscale PNGs. A conditional model needs --class.",
    )
    gen.add_argument("--model", required=True, help="the exported .onnx file")
    gen.add_argument(
        "--seeds",
        metavar="SPEC",
        help="seeds and inclusive ranges, e.g. 0-35,100: writes seed0000.png ... seed0035.png, "
        "seed0100.png",
    )
    gen.add_argument(
        "--num",
        type=int,
        metavar="N",
        help="instead of --seeds: N images of seeds --seed, --seed + 1, ..., written as "
        "000000.png, 000001.png, ...",
    )
    gen.add_argument("--batch-size", type=int, default=64, help="images per run (default 64)")
    gen.add_argument("--out-dir", required=True, help="folder for the PNGs")
    gen.add_argument("--grid", help="also write a grid of the first 64 images to this PNG")
    gen.add_argument("--seed", type=int, help="with --num: the first seed (default 0)")
    gen.add_argument(
        "--truncation-psi",
        type=float,
        default=1.0,
        metavar="PSI",
        help="StyleGAN's truncation: z * PSI, towards the mean z (1 = none, the default; "
        "0.7: more typical faces; 0: the mean face)",
    )
    gen.add_argument(
        "--truncation-threshold",
        type=float,
        metavar="T",
        help="redraw z components beyond +-T from the seed's stream (e.g. 1.5)",
    )
    gen.add_argument("--truncation", type=float, help=argparse.SUPPRESS)  # renamed: see main()
    gen.add_argument(
        "--interpolate",
        type=int,
        metavar="K",
        help="also write a K-frame latent walk from the first seed to the last "
        "(interpolation.png and interpolation.gif)",
    )
    gen.add_argument(
        "--class",
        dest="label",
        metavar="CLASS",
        help="for a conditional model: the class, by name or else index (e.g. 7); for attributes, "
        "those switched on (e.g. Smiling,Male; none for none); all: one subfolder and one grid "
        "row per class (or attribute combination). The class does not change z: the same seed "
        "and class give the same image",
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
    with exit_on_user_error():
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
            from export.generate import generate, select_seeds

            if args.truncation is not None:  # StyleGAN users would read it as psi: say which
                raise UserError(
                    f"--truncation is ambiguous and was renamed: --truncation-threshold "
                    f"{args.truncation} redraws z components beyond +-T (what --truncation did), "
                    f"--truncation-psi {args.truncation} scales z towards the mean (StyleGAN's)"
                )
            seeds, names = select_seeds(args.seeds, args.num, args.seed)
            paths = generate(
                args.model,
                seeds,
                args.batch_size,
                args.out_dir,
                names=names,
                grid=args.grid,
                truncation_psi=args.truncation_psi,
                truncation_threshold=args.truncation_threshold,
                interpolate=args.interpolate,
                z_dim=args.z_dim,
                device=args.device,
                label=args.label,
            )
            print(f"wrote {len(paths)} images to {args.out_dir}")
        else:
            from export.bench import bench

            bench(args.model, args.generator, args.batch_sizes, args.repeats)


if __name__ == "__main__":
    main()
