"""The napari widgets (Qt).  Each module holds one dock widget; ``_state`` holds the per-viewer session.

No widget is imported here, so Qt-free code (the CLI, ``omicsimage demo --headless``)
never pulls in Qt through this package.

Importing this package keeps ``triton`` out of the napari process (unless it is
already loaded, or ``OMICSIMAGE_ALLOW_TRITON=1``).  triton ships its own LLVM;
loading it after napari has created an OpenGL context driven by Mesa's llvmpipe
(also LLVM: software rendering, virtual machines, Xvfb/CI) kills the process
with a segmentation fault.  torchvision and captum import triton only for
``torch.compile`` kernels, which nothing here uses; without it torch runs
unchanged.
"""

import os as _os
import sys as _sys


def _keep_triton_out() -> None:
    if "triton" in _sys.modules or _os.environ.get("OMICSIMAGE_ALLOW_TRITON") == "1":
        return
    # a None entry makes `import triton` raise ImportError and find_spec("triton") return None,
    # which torch treats as "triton is not installed"
    _sys.modules["triton"] = None


_keep_triton_out()
