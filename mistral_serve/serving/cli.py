"""``mistral-serve serve``: a local Ray (dashboard off) running the OpenAI-compatible app.

With no arguments it serves the embedded tiny model (built on first use into the cache
directory) on 127.0.0.1:8000, prints a curl example, and on Ctrl-C / SIGTERM shuts Serve and
Ray down before exiting.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_METRICS_PORT = 8080

CURL = """\
Serving {model!r} at {url}  (OpenAI API: {url}/v1)
Prometheus metrics (Ray's metrics agent): {metrics}

  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}'

  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

Any OpenAI client works too (optional: pip install openai), with base_url={url}/v1 and api_key={key}.

Press Ctrl-C to stop.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mistral-serve serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (embedded, default), a checkpoint dir or a hub repo id")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="LLMReplica replicas (one engine each)")
    p.add_argument("--separate-replica", action="store_true",
                   help="run the engine in an LLMReplica deployment of its own even with one replica, as `serve "
                        "deploy` does (default with --replicas 1: the engine runs in the Router's process, "
                        "router.colocate_engine)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (1 for production)")
    p.add_argument("--num-cpus", type=float, default=None, help="logical CPUs per replica (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--quantization", choices=["none", "int8", "int4", "fp8", "awq", "gptq"], default=None,
                   help="weight quantization (default none; AWQ/GPTQ checkpoints are detected; docs/quantization.md)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--gpu-price-usd-per-hour", type=float, default=None)
    p.add_argument("--api-keys-file", default=None, help="'tenant:key' lines (enables auth)")
    p.add_argument("--max-queue-wait-s", type=float, default=None,
                   help="refuse (429) requests that would wait longer than this to start (your TTFT objective)")
    p.add_argument("--args", default=None,
                   help="JSON (or @file.json / @file.yaml) with build_app args, merged under the flags above")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"port of Ray's Prometheus endpoint /metrics on 127.0.0.1 (default {DEFAULT_METRICS_PORT}; "
                        "0: any free port)")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: max(2, cores))")
    p.add_argument("--default-ray-intervals", action="store_true",
                   help="keep Ray Serve's default background intervals (default: the quieter ones of docs/serving.md)")
    return p.parse_args(argv)


def build_args(a: argparse.Namespace) -> dict:
    args: dict = {}
    if a.args:
        text = a.args
        if text.startswith("@"):
            path = Path(text[1:])
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                import yaml

                args = yaml.safe_load(text) or {}
            else:
                args = json.loads(text)
        else:
            args = json.loads(text)
    args["model"] = a.model if a.model != "tiny" or "model" not in args else args["model"]
    if a.served_model_name:
        args["served_model_name"] = a.served_model_name
    engine = dict(args.get("engine") or {})
    for flag, key in (("device", "device"), ("dtype", "dtype")):
        if getattr(a, flag) != "auto":
            engine[key] = getattr(a, flag)
    for key in ("max_model_len", "max_num_seqs", "kv_cache_memory_bytes", "quantization"):
        if getattr(a, key) is not None:
            engine[key] = getattr(a, key)
    args["engine"] = engine
    replicas = dict(args.get("replicas") or {})
    replicas["num_replicas"] = a.replicas
    if a.num_gpus:
        replicas["num_gpus"] = a.num_gpus
    if a.num_cpus is not None:
        replicas["num_cpus"] = a.num_cpus
    args["replicas"] = replicas
    router = dict(args.get("router") or {})
    if a.separate_replica:
        router["colocate_engine"] = False
    elif "colocate_engine" not in router:  # one engine: no Ray hop on the token path (AppArgs.single_engine)
        from mistral_serve.serving.config import AppArgs

        router["colocate_engine"] = AppArgs.model_validate({**args, "router": router}).single_engine
    args["router"] = router
    if a.gpu_price_usd_per_hour is not None:
        args.setdefault("cost", {})["gpu_price_usd_per_hour"] = a.gpu_price_usd_per_hour
    if a.api_keys_file:
        args.setdefault("admission", {})["api_keys_file"] = a.api_keys_file
    if a.max_queue_wait_s is not None:
        args.setdefault("admission", {})["max_queue_wait_s"] = a.max_queue_wait_s
    return args


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    args = build_args(a)
    from mistral_serve.serving.config import AppArgs

    parsed = AppArgs.model_validate(args)  # fail fast on a bad flag, before Ray starts
    if parsed.model == "tiny":
        from mistral_serve.model.tiny import ensure_tiny_model

        print(f"embedded tiny model: {ensure_tiny_model()}", flush=True)

    stop = threading.Event()
    starting = [True]

    def on_signal(signum, _frame):
        stop.set()
        if starting[0]:  # interrupt start_local wherever it waits (serve.run, the /ready poll)
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    from mistral_serve.serving.local import start_local, stop_local

    server = None
    try:
        ray_cpus = a.ray_cpus or max(2, os.cpu_count() or 2)
        if a.metrics_port:
            print(f"Prometheus metrics will be at http://127.0.0.1:{a.metrics_port}/metrics", flush=True)
        server = start_local(parsed.model_dump(mode="json"), host=a.host, port=a.port, num_cpus=ray_cpus,
                             metrics_port=a.metrics_port or None, quiet_ray=not a.default_ray_intervals)
        starting[0] = False
        if stop.is_set():
            return 0
        auth = parsed.admission.api_keys_file or parsed.admission.tenants
        print(CURL.format(model=server.model, url=server.base_url, metrics=server.metrics_url,
                          auth=" -H 'Authorization: Bearer YOUR_KEY'" if auth else "",
                          key="YOUR_KEY" if auth else "anything"), flush=True)
        while not stop.wait(0.5):
            pass
        print("\nstopping...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted, stopping...", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - a clear message, not a traceback, for a CLI user
        print(f"mistral-serve serve: {exc}", file=sys.stderr)
        return 1
    finally:
        starting[0] = False
        # Shutting down must not be cut short by a second Ctrl-C.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            stop_local()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if server is not None:
            print("stopped.", flush=True)
