"""Load test of `gendd serve`: latency and throughput with and without dynamic batching.

Starts the server in a subprocess on a free 127.0.0.1 port, drives it with N concurrent clients
(threads, one persistent http.client connection each) for a bounded time per setting, and prints
p50 / p99 latency, throughput and errors for each (batching on / off) x concurrency. Only the
loopback interface is used.

Examples:
    python benchmarks/serve_load.py --onnx model.onnx --out serve_load.json
    python benchmarks/serve_load.py --artifacts artifacts --pipeline quickstart --payload png
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MAX_REQUESTS_PER_CLIENT = 200_000  # a second bound next to --duration


# ---- the server side (this script re-run with --child) ---------------------------------------


def _onnx_model(path: Path):
    from gendd_deploy.runtime.ort import OrtRunner

    runner = OrtRunner(path)
    shape = next(i.shape for i in runner.session.get_inputs() if i.name == runner.images_name)
    if not all(isinstance(d, int) for d in shape[1:]):
        raise SystemExit(f"{path}: input {runner.images_name} has no static (C, H, W): {shape}")
    out_name = runner.output_names[0]
    meta = {"name": path.stem, "input_shape": tuple(shape[1:]), "input_name": runner.images_name, "output_name": out_name}
    return runner, meta


def _artifact_model(root: str, pipeline: str, version: str | None):
    from rich.console import Console

    from gendd_deploy.artifacts import Store
    from gendd_deploy.config import PipelineConfig, Recipe
    from gendd_deploy.serve import load_artifact_model
    from gendd_deploy.stages import Context

    ctx = Context(recipe=Recipe(pipeline=PipelineConfig(name=pipeline)), store=Store(root), console=Console(stderr=True))
    return load_artifact_model(ctx, "onnxruntime", version)


def child(args: argparse.Namespace) -> None:
    from gendd_deploy.config import ServeConfig
    from gendd_deploy.serve import serve

    if args.onnx:
        runner, meta = _onnx_model(Path(args.onnx))
    else:
        runner, meta = _artifact_model(args.artifacts, args.pipeline, args.version)
    cfg = ServeConfig(host="127.0.0.1", port=0, grpc_port=-1, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, queue_size=args.queue_size)
    serve(runner, meta, cfg, request_timeout_s=60.0)


# ---- the client side ---------------------------------------------------------------------------


class Server:
    """The server subprocess, for one batching setting."""

    def __init__(self, args: argparse.Namespace, max_batch: int, max_delay_ms: float):
        cmd = [sys.executable, __file__, "--child", "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms), "--queue-size", str(args.queue_size)]
        cmd += ["--onnx", args.onnx] if args.onnx else ["--artifacts", args.artifacts, "--pipeline", args.pipeline] + (["--version", args.version] if args.version else [])
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        lines: queue.Queue = queue.Queue()  # a reader thread keeps draining stderr, so the child never blocks
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stderr] + [lines.put(None)], daemon=True).start()
        self.port, self.model_name, seen, end = None, None, [], time.monotonic() + 120
        while self.port is None and time.monotonic() < end:
            try:
                line = lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if (m := re.search(r"model '([^']+)'", line)) and self.model_name is None:
                self.model_name = m.group(1)  # the first model the server lists
            if m := re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
        if self.port is None:
            self.stop()
            raise SystemExit("the server did not start:\n" + "".join(seen))

    def get(self, path: str) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def batch_stats(self) -> tuple[float, float]:
        """(images, runner calls) so far, over every model (the batch-size histogram's sum and count)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.get("/metrics")[1].decode()
        vals = {"gendd_batch_size_sum": 0.0, "gendd_batch_size_count": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in vals:
                    vals[sample.name] += sample.value
        return vals["gendd_batch_size_sum"], vals["gendd_batch_size_count"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: graceful drain
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def make_payload(meta: dict, kind: str, images: int, seed: int = 0) -> tuple[bytes, dict]:
    """(body, headers) for one infer request of `images` images."""
    rng = np.random.default_rng(seed)
    shape = [images, *meta["inputs"][0]["shape"][1:]]
    name = meta["inputs"][0]["name"]
    if kind == "png":
        from PIL import Image

        C, H, W = shape[1:]
        blobs = []
        for _ in range(images):
            arr = rng.integers(0, 256, (H, W) if C == 1 else (H, W, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            blobs.append(base64.b64encode(buf.getvalue()).decode())
        body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [images], "data": blobs}]}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "binary":
        head = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": x.nbytes}}], "parameters": {"binary_data_output": True}}).encode()
        return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    body = {"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": x.ravel().tolist()}]}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def drive(port: int, path: str, body: bytes, headers: dict, clients: int, duration: float) -> dict:
    """`clients` threads send the same request back to back for `duration` seconds."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    codes: dict[int, int] = {}
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    end_at = [0.0]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start_gate.wait(30)
        sent = 0
        while time.monotonic() < end_at[0] and sent < MAX_REQUESTS_PER_CLIENT:
            sent += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t0
            if status == 200:
                latencies[i].append(dt)
            else:
                errors[i] += 1
            with lock:
                codes[status] = codes.get(status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    end_at[0] = time.monotonic() + duration
    t_start = time.perf_counter()
    start_gate.wait(30)
    for t in threads:
        t.join(duration + 120)
    elapsed = time.perf_counter() - t_start
    from gendd_deploy.runtime.timing import summary  # the one timing vocabulary: p50 / p90 / p95 / p99 / mean / n

    lat = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.zeros(0)
    ok = int(lat.size)
    timing = summary(list(lat * 1000)) if ok else {k: float("nan") for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms")}
    return {"ok": ok, "errors": int(sum(errors)), "codes": {str(k): v for k, v in sorted(codes.items())}, **timing, "req_per_s": ok / elapsed, "seconds": elapsed}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--onnx", help="an ONNX model with input (B, C, H, W) float32")
    src.add_argument("--artifacts", help="artifact root; serves the latest onnx artifact of --pipeline")
    ap.add_argument("--pipeline", help="pipeline name under --artifacts")
    ap.add_argument("--version", help="a specific artifact (pipeline/onnx/vN) instead of the latest")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per (batching, concurrency) setting")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--payload", choices=["json", "binary", "png"], default="json")
    ap.add_argument("--max-batch", type=int, default=32, help="max_batch with batching on")
    ap.add_argument("--max-delay-ms", type=float, default=5.0, help="max_delay_ms with batching on")
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="times to measure every setting, in turn (a fresh server each time); more than 1 adds mean +- standard error")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.onnx and not args.artifacts:
        ap.error("give --onnx PATH or --artifacts ROOT --pipeline NAME")
    if args.artifacts and not args.pipeline:
        ap.error("--artifacts needs --pipeline")
    if args.child:
        return child(args)
    if not 0 < args.duration <= 600 or max(args.concurrency) > 1024:
        ap.error("--duration must be in (0, 600] s and concurrency at most 1024")

    settings = [("on", args.max_batch, args.max_delay_ms), ("off", 1, 0.0)]
    runs = [(rnd, *s) for rnd in range(args.rounds) for s in settings]
    rows = []
    for rnd, label, max_batch, delay in runs:
        server = Server(args, max_batch, delay)
        try:
            meta = json.loads(server.get(f"/v2/models/{server.model_name}")[1])
            body, headers = make_payload(meta, args.payload, args.images)
            # encoded images go to the model's encoded-image sibling, '<name>_image'
            name = server.model_name + ("_image" if args.payload == "png" else "")
            if server.get(f"/v2/models/{name}")[0] != 200:
                raise SystemExit(f"the server has no model '{name}'; --payload png needs a model with a preprocessing spec (serve it from --artifacts)")
            path = f"/v2/models/{name}/infer"
            for clients in args.concurrency:
                drive(server.port, path, body, headers, clients, args.warmup)
                s0, c0 = server.batch_stats()
                r = drive(server.port, path, body, headers, clients, args.duration)
                s1, c1 = server.batch_stats()
                r.update(round=rnd, batching=label, max_batch=max_batch, max_delay_ms=delay, concurrency=clients, images_per_request=args.images)
                r["img_per_s"] = r["req_per_s"] * args.images
                r["mean_batch"] = (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")
                rows.append(r)
                print(
                    f"round {rnd} batching {label:3s} concurrency {clients:3d}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                    f"{r['req_per_s']:.0f} req/s, {r['errors']} errors, mean batch {r['mean_batch']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            server.stop()

    print_table(rows)
    summary = summarize(rows) if args.rounds > 1 else []
    if summary:
        print(f"\nmean +- standard error over {args.rounds} rounds")
        print_summary(summary)
    if args.out:
        out = {
            "source": args.onnx or f"{args.artifacts}:{args.pipeline}:{args.version or 'latest onnx'}",
            "payload": args.payload,
            "duration_s": args.duration,
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
            "results": rows,
            "summary": summary,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)


def summarize(rows: list[dict]) -> list[dict]:
    """Per (batching, concurrency): mean and standard error of req/s and p99 over the rounds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["batching"], r["concurrency"]), []).append(r)
    out = []
    for (batching, clients), rs in groups.items():
        row = {"batching": batching, "concurrency": clients, "rounds": len(rs)}
        for key in ("req_per_s", "p99_ms"):
            vals = np.array([r[key] for r in rs], dtype=float)
            row[key] = float(vals.mean())
            row[key + "_se"] = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        out.append(row)
    return out


def print_summary(summary: list[dict]) -> None:
    print(f"{'batching':>8}  {'concurrency':>11}  {'req_per_s':>14}  {'p99_ms':>14}")
    for s in sorted(summary, key=lambda s: (s["batching"] != "on", s["concurrency"])):
        print(
            f"{s['batching']:>8}  {s['concurrency']:>11}  {s['req_per_s']:>7.0f} +- {s['req_per_s_se']:<4.0f}  {s['p99_ms']:>6.1f} +- {s['p99_ms_se']:<4.1f}"
        )


def print_table(rows: list[dict]) -> None:
    cols = [("round", "{}"), ("batching", "{}"), ("concurrency", "{}"), ("p50_ms", "{:.2f}"), ("p99_ms", "{:.2f}"), ("req_per_s", "{:.0f}"), ("img_per_s", "{:.0f}"), ("mean_batch", "{:.1f}"), ("errors", "{}")]
    cells = [[fmt.format(r[c]) for c, fmt in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, (c, _) in enumerate(cols)]
    print("  ".join(c.rjust(w) for (c, _), w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
