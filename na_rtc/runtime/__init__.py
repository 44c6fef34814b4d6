"""Kernel runtime: dispatch, kernel families, launch plans, NVRTC compilation, the disk cache and the
executors. Nothing here imports cupy or torch at module import.

* ``dispatch.py``: every op's candidate kernels in order, and the first that serves a call (``policy.py``:
  the call's settings and GPU architecture; ``composed.py``: the ops built of split kernels); ``ops.py``:
  the backends' op table, which runs those decisions per call and refuses what nothing serves;
* ``families/``: one module per kernel family (source file, instantiations, launch sizes, coverage rules,
  planners), registered in ``registry.py``;
* ``launch.py`` and ``kernel_args.py``: planned launches and the call's arrays as launch plans (``plan.py``);
* ``cuda.py`` and ``emulated.py``: the executors; ``nvrtc.py``, ``cache.py``, ``check.py``: compiling.
"""
