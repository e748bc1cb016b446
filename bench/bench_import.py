"""GGUF import and conversion benchmark: inference.weights' `import_gguf` against `mlx_lm.convert`.

For each model (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M), in one run, one phase at a
time, each phase in a fresh subprocess (so its peak memory is its own):

1. **import**: `import_gguf` of the real GGUF at `--bits` (Q4_0/Q4_1/Q8_0 kept, the rest
   re-quantized): seconds, peak RSS of the process (`ru_maxrss`, everything: Python, numpy,
   tokenizers, MLX) and MLX's own peak (`mx.get_peak_memory()`, MLX arrays only).
2. **prepare** (not compared): the same weights, dequantized to float16, written twice: as an
   F16 GGUF (every tensor of the file dequantized, llama.cpp's layout kept) and as a Hugging Face
   safetensors directory (config.json, model.safetensors, tokenizer files).
3. **quantize the same float16 weights to `--bits`/`--group-size`**, three ways:
   `mlx_lm.convert(hf_dir, quantize=True, q_bits, q_group_size)`; our `import_gguf` of the F16
   GGUF with its refined fit (the default); and `import_gguf(..., refine=False)`, which quantizes
   with `mx.quantize` exactly like mlx_lm.convert does: the like-for-like timing.
4. **quality**: perplexity on `inference.weights.evaluation.DEFAULT_TEXT` of each output and of the
   float16 weights themselves, all computed with float32 activations (`--no-quality` skips it;
   Gemma's 262k-token output layer makes each quantized pass take about a minute on 2 cores).

mlx_lm.convert on an MLX float directory runs the same code as on a Hugging Face one (load,
`quantize_model`, save), so "quantize an MLX dir" is the mlx_lm.convert row.

    .venv/bin/python bench/bench_import.py --output /tmp/bench-import.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxweb.launcher import ensure_fast_blas  # noqa: E402

# As bench_chat.py and manage.py: OpenBLAS for MLX's float matmuls (the perplexity passes of the
# float16 reference). Quantizing does not use BLAS. Subprocesses inherit the environment.
ensure_fast_blas(sys.argv)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402

RESULT = "BENCH-RESULT "


# --------------------------------------------------------------------------- phases (children)


def _usage(started: float) -> dict[str, Any]:
    import mlx.core as mx

    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mlx_peak_bytes": mx.get_peak_memory(),
    }


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def phase_import(args: dict[str, Any]) -> dict[str, Any]:
    from inference.weights.convert import import_gguf

    started = time.perf_counter()
    result = import_gguf(
        Path(args["gguf"]),
        Path(args["out"]),
        bits=args["bits"],
        group_size=args["group_size"],
        refine=args.get("refine", True),
    )
    return _usage(started) | {
        "size_bytes": result.size_bytes,
        "parameters": result.parameters,
        "stored": result.quantization,
    }


def phase_mlx_lm_convert(args: dict[str, Any]) -> dict[str, Any]:
    import contextlib
    import io

    from mlx_lm import convert

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        convert(
            args["hf"],
            mlx_path=args["out"],
            quantize=True,
            q_bits=args["bits"],
            q_group_size=args["group_size"],
        )
    return _usage(started) | {"size_bytes": _dir_size(Path(args["out"]))}


def phase_prepare(args: dict[str, Any]) -> dict[str, Any]:
    """The GGUF's weights dequantized to float16: as an F16 GGUF and as a Hugging Face dir."""
    import gguf
    import mlx.core as mx
    import numpy as np
    from gguf.quants import dequantize
    from mlx_lm.utils import save_config

    from inference.weights.convert import read_gguf

    started = time.perf_counter()
    source, hf_dir, f16_path = Path(args["gguf"]), Path(args["hf"]), Path(args["f16"])

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(f16_path), str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
            "general.architecture",
            "general.file_type",
        ):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        writer.add_tensor(t.name, values.astype(np.float32 if values.ndim == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del reader

    # mlx-lm's llama and gemma3_text weights are named and laid out as Hugging Face's.
    model = read_gguf(f16_path, dequantize=True)
    hf_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in model.weights.items()}
    mx.save_safetensors(str(hf_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    config = dict(model.config, torch_dtype=args["dtype"])
    save_config(config, hf_dir / "config.json")
    model.tokenizer.save_pretrained(hf_dir)
    return _usage(started) | {"size_bytes": f16_path.stat().st_size}


def phase_perplexity(args: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load

    from inference.weights.evaluation import DEFAULT_TEXT, perplexity

    started = time.perf_counter()
    model, tokenizer = load(args["dir"])[:2]
    # Every model is measured with float32 activations: the stored weights (and float16 scales,
    # cast exactly) are unchanged. On an x86 CPU float16 is emulated: mlx_lm.convert's float16
    # output took 143 s for a 20-token forward pass of SmolLM2 as stored, 3 s cast.
    model.set_dtype(mx.float32)
    ids = list(tokenizer.encode(DEFAULT_TEXT))
    value, _ = perplexity(model, ids)
    return _usage(started) | {"perplexity": value, "tokens": len(ids)}


PHASES = {
    "import": phase_import,
    "mlx_lm_convert": phase_mlx_lm_convert,
    "prepare": phase_prepare,
    "perplexity": phase_perplexity,
}


def run_phase(name: str, **args: Any) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its result dict."""
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", name, json.dumps(args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return dict(json.loads(line[len(RESULT) :]))
    raise RuntimeError(f"phase {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


# --------------------------------------------------------------------------- the run (parent)


def _gguf_paths(models: list[str]) -> dict[str, Path]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    import django

    django.setup()
    from django.conf import settings

    from inference.services import model_fetch
    from inference.testing import GEMMA3_270M_DIR, GEMMA3_270M_FILE, fetch_gemma3_270m

    paths = {}
    if "smollm2" in models:
        config = settings.MLXWEB_CONFIG.models["smollm2-135m-instruct"]
        path = model_fetch(model=config, models_dir=settings.MLXWEB_MODELS_DIR)
        assert path is not None
        paths["smollm2"] = path
    if "gemma3" in models:
        dest = settings.MLXWEB_MODELS_DIR / GEMMA3_270M_DIR / GEMMA3_270M_FILE
        paths["gemma3"] = fetch_gemma3_270m(dest)
    return paths


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def _row(label: str, what: str, r: dict[str, Any], ppl: float | None = None) -> str:
    return (
        f"| {label} | {what} | {r['seconds']:.1f} s | {_mb(r.get('peak_rss_bytes'))} | "
        f"{_mb(r.get('mlx_peak_bytes'))} | {_mb(r.get('size_bytes'))} | "
        f"{'-' if ppl is None else f'{ppl:.3f}'} |"
    )


def bench_model(
    name: str, gguf_path: Path, work: Path, bits: int, group_size: int, quality: bool
) -> list[str]:
    dtype = "float32" if name == "gemma3" else "float16"  # inference.weights.quantize.default_dtype
    out: dict[str, Any] = {}
    lines = [
        f"### {name}: {gguf_path.name} ({gguf_path.stat().st_size / 1e6:,.0f} MB)",
        "",
        "| step | what | time | peak RSS | MLX peak | output | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    print(f"[{name}] import of the GGUF at {bits} bits", flush=True)
    out["import"] = run_phase(
        "import", gguf=str(gguf_path), out=str(work / "import"), bits=bits, group_size=group_size
    )
    stored = out["import"]["stored"]
    kept = ", ".join(f"{n} {t}" for t, n in stored["kept"].items()) or "none"
    requant = stored["requantized"]
    lines.append(
        _row(
            "import_gguf",
            f"{gguf_path.name}, {bits}-bit g{group_size} (kept {kept}; "
            f"re-quantized {requant['tensors']})",
            out["import"],
        )
    )
    print(f"[{name}] preparing float16 copies (F16 GGUF, HF dir)", flush=True)
    f16, hf = work / "f16.gguf", work / "hf"
    out["prepare"] = run_phase(
        "prepare", gguf=str(gguf_path), f16=str(f16), hf=str(hf), dtype=dtype
    )
    lines.append(_row("(prepare)", "write the F16 GGUF and the HF dir", out["prepare"]))

    q = {"bits": bits, "group_size": group_size}
    runs = [
        ("mlx_lm.convert", f"HF float16 dir -> {bits}-bit g{group_size}", "mlx_lm_convert",
         {"hf": str(hf), "out": str(work / "mlx-lm"), **q}),
        ("import_gguf", f"F16 GGUF -> {bits}-bit g{group_size}, refined fit (default)", "import",
         {"gguf": str(f16), "out": str(work / "ours"), **q}),
        ("import_gguf refine=False", f"F16 GGUF -> {bits}-bit g{group_size}, mx.quantize fit",
         "import", {"gguf": str(f16), "out": str(work / "ours-plain"), "refine": False, **q}),
    ]  # fmt: skip
    ppl: dict[str, float | None] = {}
    if quality:
        print(f"[{name}] perplexity of the float16 weights", flush=True)
        ppl["float16"] = run_phase("perplexity", dir=str(hf))["perplexity"]
    for label, what, phase, args in runs:
        print(f"[{name}] {label}", flush=True)
        out[label] = run_phase(phase, **args)
        if quality:
            print(f"[{name}] perplexity after {label}", flush=True)
            ppl[label] = run_phase("perplexity", dir=args["out"])["perplexity"]
        lines.append(_row(label, what, out[label], ppl.get(label)))
    if quality:
        lines.append(
            f"| (reference) | the float16 weights | - | - | - | - | {ppl['float16']:.3f} |"
        )
    ref = out["mlx_lm.convert"]["seconds"]
    lines += [
        "",
        f"Time against mlx_lm.convert on the same weights: refined import "
        f"{out['import_gguf']['seconds'] / ref:.2f}x, plain import "
        f"{out['import_gguf refine=False']['seconds'] / ref:.2f}x.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3", help="comma-separated")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--no-quality", action="store_true", help="skip the perplexity passes")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("phase_args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = PHASES[args.phase](json.loads(args.phase_args))
        print(RESULT + json.dumps(result), flush=True)
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    paths = _gguf_paths(models)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    lines: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="mlxweb-bench-import-"))
    try:
        for name in models:
            model_work = work / name
            model_work.mkdir()
            lines += bench_model(
                name, paths[name], model_work, args.bits, args.group_size, not args.no_quality
            )
            if not args.keep:
                shutil.rmtree(model_work, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    blas = "OpenBLAS" if "openblas" in os.environ.get("LD_PRELOAD", "") else "reference BLAS"
    header = [
        f"Run {started:%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} cores, "
        f"mlx {metadata.version('mlx')}, mlx-lm {metadata.version('mlx-lm')}, {blas}; load "
        f"average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        "Command: `"
        + shlex.join([".venv/bin/python", "bench/bench_import.py", *sys.argv[1:]])
        + "`",
        "",
    ]
    report = "\n".join(header + lines)
    print(report)
    if args.output:
        args.output.write_text(report + "\n")


if __name__ == "__main__":
    main()
