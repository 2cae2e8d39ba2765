#!/usr/bin/env python3
"""The kubelet's registration dial, byte for byte, from an HTTP/2 client that is not ours.

kubelet v1.36 (grpc-go 1.79.3) dials the registration socket by bare path, so it sends the
percent-encoded socket path as :authority. This client writes the frames the way
../shared/reference/kubelet-wire.md measured them: the preface, a SETTINGS frame with no
parameters, no request before the server's SETTINGS, HEADERS (END_HEADERS, never END_STREAM,
HPACK with the dynamic table and Huffman, the nine headers of §3 in order), one DATA frame with
END_STREAM per request, a connection WINDOW_UPDATE and a BDP PING after every DATA frame it
receives, ACKs for the server's SETTINGS and PINGs, and GOAWAY(NO_ERROR) naming its own highest
stream before closing. HPACK comes from the `hpack` package (the one python-h2 uses).

    raw_kubelet.py SOCKET [--authority MODE]...   MODE: encoded | localhost | empty | absent

Prints one JSON line per attempt and exits non-zero when any attempt failed.
"""

import argparse
import json
import socket
import struct
import sys
import urllib.parse

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
BDP_PING = bytes([0x02, 0x04, 0x10, 0x10, 0x09, 0x0E, 0x07, 0x07])
ERROR_CODES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL"}


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(payload):
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class Connection:
    def __init__(self, path, timeout):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.highest_stream = 0
        self.events = []
        self.pings_sent = 0
        self.ping_acks = 0

    def send(self, data):
        self.sock.sendall(data)

    def read_frame(self):
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        length = int.from_bytes(self.buffer[:3], "big")
        kind, flags = self.buffer[3], self.buffer[4]
        stream = struct.unpack(">I", self.buffer[5:9])[0] & 0x7FFFFFFF
        payload = self.buffer[9 : 9 + length]
        self.buffer = self.buffer[9 + length :]
        return kind, flags, stream, payload

    def handshake(self):
        # An empty SETTINGS: every setting keeps its default, as grpc-go leaves them.
        self.send(PREFACE + frame(SETTINGS, 0, 0))
        while True:
            kind, flags, _, _ = self.read_frame()
            if kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
                return
            self.events.append(f"frame {kind} before the server's SETTINGS")

    def call(self, path, authority, message, timeout_us):
        self.highest_stream += 2 if self.highest_stream else 1
        stream = self.highest_stream
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path)]
        if authority is not None:
            headers.append((":authority", authority))
        headers += [
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.79.3"),
            ("te", "trailers"),
            ("grpc-accept-encoding", "gzip"),
            ("grpc-timeout", f"{timeout_us}u"),
        ]
        block = self.encoder.encode(headers, huffman=True)
        self.send(frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, grpc_message(message)))
        response_headers, body, trailers = None, b"", None
        while trailers is None:
            kind, flags, on_stream, payload = self.read_frame()
            if kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            elif kind == PING:
                self.on_ping(flags, payload)
            elif kind == GOAWAY:
                code = struct.unpack(">I", payload[4:8])[0]
                raise ConnectionError(f"GOAWAY {ERROR_CODES.get(code, code)}: {payload[8:]!r}")
            elif kind == RST_STREAM and on_stream == stream:
                code = struct.unpack(">I", payload)[0]
                raise ConnectionError(f"RST_STREAM {ERROR_CODES.get(code, code)} on stream {stream}")
            elif kind == DATA and on_stream == stream:
                body += payload
                if payload:
                    # What grpc-go does after every DATA frame: return the window, probe the BDP.
                    self.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(payload))) + frame(PING, 0, 0, BDP_PING))
                    self.pings_sent += 1
                if flags & END_STREAM:
                    trailers = {}
            elif kind == HEADERS and on_stream == stream:
                decoded = dict(self.decoder.decode(payload))
                if response_headers is None:
                    response_headers = decoded
                    if flags & END_STREAM:
                        trailers = decoded  # trailers-only reply
                else:
                    trailers = decoded
        return response_headers or {}, body, trailers

    def on_ping(self, flags, payload):
        if flags & ACK:
            if payload != BDP_PING:
                raise ConnectionError(f"PING ACK with payload {payload.hex()}, sent {BDP_PING.hex()}")
            self.ping_acks += 1
        else:
            self.send(frame(PING, ACK, 0, payload))

    def await_ping_acks(self):
        """grpc-go needs the server to ACK every BDP PING it sent."""
        while self.ping_acks < self.pings_sent:
            kind, flags, _, payload = self.read_frame()
            if kind == PING:
                self.on_ping(flags, payload)

    def close(self):
        self.send(frame(GOAWAY, 0, 0, struct.pack(">II", self.highest_stream, 0) + b"client transport shutdown"))
        self.sock.close()


def decode_fields(body):
    """A flat protobuf decode: field number -> list of (wire type, value)."""
    if len(body) < 5:
        return {}
    data, fields, i = body[5:], {}, 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.setdefault(number, []).append(varint())
        elif wire == 2:
            n = varint()
            fields.setdefault(number, []).append(data[i : i + n].decode())
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return fields


def register(path, mode):
    authority = {
        "encoded": urllib.parse.quote(path, safe=""),
        "localhost": "localhost",
        "empty": "",
        "absent": None,
    }[mode]
    result = {"authority": mode}
    conn = Connection(path, timeout=10)
    try:
        conn.handshake()
        headers, body, trailers = conn.call("/pluginregistration.Registration/GetInfo", authority, b"", 999562)
        result["getinfo_status"] = headers.get(":status") if isinstance(headers, dict) else None
        result["getinfo_grpc_status"] = trailers.get("grpc-status")
        info = decode_fields(body)
        result["type"] = (info.get(1) or [""])[0]
        result["name"] = (info.get(2) or [""])[0]
        result["endpoint"] = (info.get(3) or [""])[0]
        result["versions"] = info.get(4, [])
        # RegistrationStatus{plugin_registered: true}: bytes 08 01.
        _, _, trailers = conn.call(
            "/pluginregistration.Registration/NotifyRegistrationStatus", authority, b"\x08\x01", 4999795
        )
        result["notify_grpc_status"] = trailers.get("grpc-status")
        conn.await_ping_acks()
        result["bdp_pings_acked"] = conn.ping_acks
        conn.close()
        result["ok"] = (
            result["getinfo_grpc_status"] == "0"
            and result["notify_grpc_status"] == "0"
            and result["type"] == "DRAPlugin"
            and result["bdp_pings_acked"] >= 2
        )
    except (ConnectionError, OSError, ValueError) as error:
        result["ok"] = False
        result["error"] = str(error)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("socket")
    parser.add_argument("--authority", action="append", choices=["encoded", "localhost", "empty", "absent"])
    args = parser.parse_args()
    failed = False
    for mode in args.authority or ["encoded"]:
        result = register(args.socket, mode)
        print(json.dumps(result), flush=True)
        failed |= not result["ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
