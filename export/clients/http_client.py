"""Classify image files with a model served by `gendd serve` (or Triton), over HTTP.

    python export/clients/http_client.py --url localhost:8000 --model quickstart --top 3 seven.png two.png

Sends the encoded files to the model's encoded-image sibling ('<model>_image', input 'image_bytes'),
which decodes and preprocesses them exactly as in training, and asks for Triton's classification
output (class_count): per image, the top classes as 'logit:index:label'. Needs tritonclient[http].
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    ap.add_argument("--url", default="localhost:8000", help="host:port of the HTTP endpoint")
    ap.add_argument("--model", default="quickstart", help="model name (the encoded-image model is '<model>_image')")
    ap.add_argument("--top", type=int, default=3, help="classes to show per image")
    args = ap.parse_args(argv)

    client = httpclient.InferenceServerClient(args.url)
    blobs = np.array([p.read_bytes() for p in args.images], dtype=np.object_).reshape(-1, 1)  # [batch, 1], as Triton's config has it
    inp = httpclient.InferInput("image_bytes", list(blobs.shape), "BYTES")
    inp.set_data_from_numpy(blobs)  # binary by default: image bytes are not text
    out = httpclient.InferRequestedOutput("logits", class_count=args.top)
    result = client.infer(f"{args.model}_image", [inp], outputs=[out])
    for path, row in zip(args.images, result.as_numpy("logits")):
        print(path.name, " ".join(s.decode() for s in row))
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
