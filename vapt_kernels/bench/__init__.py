"""The benchmark of VAPT against the frozen ViT and the official formulation (``vapt-bench``).

* :mod:`.harness`: the providers built from one backbone, their training and inference steps,
  interleaved timing, peak memory and result rows (also what ``benchmarks/test_bench_model.py``
  times);
* :mod:`.cli`: the ``vapt-bench`` command (``python -m vapt_kernels.bench``): arguments, table,
  ``results.csv`` and ``summary.json``;
* :mod:`.plot`: charts from a ``results.csv``.
"""
