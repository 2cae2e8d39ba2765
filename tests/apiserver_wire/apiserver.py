#!/usr/bin/env python3
"""An apiserver stand-in on a TLS stack and an HTTP/2 implementation that are not ours
(Python's ssl, i.e. OpenSSL, and python-h2), for tests/apiserver_wire.rs.

It listens on 127.0.0.1 with the given certificate, offers the ALPN protocols it is told
(a real apiserver offers h2 and http/1.1), and answers every GET of
/api/v1/nodes/<name> with a Node object. It counts what a client did: connections, the
protocol each negotiated, and the requests made over each. `GET /stats` answers those
counts as JSON (over whichever protocol it comes; it is not counted). It prints its port on
the first line of stdout and serves until stdin closes.

usage: apiserver.py CERT KEY ALPN[,ALPN...]
"""

import json
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions

STATS_LOCK = threading.Lock()
STATS = {"connections": []}


def node(name):
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "uid": "u-" + name, "resourceVersion": "1"},
        }
    ).encode()


def answer(path, record):
    """Status, body for a GET of `path`; counts it on `record` unless it is /stats."""
    if path == "/stats":
        with STATS_LOCK:
            return 200, json.dumps(STATS).encode()
    with STATS_LOCK:
        record["requests"] += 1
    prefix = "/api/v1/nodes/"
    if path.startswith(prefix) and "/" not in path[len(prefix) :]:
        return 200, node(path[len(prefix) :])
    return 404, json.dumps({"kind": "Status", "code": 404, "reason": "NotFound"}).encode()


def serve_h2(tls, record):
    config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    paths = {}
    while True:
        data = tls.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                paths[event.stream_id] = headers.get(":path", "").split("?")[0]
                if event.stream_ended is not None:
                    reply_h2(conn, event.stream_id, paths.pop(event.stream_id), record)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in paths:
                reply_h2(conn, event.stream_id, paths.pop(event.stream_id), record)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                tls.sendall(conn.data_to_send())
                return
        tls.sendall(conn.data_to_send())


def reply_h2(conn, stream_id, path, record):
    status, body = answer(path, record)
    conn.send_headers(
        stream_id,
        [
            (":status", str(status)),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ],
    )
    conn.send_data(stream_id, body, end_stream=True)


def serve_http1(tls, record):
    buffered = b""
    while True:
        while b"\r\n\r\n" not in buffered:
            data = tls.recv(65536)
            if not data:
                return
            buffered += data
        head, buffered = buffered.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1].split("?")[0]
        status, body = answer(path, record)
        reason = "OK" if status == 200 else "Not Found"
        tls.sendall(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )


def handle(raw, context):
    try:
        tls = context.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError) as e:
        print(f"handshake failed: {e}", file=sys.stderr)
        raw.close()
        return
    protocol = tls.selected_alpn_protocol() or "none"
    record = {"alpn": protocol, "requests": 0}
    with STATS_LOCK:
        STATS["connections"].append(record)
    try:
        if protocol == "h2":
            serve_h2(tls, record)
        else:
            serve_http1(tls, record)
    except (ssl.SSLError, OSError, h2.exceptions.ProtocolError) as e:
        print(f"connection ended: {e}", file=sys.stderr)
    finally:
        tls.close()


def main():
    cert, key, alpn = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(alpn)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)

    def accept():
        while True:
            raw, _ = listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handle, args=(raw, context), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()


if __name__ == "__main__":
    main()
