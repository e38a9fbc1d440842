"""Tiny traffic agent run *inside* lab namespaces (standalone: imports nothing of ours).

``python flowagent.py serve --tcp 80,5001 --udp 5002,5003``
    Dual-stack echo servers (one thread per socket). Prints ``ready`` once every
    socket is bound, then serves until killed.

``python flowagent.py client tcp,10.0.1.1,8080 udp,fd00:2::2,5002 ...``
    Opens one flow per spec, proves each with one echoed byte, then prints one JSON
    line ``{"ready": [[proto, dst, dport, local_port], ...]}`` and holds the flows
    open. Commands on stdin, one per line, each answered by one JSON line:

    ``check``  every flow sends a byte and waits for its echo: ``{"check": [bool, ...]}``
    ``close``  closes every flow (TCP sends its FIN): ``{"closed": n}``

    End of stdin ends the agent. Holding the flows in one process lets a test keep
    TCP connections ESTABLISHED across a failover and check that they survive it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading

TIMEOUT = 2.0


def _echo_tcp(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def _serve_tcp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(128)

    def loop() -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_echo_tcp, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return sock


def _serve_udp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))

    def loop() -> None:
        while True:
            data, peer = sock.recvfrom(4096)
            sock.sendto(data, peer)

    threading.Thread(target=loop, daemon=True).start()
    return sock


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def serve(tcp: list[int], udp: list[int]) -> None:
    """Bind every echo server, announce ``ready``, serve until killed."""
    keep = [_serve_tcp(p) for p in tcp] + [_serve_udp(p) for p in udp]
    print("ready", flush=True)
    threading.Event().wait()
    del keep


def _open(spec: str) -> tuple[list[object], socket.socket]:
    proto, dst, port_text = spec.split(",")
    port = int(port_text)
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.settimeout(TIMEOUT)
    sock.connect((dst, port))
    _roundtrip(sock)
    return [proto, dst, port, sock.getsockname()[1]], sock


def _roundtrip(sock: socket.socket) -> bool:
    try:
        sock.send(b"x")
        return sock.recv(16) == b"x"
    except OSError:
        return False


def client(specs: list[str]) -> None:
    """Open the flows, announce them, then obey stdin commands (see module doc)."""
    opened = [_open(spec) for spec in specs]
    print(json.dumps({"ready": [info for info, _ in opened]}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "check":
            print(json.dumps({"check": [_roundtrip(s) for _, s in opened]}), flush=True)
        elif command == "close":
            for _, s in opened:
                s.close()
            print(json.dumps({"closed": len(opened)}), flush=True)


def main() -> None:
    """Command-line entry point (see module doc)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    srv = sub.add_parser("serve")
    srv.add_argument("--tcp", type=_ports, default=[])
    srv.add_argument("--udp", type=_ports, default=[])
    cli = sub.add_parser("client")
    cli.add_argument("specs", nargs="+")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.tcp, args.udp)
    else:
        client(args.specs)


if __name__ == "__main__":
    main()
