#!/usr/bin/env python3
"""A kubelet stand-in on grpcio (gRPC C-core): a gRPC stack that is not Tandem's, driven the way
kubelet v1.36 drives a DRA plugin (../shared/reference/kubelet-wire.md):

- registration: a new connection per attempt, `:authority` = the percent-encoded socket path,
  GetInfo (1 s deadline), checks, the DRA connection and its health stream opened *before*
  NotifyRegistrationStatus (5 s), then the registration connection closed;
- DRA: one long-lived connection (`:authority` localhost), NodeWatchResources with no deadline
  held open, Prepare/Unprepare with 45 s deadlines, several at once on that one connection;
- a prepare cancelled at its deadline (RST_STREAM CANCEL) at many points of its run, each
  followed by the kubelet's retry, which must return the same devices and leave one CDI spec;
- deregistration on SIGTERM: the health stream ends and the sockets go away.

    kubelet.py session --registry-dir D --cdi-dir C --claims JSON [--kubelet-knows V]...
    kubelet.py deregister --registry-dir D --plugin-pid PID

Prints progress to stderr and a JSON summary to stdout; exits 1 with the reason on failure.
"""

import argparse
import concurrent.futures
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "crates", "kubelet-plugin", "proto")
PROTOS = {
    "registration": "pluginregistration/v1/api.proto",
    "dra_v1": "dra/v1/api.proto",
    "dra_v1beta1": "dra/v1beta1/api.proto",
    "health": "dra-health/v1alpha1/api.proto",
}
KUBELET_VERSIONS = ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
PREPARE_DEADLINE = 45.0


class Failure(Exception):
    pass


def log(message):
    print(f"kubelet.py: {message}", file=sys.stderr, flush=True)


def load_stubs():
    """Compiles the project's .proto files with protoc (grpcio-tools), each under its own name."""
    out = tempfile.mkdtemp(prefix="kubelet-wire-")
    modules = {}
    for name, relative in PROTOS.items():
        shutil.copy(os.path.join(PROTO_ROOT, relative), os.path.join(out, f"{name}.proto"))
        args = ["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}", f"{name}.proto"]
        if protoc.main(args) != 0:
            raise Failure(f"protoc failed on {relative}")
    sys.path.insert(0, out)
    for name in PROTOS:
        modules[name] = (importlib.import_module(f"{name}_pb2"), importlib.import_module(f"{name}_pb2_grpc"))
    return modules


STUBS = None


def stubs(name):
    return STUBS[name]


def find_registration_socket(registry_dir, timeout=30.0):
    """The kubelet's plugin watcher: any socket under the registry dir, dot-names skipped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for root, _, files in os.walk(registry_dir):
            for name in sorted(files):
                path = os.path.join(root, name)
                if not name.startswith(".") and _is_socket(path):
                    return path
        time.sleep(0.05)
    raise Failure(f"no registration socket appeared under {registry_dir}")


def _is_socket(path):
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def registration_channel(path):
    # grpc-go, given the bare path as target, sends it percent-encoded as :authority.
    authority = urllib.parse.quote(path, safe="")
    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0)]
    return grpc.insecure_channel(f"unix:{path}", options=options)


def dra_channel(endpoint):
    options = [("grpc.default_authority", "localhost"), ("grpc.enable_retries", 0)]
    return grpc.insecure_channel(f"unix:{endpoint}", options=options)


class HealthStream:
    """NodeWatchResources with no deadline, read on a thread for as long as it lasts."""

    def __init__(self, channel):
        pb, grpc_pb = stubs("health")
        self.call = grpc_pb.DRAResourceHealthStub(channel).NodeWatchResources(pb.NodeWatchResourcesRequest())
        self.messages = 0
        self.devices = 0
        self.ended = threading.Event()
        self.end_code = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for message in self.call:
                self.messages += 1
                self.devices = len(message.devices)
        except grpc.RpcError as error:
            self.end_code = error.code()
        finally:
            self.ended.set()

    def cancel(self):
        self.call.cancel()


class Registered:
    def __init__(self, version, endpoint, channel, health):
        self.version, self.endpoint, self.channel, self.health = version, endpoint, channel, health


def register(registry_dir, kubelet_knows, dra=None):
    """One registration attempt as the plugin manager makes it. `dra` reuses a DRA connection."""
    path = find_registration_socket(registry_dir)
    pb, grpc_pb = stubs("registration")
    channel = registration_channel(path)
    try:
        stub = grpc_pb.RegistrationStub(channel)
        info = stub.GetInfo(pb.InfoRequest(), timeout=1.0)
        problem = None
        if info.type != "DRAPlugin":
            problem = f"plugin type {info.type!r} is not DRAPlugin"
        version = next((v for v in info.supported_versions if v in kubelet_knows), None)
        if problem is None and version is None:
            problem = (
                f"none of services supported by the plugin ({list(info.supported_versions)}) "
                f"are supported by the kubelet ({kubelet_knows})"
            )
        if problem is not None:
            stub.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=False, error=problem), timeout=5.0)
            raise Failure(problem)
        endpoint = info.endpoint or path
        # The kubelet connects and starts the health stream before it sends Notify.
        if dra is None:
            dra = dra_channel(endpoint)
            health = HealthStream(dra)
        else:
            health = None
        stub.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=True), timeout=5.0)
        log(f"registered {info.name} at {endpoint} speaking {version} (authority {urllib.parse.quote(path, safe='')})")
        return Registered(version, endpoint, dra, health)
    finally:
        channel.close()


def dra_stub(registered):
    module = "dra_v1" if registered.version == "v1.DRAPlugin" else "dra_v1beta1"
    pb, grpc_pb = stubs(module)
    return pb, grpc_pb.DRAPluginStub(registered.channel)


def prepare(registered, claims, timeout=PREPARE_DEADLINE):
    pb, stub = dra_stub(registered)
    request = pb.NodePrepareResourcesRequest(claims=[pb.Claim(**c) for c in claims])
    return stub.NodePrepareResources(request, timeout=timeout)


def unprepare(registered, claims, timeout=PREPARE_DEADLINE):
    pb, stub = dra_stub(registered)
    request = pb.NodeUnprepareResourcesRequest(claims=[pb.Claim(**c) for c in claims])
    return stub.NodeUnprepareResources(request, timeout=timeout)


def devices_of(response, uid):
    if uid not in response.claims:
        raise Failure(f"response left out claim {uid}")
    answer = response.claims[uid]
    if answer.error:
        raise Failure(f"claim {uid}: {answer.error}")
    return sorted(
        (d.request_names[0] if d.request_names else "", d.pool_name, d.device_name, tuple(d.cdi_device_ids))
        for d in answer.devices
    )


def cdi_specs_of(cdi_dir, uid):
    return sorted(name for name in os.listdir(cdi_dir) if uid in name and not name.startswith("."))


def cancelled_prepares(registered, claim, cdi_dir, summary):
    """Prepare cancelled at its deadline at many points of its run, each followed by a retry.

    The fixed deadlines suit a slow run; a fast one (a warm plugin can prepare in under a
    millisecond) answers them all. So the sweep starts with deadlines at fractions of how long
    an uncancelled prepare of this claim took here (the faster of two), which fall inside the
    run however fast this machine is. The first prepares of a session can be several times
    slower than the later ones (a cold plugin, a loaded machine), so while nothing has been
    cancelled the sweep goes on with fractions of the fastest prepare it has seen answered.
    """
    uid = claim["uid"]
    took_ms = []
    for _ in range(2):
        started = time.monotonic()
        expected = devices_of(prepare(registered, [claim]), uid)
        took_ms.append((time.monotonic() - started) * 1000)
        unprepare(registered, [claim])
    fractions = (0.2, 0.4, 0.6, 0.8)
    fastest = [min(took_ms)]
    cancelled = 0

    def sweep(deadlines):
        nonlocal cancelled
        for deadline_ms in deadlines:
            started = time.monotonic()
            try:
                answer = prepare(registered, [claim], timeout=deadline_ms / 1000)
                fastest[0] = min(fastest[0], (time.monotonic() - started) * 1000)
                got = devices_of(answer, uid)
            except grpc.RpcError as error:
                # C-core reports a deadline that fires before the call got going as CANCELLED
                # "Timeout expired"; on the wire both are RST_STREAM(CANCEL).
                expired = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
                    error.code() == grpc.StatusCode.CANCELLED and "Timeout" in (error.details() or "")
                )
                if not expired:
                    raise Failure(f"prepare with a {deadline_ms:.3g} ms deadline: {error.code()} {error.details()}")
                cancelled += 1
                # The kubelet's retry after the deadline: same result, nothing half-written.
                got = devices_of(prepare(registered, [claim]), uid)
            if got != expected:
                raise Failure(f"retry after a {deadline_ms:.3g} ms deadline returned {got}, first prepare {expected}")
            specs = cdi_specs_of(cdi_dir, uid)
            if len(specs) != 1:
                raise Failure(f"after a {deadline_ms:.3g} ms deadline and its retry, CDI specs for {uid}: {specs}")
            with open(os.path.join(cdi_dir, specs[0])) as spec:
                json.load(spec)
            unprepare_answer = unprepare(registered, [claim]).claims[uid]
            if unprepare_answer.error:
                raise Failure(f"unprepare after a {deadline_ms:.3g} ms deadline: {unprepare_answer.error}")
            if cdi_specs_of(cdi_dir, uid):
                raise Failure(f"unprepare left CDI specs for {uid}: {cdi_specs_of(cdi_dir, uid)}")

    sweep([fastest[0] * f for f in fractions] + [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60])
    for _ in range(10):
        if cancelled:
            break
        sweep([fastest[0] * f for f in fractions])
    if cancelled == 0:
        raise Failure(
            f"no prepare was cancelled by its deadline (fastest answered {fastest[0]:.3g} ms): the sweep proved nothing"
        )
    summary["cancelled_prepares"] = cancelled


def session(args):
    claims = json.loads(args.claims)
    summary = {}
    knows = args.kubelet_knows or KUBELET_VERSIONS
    first = register(args.registry_dir, knows)
    if first.health is None or not first.health.call:
        raise Failure("no health stream")
    # Registration twice in a row (the kubelet re-registers after its own restart), each on a
    # new connection; the DRA connection and health stream of the first stay in use.
    second = register(args.registry_dir, knows, dra=first.channel)
    if second.endpoint != first.endpoint or second.version != first.version:
        raise Failure(f"second registration differs: {second.endpoint} {second.version}")
    summary["version"] = first.version
    summary["endpoint"] = first.endpoint

    # Every claim in its own call, all at once on the one DRA connection, beside the health stream.
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(claims)) as pool:
        answers = list(pool.map(lambda c: prepare(first, [c]), claims))
    prepared = {c["uid"]: devices_of(a, c["uid"]) for c, a in zip(claims, answers)}
    summary["prepared_concurrently"] = len(prepared)
    # A pod's claims in one call, as the kubelet batches them: the same devices again.
    batch = prepare(first, claims)
    for claim in claims:
        if devices_of(batch, claim["uid"]) != prepared[claim["uid"]]:
            raise Failure(f"batched re-prepare of {claim['uid']} gave other devices")
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(claims)) as pool:
        for claim, answer in zip(claims, pool.map(lambda c: unprepare(first, [c]), claims)):
            if answer.claims[claim["uid"]].error:
                raise Failure(f"unprepare {claim['uid']}: {answer.claims[claim['uid']].error}")

    cancelled_prepares(first, claims[0], args.cdi_dir, summary)

    if first.health.ended.is_set():
        raise Failure(f"the health stream ended early: {first.health.end_code}")
    deadline = time.monotonic() + 10
    while first.health.messages == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if first.health.messages == 0:
        raise Failure("the health stream sent no device list")
    summary["health_messages"] = first.health.messages
    summary["health_devices"] = first.health.devices
    first.health.cancel()
    first.channel.close()
    return summary


def deregister(args):
    registered = register(args.registry_dir, KUBELET_VERSIONS)
    socket_path = find_registration_socket(args.registry_dir)
    os.kill(args.plugin_pid, signal.SIGTERM)
    if not registered.health.ended.wait(15):
        raise Failure("the health stream was still open 15 s after SIGTERM")
    deadline = time.monotonic() + 15
    while (os.path.exists(socket_path) or os.path.exists(registered.endpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(socket_path) or os.path.exists(registered.endpoint):
        raise Failure("the sockets were still there 15 s after SIGTERM")
    registered.channel.close()
    return {"health_end": str(registered.health.end_code), "sockets_removed": True}


def main():
    global STUBS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    s = sub.add_parser("session")
    s.add_argument("--registry-dir", required=True)
    s.add_argument("--cdi-dir", required=True)
    s.add_argument("--claims", required=True, help='[{"namespace":..,"name":..,"uid":..}, ...]')
    s.add_argument("--kubelet-knows", action="append", choices=KUBELET_VERSIONS)
    d = sub.add_parser("deregister")
    d.add_argument("--registry-dir", required=True)
    d.add_argument("--plugin-pid", type=int, required=True)
    args = parser.parse_args()
    STUBS = load_stubs()
    try:
        summary = session(args) if args.scenario == "session" else deregister(args)
    except (Failure, grpc.RpcError) as error:
        detail = f"{error.code()} {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
        print(f"kubelet.py {args.scenario}: FAILED: {detail}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
