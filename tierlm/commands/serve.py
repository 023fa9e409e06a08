"""``tierlm serve``: the OpenAI-compatible HTTP server (tierlm.serve) over one engine."""

from __future__ import annotations

import argparse
import logging
import socket
import time

from tierlm.cli import engine_config
from tierlm.config import ConfigError

log = logging.getLogger("tierlm")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config = engine_config(args)
    check_port_free(args.host, args.port)  # before minutes of loading, not after
    # A server reports its progress, time-stamped: the configuration, each loading stage, and the
    # readiness line with the address (tierlm.serve.server.serve).
    logging.getLogger("tierlm").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.info("loading %s ...", config.model.model or "the default model (SmolLM2-135M-Instruct)")
    from tierlm.api import LLM
    from tierlm.serve.server import serve  # fastapi and uvicorn load only for this command

    llm = LLM.from_config(config)
    serve(llm, args.host, args.port, max_queue=args.max_queue, served_model_name=args.served_model_name,
          access_log=args.verbose, started=started)
    return 0


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` as the server will (SO_REUSEADDR, as uvicorn does) and let go; ConfigError
    naming --port (or --host) when that fails. Port 0 asks the OS for a free one and always works."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError("host", f"{host!r} is not an address of this machine ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            field = "port" if e.errno in (98, 13) else "host"  # EADDRINUSE, EACCES: the port; else the address
            raise ConfigError(field, f"cannot listen on {host}:{port}: {e.strerror}") from None
