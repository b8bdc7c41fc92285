"""Weight quantization: int8 / int4 weight-only and FP8 on load, and pre-quantized AWQ / GPTQ
checkpoints, over PyTorch's own kernels (see ``linear``).

| module | job |
|---|---|
| ``config`` | the ``quantization`` argument and a checkpoint's ``quantization_config`` → what to load |
| ``schemes`` | quantized-weight containers, their dequantization, quantize-on-load math |
| ``packing`` | eight 4-bit values per int32 word, in a given nibble order |
| ``awq`` / ``gptq`` | the published checkpoint formats: decode (load) and encode (the tiny-model writer) |
| ``linear`` | kernel layers per scheme and device; dequantize-at-load fallback with a warning |
| ``embedding`` | the int8 input embedding table every quantized model holds (unless tied to lm_head) |
| ``loading`` | builds the quantized layers and table while the checkpoint streams, one layer at a time |
| ``export`` | writes a float checkpoint's projections as AWQ / GPTQ (``tiny-model --quantize``) |
| ``footprint`` | weight bytes per scheme, for ``plan`` |
"""
