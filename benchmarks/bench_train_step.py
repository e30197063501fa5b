"""Training-step throughput of zoo architectures on this machine: memory format and bfloat16 autocast.

Prints images per second for three settings, measured alternately in one run (the machine is shared and noisy, so
only the ratios to the default setting are worth comparing across runs):

- ``default``: NCHW, float32;
- ``nhwc``: channels_last, float32 (the zoo's ``channels_last`` setting);
- ``nhwc+bf16``: channels_last under ``torch.autocast(bfloat16)`` (a recipe's ``mixed_precision="bf16"``).
  bfloat16 pays off only on CPUs with native bf16 instructions (AVX-512 BF16, AMX) and on GPUs, and on such a CPU
  (AMD EPYC with AVX-512 BF16, torch 2.13) it sped up the dense-convolution models but slowed the depthwise ones.

    python benchmarks/bench_train_step.py [--threads 1] [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from reassembly import create_model

MODELS = [
    ("cifar_resnet20", {}),
    ("cifar_mobilenetv2_075", {}),
    ("cifar_mobilenext_075", {}),
    ("cifar_vgg16_bn", {"width": 0.5, "hidden": [256]}),
    ("cifar_vit_tiny", {}),
]
SETTINGS = {  # name: (memory format, autocast to bfloat16)
    "default": (torch.contiguous_format, False),
    "nhwc": (torch.channels_last, False),
    "nhwc+bf16": (torch.channels_last, True),
}


def step_seconds(model, optimizer, x, y, bf16: bool) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}; images/s and ratio to default")
    print(f"{'model':<24}" + "".join(f"{s:>12}" for s in SETTINGS) + "".join(f"{'x ' + s:>12}" for s in list(SETTINGS)[1:]))
    for name, kwargs in MODELS:
        setups, timings = {}, {}
        for setting, (fmt, bf16) in SETTINGS.items():
            torch.manual_seed(0)
            model = create_model(name, num_classes=5, **kwargs).to(memory_format=fmt)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
            y = torch.randint(0, 5, (args.batch,))
            step_seconds(model, optimizer, x, y, bf16)  # warm-up
            setups[setting], timings[setting] = (model, optimizer, x, y, bf16), []
        for _ in range(args.repeats):  # alternate, so every setting sees the same machine load
            for setting, setup in setups.items():
                timings[setting].append(step_seconds(*setup))
        rates = {s: args.batch / statistics.median(t) for s, t in timings.items()}
        ratios = [rates[s] / rates["default"] for s in list(SETTINGS)[1:]]
        print(f"{name:<24}" + "".join(f"{r:>12.0f}" for r in rates.values()) + "".join(f"{r:>12.2f}" for r in ratios))


if __name__ == "__main__":
    main()
