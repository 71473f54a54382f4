"""Target ratios from a ``benchmarks/test_bench_ops.py`` run: ``python benchmarks/ops_summary.py ops.json``
(the file written by ``--benchmark-json``).

* prefix attention (forward + backward) of each backend against SDPA over pre-concatenated keys and
  against concatenation + SDPA;
* ``norm_and_project`` (forward + backward) bandwidth, counting the bytes it must move, as a
  fraction of a device-to-device copy's;
* per op, the backends fastest first: the evidence for ``vapt_kernels.ops.AUTO_PREFERENCE``.
"""

from __future__ import annotations

import json
import sys


def summarize(report: dict) -> list[str]:
    runs = {b["name"]: b for b in report["benchmarks"]}
    median = {name: b["stats"]["median"] for name, b in runs.items()}
    lines = [f"machine: {report.get('machine_info', {}).get('cpu', {}).get('brand_raw', '?')}"]
    preconcat = median.get("test_preconcatenated_attention_fwd_bwd")
    cat = median.get("test_prefix_attention_fwd_bwd[cat+sdpa]")
    for name, t in sorted(median.items()):
        if not name.startswith("test_prefix_attention_fwd_bwd[") or name.endswith("[cat+sdpa]"):
            continue
        backend = name[name.index("[") + 1 : -1]
        parts = [f"prefix_attention {backend}: {t * 1e3:.3f} ms"]
        if preconcat:
            parts.append(f"{t / preconcat:.3f}x SDPA over pre-concatenated keys (target <= 1.10)")
        if cat:
            parts.append(f"{t / cat:.3f}x concatenation + SDPA (target < 1)")
        lines.append(", ".join(parts))
    copy = runs.get("test_copy")
    copy_bw = copy["extra_info"]["bytes"] / copy["stats"]["median"] if copy else None
    if copy_bw:
        lines.append(f"device copy: {copy_bw / 1e9:.1f} GB/s")
    for name, b in sorted(runs.items()):
        if name.startswith("test_norm_and_project_fwd_bwd[") and copy_bw:
            bw = b["extra_info"]["bytes"] / b["stats"]["median"]
            backend = name[name.index("[") + 1 : -1]
            lines.append(
                f"norm_and_project {backend}: {b['stats']['median'] * 1e3:.3f} ms, {bw / 1e9:.1f} GB/s = "
                f"{bw / copy_bw:.0%} of the copy (target >= 70%)"
            )
    for op in ("prefix_attention", "norm_and_project"):
        prefix = f"test_{op}_fwd_bwd["
        timed = sorted((t, name[len(prefix) : -1]) for name, t in median.items() if name.startswith(prefix))
        ranking = [b for _, b in timed if b != "cat+sdpa"]
        if ranking:
            lines.append(f"{op}, fastest first: {', '.join(ranking)}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        print("\n".join(summarize(json.load(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
