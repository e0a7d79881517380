"""Engine integrations: quantreg inside the engines users run.

* :mod:`quantreg.integrations.vllm` -- a vLLM quantization method named ``quantreg``
  (entry point ``vllm.general_plugins``; opt-in with ``quantization="quantreg"``);
* :mod:`quantreg.integrations.transformers` -- ``enable()`` / ``disable()`` a transformers
  quantizer that loads the lm_head of AWQ, GPTQ and compressed-tensors checkpoints.

Each is thin glue over quantreg's public API (resolve, the method's ``create_weights``, the
per-parameter load hook, kernel selection) and imports its engine lazily: ``import quantreg``
never imports an engine, and an engine that is not installed costs nothing.
"""
