"""What vapt-train's loop adds to a training step: its epoch over cached tensors against the bare
step that vapt-bench times (forward, cross-entropy, backward), on the same model and batch, in one
process, in alternating rounds (so that drift of a shared machine hits both alike).

    python benchmarks/train_overhead.py [--model vit_small_patch16_224] [--batch 8] [--steps 6] [--rounds 5]

Prints the median ms per step of each and their ratio (loop / bare step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import vapt_kernels as vk
from vapt_kernels import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--steps", type=int, default=6, help="steps per round (one vapt-train epoch)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="auto")
    opts = p.parse_args()

    import timm

    torch.manual_seed(0)
    model = timm.create_model(opts.model, num_classes=100)
    model = vk.apply_vapt(model, vk.VAPTConfig(num_prompts=opts.prompts), backend=opts.backend).train()
    size = model.patch_embed.img_size
    n = opts.batch * opts.steps
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, *size), torch.randint(0, 100, (n,)))
    args = train.build_parser().parse_args(
        ["--batch-size", str(opts.batch), "--workers", "0", "--lr", "0.01", "--epochs", "1000", "--log-interval", "50"]
    )
    d = train.Dist()
    loader, sampler = train.train_loader(data, args, d, opts.batch)
    optimizer = train.make_optimizer(model, args)
    scheduler = train.make_scheduler(optimizer, args, len(loader))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = data.tensors[0][: opts.batch], data.tensors[1][: opts.batch]

    def loop(epoch: int) -> float:
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train._train_epoch(model, loader, optimizer, scheduler, scaler, None, d, epoch, args, quiet=True)
        return (time.perf_counter() - t0) / len(loader)

    def bare() -> float:
        t0 = time.perf_counter()
        for _ in range(opts.steps):
            for q in model.parameters():
                q.grad = None
            F.cross_entropy(model(x), y).backward()
        return (time.perf_counter() - t0) / opts.steps

    loop(0), bare()  # warm-up
    times = {"vapt-train epoch": [], "bare step": []}
    for r in range(opts.rounds):
        order = [("vapt-train epoch", lambda: loop(r + 1)), ("bare step", bare)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(fn())
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"{opts.model}, batch {opts.batch}, {opts.prompts} prompts, {torch.get_num_threads()} threads, "
          f"{opts.rounds} rounds of {opts.steps} steps")
    for k, v in times.items():
        print(f"  {k:17s} median {med[k]:8.1f} ms/step   rounds: {', '.join(f'{t * 1000:.0f}' for t in v)}")
    print(f"  ratio loop / bare step: {med['vapt-train epoch'] / med['bare step']:.3f}")


if __name__ == "__main__":
    main()
