"""Two roles for the SGLang broadcast-protocol test.

``--role server`` (a plain process): an emulation of an SGLang 0.5.23 server's weight-sync side:
an HTTP server on 127.0.0.1 with the routes the client uses; ``/init_weights_update_group`` joins
the group as SGLang's model runner does (``join_as_receiver``), ``/update_weights_from_distributed``
receives the bucket as SGLang's loader does (``receive_bucket``). After ``/continue_generation`` it
saves every request body and the received state dict to ``--out`` and exits.

``--role trainer`` (under torchrun, TP2 x PP2): load the tiny model, deliver every stage's buckets
to global rank 0 with ``buckets_at``, and push them from rank 0 with the real ``SGLangHTTPEngine``
and ``NCCLBroadcastTransport`` over gloo.
"""

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def serve(a):
    from rlmt_megatron.rollout.weight_sync.nccl_broadcast import join_as_receiver, receive_bucket

    state, log, group = {}, [], {}
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, obj, code=200):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            route = self.path.split("?")[0]
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            log.append((self.path, body))
            try:
                if route == "/init_weights_update_group":
                    group["pg"] = join_as_receiver(body["master_address"], body["master_port"], body["rank_offset"],
                                                   body["world_size"], body["group_name"], body["backend"],
                                                   tp_rank=0, timeout_s=60)
                    return self._reply({"success": True, "message": "Succeeded to initialize custom process group."})
                if route == "/update_weights_from_distributed":
                    for name, t in receive_bucket(group["pg"], body["names"], body["dtypes"], body["shapes"]):
                        state[name] = t
                    return self._reply({"success": True, "message": "Succeeded to update parameter online."})
                if route in ("/pause_generation", "/continue_generation"):
                    self._reply({"message": "ok", "status": "ok"})
                    if route == "/continue_generation":
                        done.set()
                    return
                if route == "/flush_cache":
                    return self._reply({})
                return self._reply({"error": f"no route {route}"}, 404)
            except Exception as e:  # noqa: BLE001
                return self._reply({"success": False, "message": f"{type(e).__name__}: {e}"}, 400)

    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    open(a.out + ".ready", "w").close()
    ok = done.wait(timeout=a.timeout)
    torch.save({"state": state, "log": log, "completed": ok}, a.out)
    server.shutdown()
    os._exit(0 if ok else 3)


def train(a):
    import torch.distributed as dist

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config import ModelBuildConfig, ParallelConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.rollout.sglang_engine import SGLangHTTPEngine
    from rlmt_megatron.checkpoint.hf_export import buckets_at
    from rlmt_megatron.rollout.weight_sync.nccl_broadcast import NCCLBroadcastTransport

    build = ModelBuildConfig(parallel=ParallelConfig(tp=2, pp=2))
    bootstrap.initialize(build.parallel)
    built = load_model(a.model, "policy", build)
    buckets = buckets_at(built, dst=0, bucket_bytes=a.bucket_bytes)
    if dist.get_rank() == 0:
        engine = SGLangHTTPEngine(a.url, timeout=30, control_timeout=30, weight_sync_timeout=60)
        transport = NCCLBroadcastTransport(engine, "127.0.0.1", a.master_port, engine_world_size=1,
                                           backend="gloo", timeout_s=60)
        transport.connect()
        transport.push(buckets, version=1)
        assert engine.weight_version == 1
        transport.close()
    else:
        for _ in buckets:
            pass
    bootstrap.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["server", "trainer"], required=True)
    p.add_argument("--model")
    p.add_argument("--url")
    p.add_argument("--port", type=int)
    p.add_argument("--master-port", type=int)
    p.add_argument("--bucket-bytes", type=int, default=256 * 1024)
    p.add_argument("--out")
    p.add_argument("--timeout", type=float, default=240)
    a = p.parse_args()
    if a.role == "server":
        serve(a)
    else:
        start = time.time()
        train(a)
        print(f"trainer done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
