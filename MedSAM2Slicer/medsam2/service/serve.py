"""``medsam2 serve``: run the engine as an HTTP service for Slicer, the CLI and Python clients.

The token comes from ``--token-file`` or the ``MEDSAM2_SERVER_TOKEN`` environment variable (never from the
command line, where other users of the machine could read it); without either a random one is made and
printed. ``--port 0`` takes a free port; ``--ready-file`` receives ``{"url", "pid"}`` (written atomically)
once the server accepts connections, which is how a parent learns the port. ``--parent-pid`` makes the server
exit as soon as that process is gone: Slicer starts it so, and a crashed Slicer leaves no server behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

TOKEN_ENV = "MEDSAM2_SERVER_TOKEN"
MiB = 1 << 20
# The byte limits of ``engine.Limits`` that the command line takes in MiB.
_LIMITS_IN_MIB = {
    "max_request_bytes": "largest request body, MiB",
    "max_array_bytes": "largest uploaded array, uncompressed, MiB",
    "array_store_bytes": "memory for uploaded arrays, MiB",
    "feature_cache_bytes": "memory for cached image features per device, MiB",
    "checkpoint_bytes": "largest uploaded checkpoint, MiB",
}
log = logging.getLogger("medsam2.serve")


def build_parser() -> argparse.ArgumentParser:
    from .engine import Limits

    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="medsam2 serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--token-file", type=Path, help=f"file holding the token (else ${TOKEN_ENV})")
    parser.add_argument(
        "--cache-dir", type=Path, help="models and uploaded checkpoints (default: model cache)"
    )
    parser.add_argument("--ready-file", type=Path, help="write {url, pid} here once listening")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    for name, help_text in _LIMITS_IN_MIB.items():
        flag = "--" + name.replace("_bytes", "-mb").replace("_", "-")
        parser.add_argument(flag, dest=name, type=int, default=getattr(defaults, name) // MiB, help=help_text)
    parser.add_argument("--max-queued", type=int, default=defaults.max_queued, help="jobs waiting, at most")
    parser.add_argument(
        "--max-models",
        type=int,
        default=defaults.max_models,
        help="models kept loaded, the most recently used",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_models < 1:
        parser.error("--max-models must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = read_token(args.token_file)
    if token is None:
        token = secrets.token_urlsafe(32)
        print(f"medsam2 serve: no token given; this run's token is {token}", flush=True)
    if args.parent_pid is not None:
        watch_parent(args.parent_pid)
    if args.cache_dir is not None:
        os.environ["MEDSAM2_CACHE"] = str(args.cache_dir.expanduser().resolve())

    import uvicorn

    from .. import models
    from .app import create_app
    from .engine import Limits, ServiceEngine

    limits = Limits(
        max_queued=args.max_queued,
        max_models=args.max_models,
        **{name: getattr(args, name) * MiB for name in _LIMITS_IN_MIB},
    )
    engine = ServiceEngine(models.cache_dir(), limits)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    config = uvicorn.Config(create_app(engine, token), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if args.ready_file is not None:
        threading.Thread(
            target=_announce_when_started, args=(server, args.ready_file, url), daemon=True
        ).start()
    log.info("MedSAM2 engine service on %s (cache %s)", url, models.cache_dir())
    server.run(sockets=[sock])
    return 0


def read_token(path: Path | None) -> str | None:
    if path is not None:
        token = path.expanduser().read_text().strip()
        if not token:
            raise SystemExit(f"medsam2 serve: the token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _announce_when_started(server, ready_file: Path, url: str) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.02)
    partial = ready_file.with_name(ready_file.name + ".partial")
    partial.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    os.replace(partial, ready_file)


def watch_parent(pid: int, interval: float = 0.5) -> None:
    """End this process (at once, whatever runs) when process ``pid`` has ended."""
    alive = _process_watcher(pid)

    def watch() -> None:
        while alive():
            time.sleep(interval)
        log.warning("The parent process %d is gone: exiting", pid)
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def _process_watcher(pid: int):
    """A function telling whether ``pid`` still runs. On Windows a handle is held from now on, so that a new
    process reusing the number is not mistaken for the parent; on POSIX a parent that is our own parent is
    gone once we are re-parented (which also covers an un-reaped, zombie parent)."""
    if os.name == "nt":
        import ctypes

        synchronize, wait_timeout = 0x00100000, 0x102
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(synchronize, False, pid)
        if not handle:
            raise SystemExit(f"medsam2 serve: no process {pid} to watch")
        return lambda: kernel32.WaitForSingleObject(handle, 0) == wait_timeout
    if os.getppid() == pid:
        return lambda: os.getppid() == pid

    def exists() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    if not exists():
        raise SystemExit(f"medsam2 serve: no process {pid} to watch")
    return exists


if __name__ == "__main__":
    sys.exit(main())
