"""An MLServer inference runtime that serves one ONNX file with onnxruntime.

MLServer ships no ONNX runtime, so the serving benchmark (bench/serving.py) gives it this one:
the smallest runtime that does the job, written the way MLServer's own runtimes are (decode with
NumpyCodec, run, encode with NumpyCodec). The session gets the options the EdgeFleet agent uses
by default, so both servers run the same model the same way.

It runs inside the benchmark's MLServer venv (.bench-venv), never in the project's. A model's
model-settings.json names it and points at the file:

    {"name": "mlp", "implementation": "mlserver_runtime.OnnxRuntimeModel",
     "parameters": {"uri": "/path/to/mlp/1/model.onnx", "version": "1"}}
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


def session_options() -> ort.SessionOptions:
    """The agent's defaults (runtimes/onnx.py): runtime-chosen intra-op threads, one inter-op,
    threads that stop spinning when a run ends."""
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(
            path, sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
        self._output_names = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # NumpyCodec decodes to the dtype the request declares (FP32 -> float32).
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, array)
                for name, array in zip(self._output_names, results, strict=True)
            ],
        )
