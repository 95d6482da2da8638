"""What ``DeepExplainer`` costs on a ViT-B/16-sized graph before it refuses (or fails, or succeeds).

Issue 9 item 6 asks that a refusal be cheap: < 2 s and < 1 GB on a ViT-B/16. This script measures it.
The model is Hugging Face ``ViTForImageClassification(ViTConfig())`` — the default config is ViT-B/16 (hidden
768, 12 layers, 12 heads, MLP 3072, 224×224 images, patch 16; 86 M parameters), randomly initialised, no
download — exported with ``converters.export_torch`` through each torch exporter.

Each step runs in its own process, so each peak RSS is that step's own:

1. export (``exporter`` = torchscript / dynamo) to ``<folder>/vit_b16-<exporter>.onnx``;
2. ``onnxshap.DeepExplainer(path, background)`` with ``--background`` random 224² images: wall time, the RSS
   before the call (Python, numpy, onnx, onnxruntime imported, model not yet read) and the process's peak
   RSS, and the outcome — the exception class and first line of a refusal or failure, or "constructed".

    python benchmarks/vit_refusal.py                         # both exporters, background of 2 images
    python benchmarks/vit_refusal.py --exporters dynamo --background 4 --folder /tmp/vit

Prints one JSON object per (exporter, step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    """Current resident set size of this process, in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def export_step(exporter: str, path: Path) -> dict:
    """Export the randomly initialised ViT-B/16 through ``converters.export_torch``."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from converters import export_torch

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig()).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model(pixel_values=pixels).logits

    started = time.perf_counter()
    proto = export_torch(Logits(), torch.randn(2, 3, 224, 224), path, exporter=exporter,
                         opset=18 if exporter == "dynamo" else 17)
    return {"step": "export", "exporter": exporter, "seconds": round(time.perf_counter() - started, 1),
            "nodes": len(proto.graph.node), "peak_rss_mb": round(_peak_mb())}


def explain_step(exporter: str, path: Path, rows: int) -> dict:
    """Time ``DeepExplainer(path, background)`` and record its peak RSS and outcome."""
    import numpy as np

    import onnxshap

    background = np.random.default_rng(0).standard_normal((rows, 3, 224, 224), dtype=np.float32)
    before = _rss_mb()
    started = time.perf_counter()
    try:
        onnxshap.DeepExplainer(str(path), background)
        outcome = "constructed (no refusal)"
    except Exception as exc:  # noqa: BLE001 - the outcome is what we measure
        text = str(exc).strip()
        outcome = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    seconds = time.perf_counter() - started
    return {"step": "DeepExplainer", "exporter": exporter, "background_rows": rows,
            "seconds": round(seconds, 1), "rss_before_mb": round(before), "peak_rss_mb": round(_peak_mb()),
            "outcome": outcome}


def _child(args: list[str]) -> dict:
    """Run this script's ``--step`` in a fresh process; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, *args], check=False, capture_output=True, text=True, cwd=ROOT,
                          env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"step": args[1], "error": f"child exited {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"],
                        choices=["torchscript", "dynamo"])
    parser.add_argument("--background", type=int, default=2, help="background rows (224² images)")
    parser.add_argument("--folder", type=Path, default=None, help="where the exports go (default: a temp dir)")
    parser.add_argument("--step", choices=["export", "explain"], help=argparse.SUPPRESS)
    parser.add_argument("--exporter", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step == "export":
        print(json.dumps(export_step(args.exporter, args.path)))
        return 0
    if args.step == "explain":
        print(json.dumps(explain_step(args.exporter, args.path, args.background)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for exporter in args.exporters:
            path = folder / f"vit_b16-{exporter}.onnx"
            if not path.exists():
                print(json.dumps(_child(["--step", "export", "--exporter", exporter, "--path", str(path)])),
                      flush=True)
            print(json.dumps(_child(["--step", "explain", "--exporter", exporter, "--path", str(path),
                                     "--background", str(args.background)])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
