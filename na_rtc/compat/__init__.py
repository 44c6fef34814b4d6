"""Historical NATTEN APIs on na_rtc's ops, so code and checkpoints written for
NATTEN run unchanged after an import change:

- :mod:`na_rtc.compat.natten014`: NATTEN 0.14 (``natten1dqkrpb``,
  ``natten2dav``, ... and the modules with ``rpb`` on by default).
- :mod:`na_rtc.compat.natten017`: NATTEN 0.17 (``na1d_qk``/``na2d_av``/``na3d_qk``
  split ops, fused ``na1d``/``na2d``/``na3d``, 0.15's ``natten3dqkrpb``/
  ``natten3dav``, the modules with ``rel_pos_bias``). NATTEN 0.14 had no 3D.

Both import torch (their modules are ``torch.nn.Module``\\s); import them
explicitly. Names, argument order, tensor layouts and state-dict keys are
NATTEN's; the implementation is na_rtc's.
"""

__all__ = ["natten014", "natten017"]
