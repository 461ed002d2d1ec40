"""Judge recorded SGLang requests with the real sglang 0.5.23 package (run by the side env's python,
``tests/sglang_side_env.py``; never imported by the test env, which has no sglang).

Input (``--log``): a torch file with ``{"log": [(path, body), ...]}`` -- what the SGLang emulator
recorded (``sglang_emulator.dump_state``) or bodies built by the client. For each request, what
the 0.5.23 server would do with it, with its own code:

* the route and its request class come from sglang's ``srt/entrypoints/http_server.py``, read
  with ``ast`` (the parameter annotated with an ``io_struct`` class); importing that module would
  start FastAPI's app and pull the GPU stack, and the source is the same authority;
* the body is validated as FastAPI does it: ``pydantic.TypeAdapter(cls).validate_json(raw)``, the
  schema the class declares (``msgspec_utils.msgspec_struct_pydantic_core_schema``): a missing
  required field or a value of the wrong type fails. That schema *ignores* unknown keys, so a
  misspelt field would be dropped silently by the server: the checker fails on any key that is
  not a field of the class (``msgspec.structs.fields``, or ``dataclasses.fields`` for
  ``GenerateReqInput``, a dataclass), which is stricter than the server;
* ``/generate``: also the server's contract gate (``api_contract.generate_contract_error``), then
  ``normalize_batch_and_arguments`` and, per request, ``SamplingParams(**sampling_params)`` with
  ``verify`` as the tokenizer manager does;
* ``/update_weights_from_distributed``: the receive side's ``getattr(torch, dtype)`` and
  ``torch.empty(shape, dtype)`` for every name (``weight_updater.py``);
* ``/update_weights_from_tensor``: each TP rank's payload (bytes after the schema's base64
  decoding) opened with ``monkey_patch_torch_reductions`` + ``MultiprocessingSerializer.deserialize``
  (sglang's ``SafeUnpickler`` allow-list), and a ``flattened_bucket`` rebuilt as
  ``_update_weights_from_flattened_bucket`` does: ``FlattenedTensorMetadata`` from the payload's
  metadata, then ``FlattenedTensorBucket(...).reconstruct_tensors()``. The rebuilt tensors are
  saved to ``--tensors-out`` (per request, per rank) for the test to compare bit for bit.
  CPU payloads carry shared-memory file descriptors that only a process holding the sender's
  multiprocessing authkey can fetch, once: ``RLMT_SENDER_AUTHKEY`` (hex) gives it.

Several ``--log`` files are judged in one run (the imports take most of its time). A file may
also hold ``"rejected"``: requests that must be refused (the summary gives why), which shows the
checks are not vacuous.

``--fields OUT.json`` writes each ``--classes`` io_struct class's fields and required fields, the
server's route table and the sampling-parameter names of the ``/generate`` contract
(``sglang/api/v1/api_types.py::_FIELDS_SamplingParams``).
``--import-only`` imports the modules and exits (the side env's readiness check).

The ``torchvision`` stub below is explained in ``tests/sglang_side_env.py``: a module-level import
of sglang's InternVL image helpers, reached through ``io_struct -> schedule_batch -> configs``,
that no code run here calls.
"""

import argparse
import ast
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"  # transformers compares it: an old version turns its torchvision paths off
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _TorchvisionStub())

import torch  # noqa: E402

from sglang.srt.managers import io_struct  # noqa: E402

MODULES = ("sglang.srt.managers.io_struct", "sglang.srt.weight_sync.tensor_bucket", "sglang.srt.utils.common",
           "sglang.srt.utils.patch_torch", "sglang.srt.entrypoints.api_contract")


def server_routes() -> dict[str, tuple[set[str], str | None]]:
    """route -> (methods, io_struct class of its body or None), read from http_server.py."""
    import importlib.util

    source = open(importlib.util.find_spec("sglang.srt.entrypoints.http_server").origin).read()
    routes = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.AsyncFunctionDef, ast.FunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"):
                continue
            if not dec.args or not isinstance(dec.args[0], ast.Constant):
                continue
            kind = dec.func.attr
            if kind in ("get", "post", "put"):
                methods = {kind.upper()}
            elif kind == "api_route":
                listed = [ast.literal_eval(k.value) for k in dec.keywords if k.arg == "methods"]
                methods = set(listed[0]) if listed else {"GET"}
            else:
                continue
            cls = None
            for arg in node.args.args:
                if arg.annotation is None:
                    continue
                names = {n.id for n in ast.walk(arg.annotation) if isinstance(n, ast.Name)}
                found = [n for n in names if isinstance(getattr(io_struct, n, None), type)
                         and getattr(io_struct, n).__module__ == io_struct.__name__]
                if found:
                    cls = found[0]
            routes[dec.args[0].value] = (methods, cls)
    return routes


def class_fields(name: str) -> tuple[list[str], list[str]]:
    """Field names and required field names of an io_struct request class: a msgspec struct
    (most requests) or a plain dataclass (``GenerateReqInput``)."""
    import dataclasses

    import msgspec

    cls = getattr(io_struct, name)
    if dataclasses.is_dataclass(cls):
        fields = dataclasses.fields(cls)
        missing = dataclasses.MISSING
    else:
        fields = msgspec.structs.fields(cls)
        missing = msgspec.NODEFAULT
    required = [f.name for f in fields if f.default is missing and f.default_factory is missing]
    return [f.name for f in fields], required


def check_generate(obj, body) -> None:
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.sampling.sampling_params import SamplingParams

    error = generate_contract_error(body)
    if error is not None:
        raise ValueError(f"/generate contract gate: {error}")
    obj.normalize_batch_and_arguments()
    params = body.get("sampling_params") or {}
    for p in params if isinstance(params, list) else [params]:
        sp = SamplingParams(**p)
        sp.verify(vocab_size=1 << 20)


def check_distributed(obj) -> None:
    if not (len(obj.names) == len(obj.dtypes) == len(obj.shapes)):
        raise ValueError("names, dtypes and shapes differ in length")
    for dtype, shape in zip(obj.dtypes, obj.shapes):
        target = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        torch.empty(shape, dtype=target, device="meta")


def open_tensor_payloads(obj) -> list[dict]:
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    ranks = []
    for payload in obj.serialized_named_tensors:  # what each TP rank's deserialize_own_rank opens
        if not isinstance(payload, bytes):
            raise TypeError(f"serialized_named_tensors holds {type(payload).__name__}, not bytes after validation")
        monkey_patch_torch_reductions()
        data = MultiprocessingSerializer.deserialize(payload)
        if obj.load_format == "flattened_bucket":
            metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                                end_idx=m.end_idx, numel=m.numel) for m in data["metadata"]]
            named = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=metadata).reconstruct_tensors()
        else:
            named = data
        ranks.append({name: t.clone() for name, t in named})
    return ranks


def check_request(routes: dict, path: str, body, tensors: list) -> str:
    """Judge one request as the 0.5.23 server would (module docstring); returns its route."""
    import pydantic

    route = path.split("?")[0]
    if route not in routes:
        raise ValueError(f"{route}: not a route of sglang's http_server.py")
    methods, cls_name = routes[route]
    if "POST" not in methods:
        raise ValueError(f"{route} does not take POST (it takes {sorted(methods)})")
    where = f"{route} ({cls_name})"
    if cls_name is None:
        if body not in (None, {}):
            raise ValueError(f"{route} takes no JSON body, got {body!r}")
        return route
    cls = getattr(io_struct, cls_name)
    unknown = set(body) - set(class_fields(cls_name)[0])
    if unknown:
        raise ValueError(f"{where}: {sorted(unknown)} are not fields of {cls_name} (the server would ignore them)")
    try:
        obj = pydantic.TypeAdapter(cls).validate_json(json.dumps(body))
    except pydantic.ValidationError as e:
        raise ValueError(f"{where}: the server's schema rejects the body: {e}") from None
    if route == "/generate":
        check_generate(obj, body)
    elif route == "/update_weights_from_distributed":
        check_distributed(obj)
    elif route == "/update_weights_from_tensor":
        tensors.append(open_tensor_payloads(obj))
    return route


def check_log(log, rejected=()) -> tuple[dict, list, list]:
    """Per-route counts of the accepted requests of ``log`` (any rejection raises), the tensors
    rebuilt from its tensor payloads, and the reasons each of ``rejected`` was refused (a request
    there that is accepted raises: it shows the checks are not vacuous)."""
    routes = server_routes()
    counts: dict[str, int] = {}
    tensors: list = []
    for path, body in log:
        if path.startswith("/_emulator"):
            continue
        route = check_request(routes, path, body, tensors)
        counts[route] = counts.get(route, 0) + 1
    reasons = []
    for path, body in rejected:
        try:
            check_request(routes, path, body, [])
        except Exception as e:  # noqa: BLE001 - the reason is the result
            reasons.append(f"{type(e).__name__}: {e}")
            continue
        raise ValueError(f"{path}: {body!r} was accepted but must be refused")
    return counts, tensors, reasons


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--import-only", action="store_true")
    p.add_argument("--fields", help="write the request classes' fields to this JSON file")
    p.add_argument("--classes", nargs="*", default=[])
    p.add_argument("--log", nargs="+", help="torch files with {'log': [(path, body), ...]} and optionally "
                   "'rejected': requests that must be refused")
    p.add_argument("--tensors-out", help="where to save the tensors rebuilt from /update_weights_from_tensor")
    p.add_argument("--summary-out", help="where to write the per-route counts (JSON)")
    a = p.parse_args()
    import importlib
    import sglang

    for m in MODULES:
        importlib.import_module(m)
    if sglang.__version__ != "0.5.23":
        raise SystemExit(f"expected sglang 0.5.23, found {sglang.__version__}")
    if a.import_only:
        return
    if a.fields:
        from sglang.api.v1 import api_types

        out = {"classes": {c: dict(zip(("fields", "required"), class_fields(c))) for c in a.classes},
               "routes": {r: [sorted(m), c] for r, (m, c) in server_routes().items()},
               "sampling_params": list(api_types._FIELDS_SamplingParams)}
        with open(a.fields, "w") as f:
            json.dump(out, f)
    if a.log:
        authkey = os.environ.get("RLMT_SENDER_AUTHKEY")
        if authkey:
            import multiprocessing

            multiprocessing.current_process().authkey = bytes.fromhex(authkey)
        summary, rebuilt = [], []
        for path in a.log:
            recorded = torch.load(path)
            counts, tensors, reasons = check_log(recorded["log"], recorded.get("rejected", ()))
            summary.append({"counts": counts, "rejected": reasons})
            rebuilt.append(tensors)
        if a.tensors_out:
            torch.save(rebuilt if len(a.log) > 1 else rebuilt[0], a.tensors_out)
        if a.summary_out:
            with open(a.summary_out, "w") as f:
                json.dump(summary, f)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
