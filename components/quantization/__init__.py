"""Post-training quantization: variants of a registered fp32 model, measured and gated.

:mod:`.methods` builds a variant (torchao int8, bf16/fp16 casts, ONNX Runtime int8 dynamic
and fp16); :mod:`.measure` measures every variant against its parent through the model
runtime; :mod:`.results` holds the numbers and the gate; :mod:`.heldout` finds the parent
and the rows it was gated on; :mod:`.registering` logs and registers a passing variant and
picks what batch scoring serves; :mod:`.report` plots and records lineage.
The stored format of a variant is :mod:`stemma.components.model.quantized`.
"""
