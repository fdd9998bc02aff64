"""`python -m bench`: every figure next to its reference, measured in the same run, alternating,
median of `--rounds` rounds. Prints markdown tables and writes bench/results/<machine>-<date>.json.

Sections: the machine's matmul peak; data loading (DALI streaming, DALI from the decoded-image
cache, torchvision); the training step at 64x64 (reference loop vs the trainer's step in each
precision and layout), with FLOPs, achieved TFLOP/s, peak memory and the profiler's top ops;
ONNX inference (`python -m export bench`'s measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import loaders, timing, training
from distgan.config.model import ModelConfig
from distgan.config.sections import TrainConfig
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import save_generator
from distgan.training.precision import (
    configure_kernels,
    cpu_has_native_bf16,
    resolve_mixed_precision,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine_info(device: torch.device) -> dict:
    import onnxruntime
    from nvidia import dali

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "dali": dali.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_slug(info: dict) -> str:
    name = info.get("gpu") or f"cpu-{info['cpu']}-{info['cpu_cores']}c"
    name = re.sub(r"\((r|tm)\)", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def variant_specs(device: torch.device, with_compile: bool) -> list[tuple[str, str, bool, bool]]:
    """(name, precision, channels_last, compile) of each trainer variant; the trainer's defaults
    on this machine are always among them."""
    specs = [
        ("fp32", "no", False, False),
        ("bf16", "bf16", False, False),
        ("bf16 channels_last", "bf16", True, False),
    ]
    if device.type == "cuda":
        specs.append(("fp16 channels_last", "fp16", True, False))
    if with_compile:
        specs.append(("bf16 channels_last compile", "bf16", True, True))
    defaults = TrainConfig()
    default = (resolve_mixed_precision("auto"), defaults.channels_last, defaults.compile)
    if default not in [spec[1:] for spec in specs]:
        layout = " channels_last" if default[1] else ""
        name = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[default[0]] + layout
        specs.append((name + (" compile" if default[2] else ""), *default))
    return [
        (name + (" (default)" if tuple(rest) == default else ""), *rest) for name, *rest in specs
    ]


def measure_peaks(device: torch.device, size: int, rounds: int) -> dict[str, float]:
    peaks = {"no": timing.matmul_peak(torch.float32, device, size, rounds)}
    if device.type == "cuda" or cpu_has_native_bf16():
        peaks["bf16"] = timing.matmul_peak(torch.bfloat16, device, size, rounds)
    if device.type == "cuda":
        peaks["fp16"] = timing.matmul_peak(torch.float16, device, size, rounds)
    return peaks


def measure_data(args, device: torch.device, workdir: Path) -> dict:
    folder = workdir / "jpegs"
    files, mean_kib = loaders.make_celeba_like_folder(folder, args.data_images)
    loading = dict(batch_size=args.data_batch, workers=args.workers, device=device)
    work, cache_seconds = loaders.data_work(folder, resolution=training.RESOLUTION, **loading)
    rates = timing.paired_rates(work, args.rounds)
    return {
        "images": len(files),
        "mean_file_kib": round(mean_kib, 1),
        "workers": args.workers,
        "batch_size": args.data_batch,
        "cache_build_seconds": round(cache_seconds, 2),
        "decode": "mixed (GPU)" if device.type == "cuda" else "cpu",
        "images_per_sec": rates,
    }


def measure_training(args, device: torch.device) -> tuple[dict, list]:
    """Per batch size: warm-up (compile) seconds, images/s of each variant, FLOPs per image."""
    results, runs = {}, []
    for batch in args.batch_sizes:
        variants = {"reference fp32": training.ReferenceRun(batch, device)}
        for name, precision, channels_last, compile in variant_specs(device, args.compile):
            variants[name] = training.TrainerRun(
                batch, device, precision=precision, channels_last=channels_last, compile=compile
            )
        warm = {name: round(training.warm_up(run), 2) for name, run in variants.items()}
        steps = {}
        for name, run in variants.items():  # steps per round: about --round-seconds each
            start = time.perf_counter()
            run.steps(1)
            steps[name] = max(1, round(args.round_seconds / (time.perf_counter() - start)))
        work = {
            name: (lambda run=run, n=steps[name]: run.steps(n)) for name, run in variants.items()
        }
        print(f"timing the training step at batch {batch}: {', '.join(variants)} ...", flush=True)
        rates = timing.paired_rates(work, args.rounds)
        flops = {
            "reference fp32": training.flops_per_image(variants["reference fp32"]),
            "fp32": training.flops_per_image(variants["fp32"]),
        }
        results[batch] = {
            "images_per_sec": rates,
            "warm_up_seconds": warm,
            "steps_per_round": steps,
            "flops_per_image": flops,
            "precision": {name: run.precision for name, run in variants.items()},
        }
        runs.append((batch, variants))
    return results, runs


def measure_recipes(args, device: torch.device) -> dict:
    """Images/s of each data kind's recipe against the defaults at its shapes, batch
    --batch-sizes[0], in the machine's default precision, alternating rounds."""
    precision = resolve_mixed_precision("auto")
    variants = training.recipe_steps(args.batch_sizes[0], device, precision)
    for run in variants.values():
        training.warm_up(run)
    steps = {}
    for name, run in variants.items():
        start = time.perf_counter()
        run.steps(1)
        steps[name] = max(1, round(args.round_seconds / (time.perf_counter() - start)))
    work = {name: (lambda run=run, n=steps[name]: run.steps(n)) for name, run in variants.items()}
    print(f"timing each recipe's step: {', '.join(variants)} ...", flush=True)
    return {
        "batch": args.batch_sizes[0],
        "precision": precision,
        "images_per_sec": timing.paired_rates(work, args.rounds),
    }


def recipe_table(section: dict) -> list[str]:
    rates = section["images_per_sec"]
    lines = [
        "",
        f"### Recipes: each data kind's step against the defaults' at its shapes, batch "
        f"{section['batch']}, {section['precision']}",
        "",
        "| step | images/s | vs the defaults at these shapes | conditional vs unconditional |",
        "|---|---:|---:|---:|",
    ]
    for name, value in rates.items():
        shapes, median = name.split(",")[0], value["median"]
        base = rates[f"{shapes}, defaults"]["median"]
        versus = ""
        if name.endswith(", 10 classes"):
            unconditional = name.removesuffix(", 10 classes")
            versus = f"{median / rates[unconditional]['median']:.3f}x"
            bare = rates.get(f"{unconditional} without clusters or head")
            if bare:  # the recipe's own labels (its clusters) and head cost steps too
                versus += f" ({median / bare['median']:.3f}x without clusters or head)"
        lines.append(f"| {name} | {median:.1f} | {median / base:.3f}x | {versus} |")
    return lines


def measure_inference(args, workdir: Path) -> list[dict]:
    from distgan.runtime.ort_providers import cuda_device_count
    from export.bench import measure
    from export.onnx_export import export_onnx

    generator = Generator(ModelConfig(resolution=training.RESOLUTION)).eval()
    weights = save_generator(workdir / "generator", generator, step=0, images_seen=0)
    model = workdir / "generator.onnx"
    export_onnx(weights, model, log=lambda *_: None)
    devices = ["cpu"] + (["cuda"] if cuda_device_count() and torch.cuda.is_available() else [])
    return [
        row
        for device in devices
        for row in measure(model, weights, args.inference_batches, args.rounds, device)
    ]


def tables(result: dict) -> str:
    peaks = result["matmul_peak_tflops"]
    lines = [
        "### Matmul peak (the ceiling each figure is compared to)",
        "",
        "| dtype | TFLOP/s |",
        "|---|---:|",
    ]
    lines += [f"| {'fp32' if k == 'no' else k} | {v:.3f} |" for k, v in peaks.items()]
    data = result["data"]
    rates = data["images_per_sec"]
    reference = rates["torchvision"]["median"]
    lines += [
        "",
        f"### Data: {data['images']} JPEGs of 178x218 (~{data['mean_file_kib']:.0f} KiB), "
        f"{data['workers']} workers/threads, batch {data['batch_size']}, 64x64 out",
        "",
        "| loader | images/s | vs torchvision | vs default training step |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("torchvision", "torchvision ImageFolder + DataLoader (PIL)"),
        ("dali", f"DALI streaming ({data['decode']} decode)"),
        ("dali_cached", "DALI decoded-image cache"),
    ):
        value = rates[name]["median"]
        lines.append(
            f"| {label} | {value:.0f} | {value / reference:.2f}x | "
            f"{data['to_training_ratio'][name]:.1f}x |"
        )
    for batch, section in result["training"].items():
        rates = section["images_per_sec"]
        reference = rates["reference fp32"]["median"]
        counted = section["flops_per_image"]
        lines += [
            "",
            f"### Training step, 64x64, batch {batch} (GFLOP per image: reference "
            f"{counted['reference fp32'] / 1e9:.2f}, project {counted['fp32'] / 1e9:.2f})",
            "",
            "| step | images/s | vs reference | TFLOP/s | % of matmul peak | peak MiB "
            "| first 2 steps, s (compile) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, value in rates.items():
            precision = section["precision"][name]
            flops = counted["reference fp32" if name == "reference fp32" else "fp32"]
            achieved = value["median"] * flops / 1e12
            peak = peaks.get(precision, peaks["no"])
            memory = section["peak_memory_mib"].get(name)
            lines.append(
                f"| {name} | {value['median']:.1f} | {value['median'] / reference:.2f}x | "
                f"{achieved:.3f} | {100 * achieved / peak:.0f}% | "
                f"{'-' if memory is None else f'{memory:.0f}'} | "
                f"{section['warm_up_seconds'][name]:.1f} |"
            )
    if "recipes" in result:
        lines += recipe_table(result["recipes"])
    lines += [
        "",
        "### Inference (python -m export bench)",
        "",
        "| device | batch | onnxruntime img/s | PyTorch eager fp32 img/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["inference"]:
        lines.append(
            f"| {row['device']} | {row['batch']} | {row['onnxruntime_images_per_sec']} | "
            f"{row['torch_eager_fp32_images_per_sec']} | {row['ratio']}x |"
        )
    lines += [
        "",
        "### Where the time goes (default step, batch "
        f"{result['profile']['batch']}, torch.profiler)",
        "",
        "| op | ms/step | % | calls/step |",
        "|---|---:|---:|---:|",
    ]
    for op in result["profile"]["top_ops"]:
        lines.append(
            f"| {op['op']} | {op['ms_per_step']} | {op['percent']} | {op['calls_per_step']} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds per figure (>= 5)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], metavar="N")
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=1.0,
        help="length of one training round of one variant (default 1.0)",
    )
    parser.add_argument("--data-images", type=int, default=2048, help="JPEGs in the data test")
    parser.add_argument("--data-batch", type=int, default=64)
    parser.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="DataLoader workers = DALI threads (default: cores, at most 8)",
    )
    parser.add_argument("--inference-batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="leave out the torch.compile variant (it compiles for a while)",
    )
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON file")
    parser.add_argument(
        "--table",
        type=Path,
        metavar="RESULT.json",
        help="print the tables of a saved result, run nothing",
    )
    parser.add_argument(
        "--recipes-only",
        action="store_true",
        help="time only the recipes' steps against the defaults' (a few minutes); writes nothing",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: checks the harness runs, measures nothing worth keeping",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.table:
        print(tables(json.loads(args.table.read_text())))
        return
    if args.quick:
        args.batch_sizes, args.round_seconds, args.data_images, args.data_batch = [8], 0.01, 48, 16
        args.inference_batches, args.matmul_size, args.compile = [1, 8], 256, False
        args.profile_steps = 1
    if args.rounds < 5 and not args.quick:
        print("error: --rounds must be at least 5 for a median worth reporting", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_kernels(deterministic=False)  # as the trainer runs by default: cuDNN autotuning
    if args.recipes_only:
        print("\n".join(recipe_table(measure_recipes(args, device))))
        return
    started = time.perf_counter()
    info = machine_info(device)
    print(
        f"bench on {info.get('gpu') or info['cpu']} ({info['cpu_cores']} cores), torch "
        f"{info['torch']}{', QUICK: not a measurement' if args.quick else ''}",
        flush=True,
    )
    result = {
        "machine": info,
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "rounds": args.rounds,
    }
    print("measuring the matmul peak ...", flush=True)
    result["matmul_peak_tflops"] = measure_peaks(device, args.matmul_size, args.rounds)
    with tempfile.TemporaryDirectory(prefix="distgan-bench-") as tmp:
        workdir = Path(tmp)
        print(f"timing data loading over {args.data_images} JPEGs ...", flush=True)
        result["data"] = measure_data(args, device, workdir)
        result["training"], runs = measure_training(args, device)
        result["recipes"] = measure_recipes(args, device)
        default = next(name for name in runs[0][1] if name.endswith("(default)"))
        print("profiling the default step ...", flush=True)
        result["profile"] = {
            "variant": default,
            "batch": runs[0][0],
            "top_ops": training.top_ops(runs[0][1][default], args.profile_steps),
        }
        # Memory last: measuring it on the CPU changes the allocator's behaviour.
        measurable = device.type == "cuda" or timing.prepare_cpu_memory_measurement()
        for batch, variants in runs:
            section = result["training"][batch]
            section["peak_memory_mib"] = {
                name: round(timing.peak_memory_mib(run.step, device), 1) if measurable else None
                for name, run in variants.items()
            }
        del runs
        print("timing ONNX inference ...", flush=True)
        result["inference"] = measure_inference(args, workdir)
    result["data"]["to_training_ratio"] = {
        name: round(
            value["median"]
            / result["training"][args.batch_sizes[0]]["images_per_sec"][default]["median"],
            2,
        )
        for name, value in result["data"]["images_per_sec"].items()
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = tables(result)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{machine_slug(info)}-{result['date']}.json"
    for n in range(2, 1000):
        if not path.exists():
            break
        path = args.out / f"{machine_slug(info)}-{result['date']}-{n}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['seconds']:.0f} s; results in {path}")
