"""Serving: the Open Inference Protocol v2 (KServe / Triton, REST and gRPC) over the deployed model.

    serve(runner, model_meta, cfg)        blocking server until SIGTERM / SIGINT, then drain
    serve_artifacts(ctx, runtime, version) the same, for the pipeline's onnx artifact (`gendd serve`)
    InferenceServer(runner, model, cfg)   start() / stop() for embedding (tests, benchmarks)
    ServedModel                            what the server says about the model and reads requests by

The protocol (inputs, outputs, classification, seeds, errors) is described in protocol.py; server.py
is the HTTP half and the models behind it, grpc_frontend.py the gRPC half, launch.py the start.
Modules are light to import: nothing here loads a runtime until a runner is built.
"""

from gendd_deploy.serve.launch import load_artifact_model, serve, serve_artifacts
from gendd_deploy.serve.protocol import IMAGE_INPUT, TOPK_OUTPUT, ServedModel
from gendd_deploy.serve.server import InferenceServer

__all__ = ["IMAGE_INPUT", "TOPK_OUTPUT", "InferenceServer", "ServedModel", "load_artifact_model", "serve", "serve_artifacts"]
