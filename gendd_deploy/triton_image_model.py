"""Triton Python-backend model '<name>_preprocess': encoded images -> the model's input tensor.

`gendd export --triton DIR` copies this file as DIR/<name>_preprocess/<N>/model.py, next to
- gendd_imaging.py: gendd's own image preprocessing (gendd_deploy/imaging.py, NumPy and Pillow only,
  the code `gendd serve` runs), and
- preprocess.json: the recipe from the model's manifest (size, channels, mean, std, resize), the
  pixel limits, and the names of the tensors to produce.
The ensemble '<name>_image' chains it to the tensor model '<name>', so a client sends the same
`image_bytes` request to Triton (or KServe's Triton runtime) as to `gendd serve`.

Runs inside Triton's Python backend stub; it needs NumPy and Pillow there (Triton's containers have
NumPy; `pip install pillow` in the image, or use a backend environment with it). Nothing here
imports gendd itself.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
IMAGING_FILE = "gendd_imaging.py"
RECIPE_FILE = "preprocess.json"


def _load_imaging():
    """gendd_imaging.py from this version folder, by path (the stub's sys.path may not hold it)."""
    spec = importlib.util.spec_from_file_location("gendd_imaging", HERE / IMAGING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args):
        self.imaging = _load_imaging()
        doc = json.loads((HERE / RECIPE_FILE).read_text(encoding="utf-8"))
        self.spec = doc["preprocess"]
        self.input_name = doc["input"]
        self.output_name = doc["output"]
        self.max_image_pixels = int(doc["max_image_pixels"])
        self.max_request_pixels = int(doc["max_request_pixels"])
        # a sampler that takes fresh noise gets it here, standard normal, a new draw per request
        self.noise = doc.get("noise")
        self.rng = np.random.default_rng()

    def _respond(self, request):
        blobs = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
        images = self.imaging.decode_batch(blobs, self.spec, self.max_image_pixels, self.max_request_pixels)
        outputs = [pb_utils.Tensor(self.output_name, images)]
        if self.noise:
            draw = self.rng.standard_normal((len(images), *self.noise["tail"]), dtype=np.float32)
            outputs.append(pb_utils.Tensor(self.noise["name"], draw))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def execute(self, requests):
        """One response per request; a request with an image that cannot be served gets an error
        response naming the element (the other requests of the batch are answered)."""
        responses = []
        for request in requests:
            try:
                responses.append(self._respond(request))
            except self.imaging.ImageRejected as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"input '{self.input_name}' {e}")))
        return responses
