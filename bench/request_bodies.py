"""Peak memory of the web process while it is sent big request bodies.

Starts the studio's web process (uvicorn as `make run` does, or `--server daphne` for the old
way) on a throw-away data folder, then sends:
- an anonymous 300 MB POST to /datasets/upload/ (refused: anonymous bodies are capped at 64 KB),
- a signed-in upload of `--upload-mb` MB (default 1024) to /datasets/upload/ (accepted: 302).
Prints one JSON line per request: the HTTP answer, the bytes the client got to send, and the
web process's resident memory before and its peak (VmHWM) after.

    python bench/request_bodies.py                  # uvicorn
    python bench/request_bodies.py --server daphne  # what the studio used to run
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from metrics_latency import free_port, setup_environment  # noqa: E402

CHUNK = 1024 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)", status, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def send(port: int, head: bytes, body_bytes: int, body_prefix: bytes = b"", suffix: bytes = b""):
    """Send the head and then the body in 1 MiB chunks until done or the server stops us."""
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        s.sendall(head + body_prefix)
        sent = len(body_prefix)
        zeros = bytes(CHUNK)
        try:
            while sent < body_bytes - len(suffix):
                n = min(CHUNK, body_bytes - len(suffix) - sent)
                s.sendall(zeros[:n])
                sent += n
            s.sendall(suffix)
            sent += len(suffix)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(600)
        try:
            while chunk := s.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return status, sent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn")
    parser.add_argument("--anonymous-mb", type=int, default=300)
    parser.add_argument("--upload-mb", type=int, default=1024)
    args = parser.parse_args(argv)

    redis_proc = setup_environment()
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    from studio.runtime import start_web

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create_user("bench", password="bench-pass-123")
    web = Client()
    web.force_login(owner)
    session = web.cookies["sessionid"].value
    csrf = "b" * 32

    port = free_port()
    command = None  # uvicorn, as `make run` serves
    if args.server == "daphne":
        command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
        command.append("studio.asgi:application")
    try:
        server = start_web(port, command=command, timeout=120)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    try:
        # one page first, so start-up allocations are not counted as the upload's
        send(port, b"GET /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 0)

        boundary = b"benchboundary"
        fields = b"".join(
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="'
            + k
            + b'"\r\n\r\n'
            + v
            + b"\r\n"
            for k, v in (
                (b"name", b"bench"),
                (b"format", b"auto"),
                (b"language", b"en"),
                (b"csrfmiddlewaretoken", csrf.encode()),
            )
        )
        file_head = (
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="archive"; '
            b'filename="corpus.zip"\r\nContent-Type: application/zip\r\n\r\n'
        )
        tail = b"\r\n--" + boundary + b"--\r\n"
        cases = [
            ("anonymous", args.anonymous_mb, ""),
            ("signed_in", args.upload_mb, f"sessionid={session}; csrftoken={csrf}"),
        ]
        for who, mb, cookie in cases:
            body = fields + file_head + bytes(0) + tail
            total = len(body) + mb * CHUNK
            head = (
                f"POST /datasets/upload/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n"
                f"Content-Length: {total}\r\nReferer: http://127.0.0.1:{port}/datasets/new/\r\n"
                + (f"Cookie: {cookie}\r\n" if cookie else "")
                + "\r\n"
            ).encode()
            # Reset the peak (VmHWM) to the current size, so the peak is this request's.
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            before = memory_kib(server.pid)
            status, sent = send(port, head, total, body_prefix=fields + file_head, suffix=tail)
            after = memory_kib(server.pid)
            print(
                json.dumps(
                    {
                        "bench": "request_bodies",
                        "server": args.server,
                        "who": who,
                        "body_mb": mb,
                        "answer": status,
                        "client_sent_mb": round(sent / CHUNK, 1),
                        "rss_before_mb": round(before["VmRSS"] / 1024, 1),
                        "peak_after_mb": round(after["VmHWM"] / 1024, 1),
                        "peak_growth_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
                    }
                ),
                flush=True,
            )
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        if redis_proc is not None:
            redis_proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
