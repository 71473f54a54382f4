"""What adding and removing one task costs a :class:`vapt_kernels.MultiTaskVAPT` as tasks pile up:
ViT-S/16, 10 prompts, a 100-class head per task; at R = 4, 64, 1024 and 4096 registered tasks,
the median over ``--repeats`` of one ``add_task`` (the last place) and of one ``remove_task`` (the
first place, so that every later task moves up one index), one thread.

    python benchmarks/multitask_add_remove.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import vapt_kernels as vk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--registered", type=int, nargs="+", default=[4, 64, 1024, 4096])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = vk.apply_vapt(timm.create_model("vit_small_patch16_224", num_classes=100), num_prompts=10)
    state = vk.trainable_state_dict(model)
    per_task = sum(v.numel() * v.element_size() for v in state.values())
    mt = vk.MultiTaskVAPT(model)
    print(f"one task: {per_task / 2**20:.2f} MiB of parameters ({sum(v.numel() for v in state.values()):,} values)")
    print("registered  add_task ms  remove_task ms")
    for registered in sorted(args.registered):
        while len(mt.tasks) < registered:
            mt.add_task(f"t{len(mt.tasks)}", state)
        adds, removes = [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            mt.add_task("extra", state)
            adds.append(time.perf_counter() - t0)
            mt.remove_task("extra")
            first = mt.tasks[0]
            t0 = time.perf_counter()
            mt.remove_task(first)
            removes.append(time.perf_counter() - t0)
            mt.add_task(first, state)  # back, at the end
        print(f"{registered:>10}  {1e3 * statistics.median(adds):>11.3f}  {1e3 * statistics.median(removes):>14.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
