"""The logged model's code: MLflow runs this file to build the model ("models from code").

``artifact.log_pyfunc_model`` passes this file's path as ``python_model``; MLflow copies it
into the model folder and executes it, standalone, whenever the model is logged or loaded.
So it imports Stemma by absolute name (the ``stemma`` package must be installed where the
model is served), defines no helpers anyone else imports, and ends with
``mlflow.models.set_model``.

Nothing is unpickled: the model is rebuilt from three artifact files that
``log_pyfunc_model`` writes,

* ``preprocess``: the fitted preprocessor as JSON (``Preprocessor.save_json``);
* ``network``: JSON with the network config, ``n_inputs``, ``n_outputs``, the task and,
  for a binary task, the decision ``threshold``;
* ``weights``: the trained weights as safetensors.

A quantized variant (``stemma run quantize``) is the same three files with a network JSON
of format 2, which names the method, and the variant's weights (torchao int8 tensors or
bf16/fp16 in safetensors); :func:`stemma.components.model.quantized.load_variant_network`
rebuilds it, still without unpickling anything. It runs eager here, except an ONNX Runtime
variant, which runs its own ``network.onnx`` (Stemma's own scoring runs every model
through :mod:`stemma.components.runtime`).
"""

# No `from __future__ import annotations`: MLflow reads predict()'s type hints at runtime.
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from stemma.components.model.artifact import DEFAULT_THRESHOLD, load_weights
from stemma.components.model.networks import build_network
from stemma.components.model.preprocessing import Preprocessor

#: Network JSON layouts this file can read: 1, an fp32 network; 2, a quantized variant.
SUPPORTED_NETWORK_FORMATS = (1, 2)
QUANTIZED_FORMAT = 2
#: Rows run through the network at once.
CHUNK_ROWS = 65_536


class StemmaModel(PythonModel):
    """Raw feature columns in; ``score`` (and for a classifier ``prediction``, and for
    multiclass each class's probability) out."""

    def load_context(self, context: Any) -> None:
        """Rebuild the preprocessor and the network from the model's artifact files."""
        document = json.loads(Path(context.artifacts["network"]).read_text(encoding="utf-8"))
        layout = document.get("format")
        if layout not in SUPPORTED_NETWORK_FORMATS:
            raise ValueError(
                f"network.json has format {layout!r}; this Stemma reads {SUPPORTED_NETWORK_FORMATS}"
            )
        self._preprocessor = Preprocessor.load_json(Path(context.artifacts["preprocess"]))
        self._task = str(document["task"])
        # log_pyfunc_model stores the threshold of a binary model; the default covers the rest.
        self._threshold = float(document.get("threshold", DEFAULT_THRESHOLD))
        self._session = None
        if layout == QUANTIZED_FORMAT:
            from stemma.components.model.quantized import load_variant_network, runtime_backend

            network = load_variant_network(document, Path(context.artifacts["weights"]))
            if runtime_backend(document) == "onnxruntime":  # the variant is its own graph
                import onnxruntime

                self._session = onnxruntime.InferenceSession(
                    context.artifacts["onnx"], providers=["CPUExecutionProvider"]
                )
        else:
            network = build_network(
                document["config"], int(document["n_inputs"]), int(document["n_outputs"])
            )
            load_weights(network, Path(context.artifacts["weights"]))
        self._network = network.eval()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Score raw rows; columns that are not features are ignored.

        Returns:
            A frame on the input's index with ``score`` (the probability of class 1, of the
            predicted class, or the predicted value), for a classifier ``prediction`` (binary:
            1 when the score is at least the threshold; multiclass: the likeliest class) and
            for multiclass one ``probability_<class>`` column per class.
        """
        matrix = self._preprocessor.transform(model_input)
        if self._session is not None:
            name = self._session.get_inputs()[0].name
            raw = np.asarray(self._session.run(None, {name: matrix})[0], dtype=np.float32)
        else:
            inputs = torch.from_numpy(matrix)
            with torch.inference_mode():  # in chunks, on the CPU
                chunks = [
                    self._network(inputs[start : start + CHUNK_ROWS])
                    for start in range(0, max(len(inputs), 1), CHUNK_ROWS)
                ]
                raw = torch.cat(chunks).float().numpy()
        scores = np.asarray(self._preprocessor.decode_output(raw), dtype=np.float64)
        return self._preprocessor.output_frame(
            scores, threshold=self._threshold, index=model_input.index
        )


mlflow.models.set_model(StemmaModel())
