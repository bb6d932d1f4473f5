"""pytest plugin for bench/gpu_check.sh: tensors the kernel tests create without a device go to CUDA.

tests/kernels build CPU tensors and set TRITON_INTERPRET=1 unless it is already set; gpu_check.sh
sets it to 0 and loads this plugin (``-p cuda_default_device``) so the same tests drive the compiled
kernels. Tests that pin a CPU generator or device explicitly still fail loudly on a device mismatch:
those failures are findings (the tests need a device fixture), not kernel bugs.
"""

import torch

if torch.cuda.is_available():
    torch.set_default_device("cuda")
