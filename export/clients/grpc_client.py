"""Classify image files with a model served by `gendd serve` (or Triton), over gRPC.

    python export/clients/grpc_client.py --url localhost:8001 --model quickstart --top 3 seven.png two.png

The same request as http_client.py on the gRPC half of the protocol (KServe v2
GRPCInferenceService): encoded files to '<model>_image', Triton's classification output back.
Needs tritonclient[grpc].
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    ap.add_argument("--url", default="localhost:8001", help="host:port of the gRPC endpoint")
    ap.add_argument("--model", default="quickstart", help="model name (the encoded-image model is '<model>_image')")
    ap.add_argument("--top", type=int, default=3, help="classes to show per image")
    args = ap.parse_args(argv)

    client = grpcclient.InferenceServerClient(args.url)
    blobs = np.array([p.read_bytes() for p in args.images], dtype=np.object_).reshape(-1, 1)  # [batch, 1], as Triton's config has it
    inp = grpcclient.InferInput("image_bytes", list(blobs.shape), "BYTES")
    inp.set_data_from_numpy(blobs)
    out = grpcclient.InferRequestedOutput("logits", class_count=args.top)
    result = client.infer(f"{args.model}_image", [inp], outputs=[out])
    for path, row in zip(args.images, result.as_numpy("logits")):
        print(path.name, " ".join(s.decode() for s in row))
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
