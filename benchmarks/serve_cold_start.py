"""Cold start of `gendd serve`: seconds from launching the command to the line that says the HTTP
port answers, for one or more ways of launching it, in turn, over several rounds.

    python benchmarks/serve_cold_start.py --artifacts ROOT --pipeline fashion_mnist \
        --launch "serve-only=/path/to/serve-venv/bin/gendd" --launch "full=/path/to/.venv/bin/gendd" \
        --rounds 4 --json cold_start.json

Each --launch is NAME=COMMAND (the command that runs gendd; extra words are allowed, e.g.
"python -m gendd_deploy"). Prints a table (mean ± standard error) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import subprocess
import time


def ready_after(command: list[str], artifacts: str, pipeline: str, timeout: float = 120.0) -> float:
    args = [*command, "serve", "-p", pipeline, "--artifacts", artifacts, "--http-port", "0", "--set", "serve.grpc_port=0"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            if "HTTP on" in line:
                return time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                break
        raise SystemExit(f"{' '.join(args)} did not report its HTTP port (exit {proc.poll()})")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--pipeline", default="fashion_mnist")
    ap.add_argument("--launch", action="append", required=True, help="NAME=COMMAND, repeatable")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default="serve_cold_start.json")
    a = ap.parse_args()
    launches = dict(item.split("=", 1) for item in a.launch)
    seconds: dict[str, list[float]] = {name: [] for name in launches}
    for _ in range(a.rounds):  # in turn, so drift on a noisy machine hits every launch alike
        for name, command in launches.items():
            seconds[name].append(ready_after(shlex.split(command), a.artifacts, a.pipeline))
    rows = []
    for name, xs in seconds.items():
        se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0
        rows.append({"launch": name, "command": launches[name], "mean_s": statistics.mean(xs), "se_s": se, "seconds": xs})
    print(f"{'launch':30s} {'ready after (s)':>18s}")
    for r in rows:
        print(f"{r['launch']:30s} {r['mean_s']:>10.2f} ± {r['se_s']:.2f}")
    with open(a.json, "w") as f:
        json.dump({"pipeline": a.pipeline, "rounds": a.rounds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
