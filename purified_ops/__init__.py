"""purified_ops: fused feature purification for PurifiedLearning (arXiv 2102.10955).

``purify(x, z)`` removes from each feature row its projection onto that sample's
task-irrelevant directions, with fused CPU and CUDA kernels registered as PyTorch ops.
"""
from .layer import PurifyLayer
from .ops import (PurifyFunction, available_backends, build_info, cpu_cache_bytes, empty_cpu_cache, export_decompositions,
                  purify)

__version__ = "0.1.0"

__all__ = ["PurifyFunction", "PurifyLayer", "available_backends", "build_info", "cpu_cache_bytes", "empty_cpu_cache",
           "export_decompositions", "purify", "__version__"]
