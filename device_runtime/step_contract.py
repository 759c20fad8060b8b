"""Names and constants of the step graph's contract, shared by the exporter and the device.

The exporter (``export/step_graph.py``) writes graphs with these names and the device runtime
(``device_runtime/step_backend.py``) feeds them; defined once here, in the lightest part.
"""

from __future__ import annotations

#: the learning rate input (float32 scalar)
STEP_LR = "lr"
#: the 1-based optimizer step input (float32 scalar) for AdamW's bias correction
STEP_T = "step"
#: prefixes of the AdamW moment inputs, and of every updated output
ADAM_M = "adam_m/"
ADAM_V = "adam_v/"
NEW = "new/"
#: AdamW constants (ONNX Runtime's adam_mode=1 defaults, the kit's optimizer since schema 1)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-6

#: the prompt-ensemble step graph (``--prompt-pool K``): K frozen pool prompts come in as one input
#: (K, tokens, hidden); the trainable ``ENSEMBLE_MIX`` (K logits) mixes them, P = sum_k softmax(mix)_k P_k
ENSEMBLE_GRAPH = "prompt_ensemble.onnx"
ENSEMBLE_MIX = "prompt_ensemble.mix"
ENSEMBLE_POOL = "prompt_ensemble.pool"
