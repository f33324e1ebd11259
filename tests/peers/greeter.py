"""A gRPC greeter peer built on Python's grpcio, without generated code.

serve NAME ADDR   -- answers /helloworld.Greeter/SayHello with HelloReply{message: NAME}
                     (and /helloworld.Greeter/Fail with UNAVAILABLE, /Slow after 300 ms)
semantics ADDR    -- client, server and bidirectional streaming, a deadline and a
                     cancellation; prints {"check": true/false or detail, ...}
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


def serve(name: str, addr: str, events: str = "") -> None:
    reply = encode_string_field(name)

    def collect(requests, context):
        total = sum(len(decode_string_field(r)) for r in requests)
        return encode_string_field(str(total))

    def spray(request, context):
        for i in range(int(decode_string_field(request))):
            yield encode_string_field(f"{name}-{i}")

    def chat(requests, context):
        for r in requests:
            yield encode_string_field("echo:" + decode_string_field(r))

    def hold(request, context):
        def cancelled():
            if events:
                with open(events, "a") as f:
                    f.write("cancelled\n")

        context.add_callback(cancelled)
        yield reply
        while context.is_active():
            time.sleep(0.01)

    def say_hello(request, context):
        return reply

    def drip(request, context):
        count, every_ms = (int(x) for x in decode_string_field(request).split(":"))
        for i in range(count):
            time.sleep(every_ms / 1000)
            yield encode_string_field(f"{name}-{i}")

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
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Spray": grpc.unary_stream_rpc_method_handler(spray),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Hold": grpc.unary_stream_rpc_method_handler(hold),
            "Drip": grpc.unary_stream_rpc_method_handler(drip),
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


def steady(addr: str, drip_count: int, drip_ms: int, started: str) -> None:
    """Unary calls back to back on one channel, and a fresh channel (a new connection) every
    tenth call, for as long as one server-streaming call of `drip_count` messages lasts.
    Touches `started` once the stream's first message has arrived."""
    import threading

    path = "/helloworld.Greeter/"
    drip = {"received": 0, "error": None}
    done = threading.Event()

    def stream():
        try:
            with grpc.insecure_channel(addr) as channel:
                call = channel.unary_stream(path + "Drip")
                for _ in call(encode_string_field(f"{drip_count}:{drip_ms}"), timeout=300):
                    drip["received"] += 1
                    if drip["received"] == 1:
                        open(started, "w").close()
        except grpc.RpcError as e:
            drip["error"] = f"{e.code().name}: {e.details()}"
        finally:
            done.set()

    by_backend, errors, first_error = {}, {}, None

    def one(say_hello):
        nonlocal first_error
        try:
            name = decode_string_field(say_hello(encode_string_field("probe"), timeout=10))
            by_backend[name] = by_backend.get(name, 0) + 1
        except grpc.RpcError as e:
            errors[e.code().name] = errors.get(e.code().name, 0) + 1
            first_error = first_error or e.details()

    threading.Thread(target=stream, daemon=True).start()
    calls = 0
    with grpc.insecure_channel(addr) as channel:
        say_hello = channel.unary_unary(path + "SayHello")
        while not done.is_set() and calls < 200_000:
            calls += 1
            if calls % 10 == 0:
                with grpc.insecure_channel(addr) as fresh:
                    one(fresh.unary_unary(path + "SayHello"))
            else:
                one(say_hello)
    ok = sum(by_backend.values())
    print(json.dumps({"ok": ok, "calls": calls, "by_backend": by_backend, "errors": errors,
                      "first_error": first_error, "drip": drip}))


def semantics(addr: str) -> None:
    results = {}
    path = "/helloworld.Greeter/"
    with grpc.insecure_channel(addr) as channel:
        words = [encode_string_field("x" * i) for i in range(1, 11)]
        total = channel.stream_unary(path + "Collect")(iter(words), timeout=10)
        results["client_streaming"] = decode_string_field(total) == str(sum(range(1, 11)))

        replies = list(channel.unary_stream(path + "Spray")(encode_string_field("50"), timeout=10))
        results["server_streaming"] = len(replies) == 50

        said = [encode_string_field(f"m{i}") for i in range(20)]
        echoed = [decode_string_field(r) for r in channel.stream_stream(path + "Chat")(iter(said), timeout=10)]
        results["bidi_streaming"] = echoed == [f"echo:m{i}" for i in range(20)]

        big = encode_string_field("y" * (3 << 20))
        total = channel.stream_unary(path + "Collect")(iter([big] * 4), timeout=30)
        results["large_messages"] = decode_string_field(total) == str(4 * (3 << 20))

        try:
            channel.unary_unary(path + "Slow")(encode_string_field("t"), timeout=0.1)
            results["deadline"] = "no error"
        except grpc.RpcError as e:
            results["deadline"] = e.code().name

        call = channel.unary_stream(path + "Hold")(encode_string_field("h"), timeout=10)
        next(call)
        call.cancel()
        results["cancelled"] = True
        time.sleep(0.5)
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:5])
    elif sys.argv[1] == "steady":
        steady(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "semantics":
        semantics(sys.argv[2])
    elif sys.argv[1] == "call":
        call(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
