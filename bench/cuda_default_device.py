"""pytest plugin for bench/gpu_check.sh: tensors the kernel tests create without a device go to CUDA.

tests/kernels build CPU tensors and set TRITON_INTERPRET=1 unless it is already set; gpu_check.sh
sets it to 0 and loads this plugin (``-p cuda_default_device``) so the same tests drive the compiled
kernels. Their seeded generators are made without a device (``torch.Generator()``), which would be
CPU generators that CUDA factory calls refuse, so a generator made without a device is a CUDA one
here (the drawn numbers differ from CPU's; the tests compare kernels with the reference on the same
inputs, so that does not matter). Tests that pin a CPU device explicitly still fail loudly on a
device mismatch: those failures are findings (the tests need a device fixture), not kernel bugs.
"""

import torch

if torch.cuda.is_available():
    torch.set_default_device("cuda")
    _cpu_generator = torch.Generator

    def _generator(device=None):
        return _cpu_generator(device="cuda" if device is None else device)

    torch.Generator = _generator
