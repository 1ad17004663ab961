"""Quantization: int8 / int4 / NF4 weights, GPTQ, quantized linear layers."""
