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

    class _GeneratorType(type):
        """Calls make a CUDA generator by default; isinstance and ``Generator | None`` annotations still work
        (a plain function in its place broke torch.distributed's and transformers' imports: first GPU run)."""

        def __call__(cls, device=None, *args, **kwargs):
            return _cpu_generator("cuda" if device is None else device, *args, **kwargs)

        def __instancecheck__(cls, obj):
            return isinstance(obj, _cpu_generator)

    class Generator(metaclass=_GeneratorType):
        pass

    torch.Generator = Generator
