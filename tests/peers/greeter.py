"""A gRPC greeter peer built on Python's grpcio, without generated code.

serve NAME ADDR   -- answers /helloworld.Greeter/SayHello with HelloReply{message: NAME}
                     (and /helloworld.Greeter/Fail with UNAVAILABLE, /Slow after 300 ms)
call ADDR COUNT [METHOD]
                  -- COUNT unary calls (SayHello, or METHOD) over ONE channel; prints:
                     {"ok": n, "by_backend": {...}, "errors": {"UNAVAILABLE": n, ...},
                      "first_error": "..."}
"""

import json
import sys
import time
from concurrent import futures

import grpc


def encode_string_field(value: str) -> bytes:
    """Protobuf field 1 (string): tag 0x0a, varint length, bytes."""
    data = value.encode()
    length, out = len(data), bytearray([0x0A])
    while True:
        byte = length & 0x7F
        length >>= 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes(out) + data


def decode_string_field(data: bytes) -> str:
    if not data or data[0] != 0x0A:
        return ""
    length, shift, i = 0, 0, 1
    while True:
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i += 1
        shift += 7
        if not byte & 0x80:
            break
    return data[i : i + length].decode()


def serve(name: str, addr: str) -> None:
    reply = encode_string_field(name)

    def say_hello(request, context):
        return reply

    def fail(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")

    def slow(request, context):
        time.sleep(0.3)
        return reply

    handler = grpc.method_handlers_generic_handler(
        "helloworld.Greeter",
        {
            "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    server.start()
    server.wait_for_termination()


def call(addr: str, count: int, method: str = "SayHello") -> None:
    by_backend, errors, first_error = {}, {}, None
    with grpc.insecure_channel(addr) as channel:
        say_hello = channel.unary_unary(f"/helloworld.Greeter/{method}")
        for _ in range(count):
            try:
                name = decode_string_field(say_hello(encode_string_field("probe"), timeout=10))
                by_backend[name] = by_backend.get(name, 0) + 1
            except grpc.RpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                first_error = first_error or e.details()
    ok = sum(by_backend.values())
    print(json.dumps({"ok": ok, "by_backend": by_backend, "errors": errors, "first_error": first_error}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "call":
        call(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
