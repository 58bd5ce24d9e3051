"""A STAND-IN for the ``vllm`` executable in tests: NOT vLLM.

It accepts what ``agentmesh``'s GPU backend runs — ``vllm serve MODEL --served-model-name NAME
--host H --port P --tensor-parallel-size K --max-num-seqs N [...]`` — writes what it was given (its
argv, ``CUDA_VISIBLE_DEVICES``, its pid) to ``$VLLM_STANDIN_RECORD_DIR/<pid>.json``, then becomes the
vLLM-compatible simulator (``python -m agentmesh.llm_gateway.simulator``) on that host and port, so
health checks and ``/metrics`` answer as a vLLM server's would. Tests point ``AGENTMESH_VLLM_BIN``
at a small wrapper script that runs this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vllm (test stand-in)")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--tensor-parallel-size", type=int, default=1)
    serve.add_argument("--max-num-seqs", type=int, default=None)
    args, unknown = ap.parse_known_args(argv)
    record_dir = os.environ.get("VLLM_STANDIN_RECORD_DIR")
    if record_dir:
        record = {
            "argv": argv,
            "model": args.model,
            "tensor_parallel_size": args.tensor_parallel_size,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(),
            "unknown_args": unknown,
        }
        Path(record_dir, f"{os.getpid()}.json").write_text(json.dumps(record))
    sim = [
        sys.executable, "-m", "agentmesh.llm_gateway.simulator",
        "--host", args.host, "--port", str(args.port), "--profile", "fast-test",
        "--model", args.served_model_name or args.model,
    ]  # fmt: skip
    if args.max_num_seqs:
        sim += ["--max-num-seqs", str(args.max_num_seqs)]
    os.execv(sys.executable, sim)  # same pid: the server's process group and death signal carry over
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
