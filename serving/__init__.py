"""Precision-aware LLM serving: one model, several precisions, routed by tier, canaried, shadowed, rolled back.

The package root imports nothing heavy: `serving.models.quantize` runs in the separate quantization
environment, which has no Ray and no vLLM.
"""

__version__ = "0.1.0"
