"""What a CI log needs to read a numerics failure from another machine: the CPU, its vector
extensions, the BLAS library and the kernel OpenBLAS picked, and the numeric packages' versions."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform


def cpu() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "neon") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {', '.join(ext) or 'no AVX2/AVX-512'})"


def main() -> None:
    print(f"cpu: {cpu()}")
    print(f"python: {platform.python_version()} on {platform.platform()}")
    try:
        import numpy  # noqa: F401  (each loads its own BLAS, which threadpoolctl then sees)
        import scipy.linalg  # noqa: F401
        import threadpoolctl

        for lib in threadpoolctl.threadpool_info():
            print(f"blas: {lib.get('internal_api')} {lib.get('version')} kernel={lib.get('architecture')} "
                  f"threads={lib.get('num_threads')} ({os.path.basename(lib.get('filepath', ''))})")
    except ImportError as exc:
        print(f"blas: unknown ({exc})")
    for var in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            print(f"env: {var}={os.environ[var]}")
    names = ("numpy", "scipy", "pandas", "pyarrow", "xgboost-cpu", "onnx", "onnxruntime", "duckdb", "pyspark",
             "torch", "scikit-learn", "sqlglot", "mlflow")
    versions = []
    for n in names:
        try:
            versions.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            versions.append(f"{n} -")
    print("packages: " + ", ".join(versions))


if __name__ == "__main__":
    main()
