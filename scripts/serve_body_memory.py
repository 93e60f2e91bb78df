#!/usr/bin/env python3
"""What request bodies in flight cost `bella-vqa serve` (loopback only, bounded: 40 connections).

    python3 scripts/serve_body_memory.py --bin BIN [-- SERVE_OPTIONS…]

Starts `BIN serve` on the embedded demo, waits for it to load, then opens 40 connections that each
announce a 19 MB chat request and send 18 MB of it without finishing, and prints the server's
resident memory (VmRSS) before and after, with the replies the connections got (503 when
`--max-body-memory-mb` is spent; still open otherwise). Standard library only.
"""
import argparse
import socket
import subprocess
import time

PORT = 18555
CLIENTS = 40
ANNOUNCED = 19 * 1024 * 1024
SENT_MB = 18


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("serve_options", nargs="*")
    args = parser.parse_args()
    server = subprocess.Popen(
        [args.bin, "-q", "serve", "--port", str(PORT), *args.serve_options],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(6)  # the demo loads
        before = rss_mib(server.pid)
        replies, held = {}, []
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {ANNOUNCED}\r\n\r\n"
            '{"a":"'
        ).encode()
        chunk = b"A" * (1 << 20)
        for _ in range(CLIENTS):
            s = socket.create_connection(("127.0.0.1", PORT))
            s.settimeout(0.3)
            s.sendall(head)
            try:
                for _ in range(SENT_MB):
                    s.sendall(chunk)
            except OSError:
                pass  # refused and closed
            try:
                reply = s.recv(64)[:12].decode(errors="replace") or "closed"
            except OSError:
                reply = "open"
            replies[reply] = replies.get(reply, 0) + 1
            held.append(s)
        time.sleep(2)
        print(
            f"RSS before {before} MiB, with {CLIENTS} clients holding {SENT_MB} of "
            f"{ANNOUNCED >> 20} MB each: {rss_mib(server.pid)} MiB; replies: {replies}"
        )
        for s in held:
            s.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
