"""``python -m na_rtc bench``: na_rtc next to the alternatives, on the same inputs.

One module per job, so each can be read and tested alone:

- :mod:`.presets`  the problems (named presets and the free-form spec)
- :mod:`.flops`    exact neighbor counts and effective FLOPs
- :mod:`.timing`   CUDA-event / perf_counter timing with spread, peak memory
- :mod:`.entries`  the na_rtc entries (fused, split, straightforward kernels, reference)
- :mod:`.peers`    the other libraries' entries (naive torch NA, FlexAttention, NATTEN, SDPA)
- :mod:`.compile`  first-call compile and cached-load time of the kernel families
- :mod:`.runner`   runs problems x entries in resumable, time-budgeted slices
- :mod:`.report`   JSON environment, markdown tables, the table of docs/performance.md
- :mod:`.plot`     the PNG chart, drawn from the JSON
- :mod:`.profile`  one problem under ``torch.profiler``
- :mod:`.cli`      the command line

Nothing here imports torch, cupy or matplotlib at import time.
"""
