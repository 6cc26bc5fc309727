"""The test API server in its own process, seeded with a benchmark workload.

The state-build benchmark measures the CPU the *client* spends listing and building, so
the server must not share the benchmark's process (its CPU would be counted too) nor its
GIL (it would slow the client down). `python -m lbd.testing.apiserver --seed FILE` would
do, but its seed files go through PyYAML, which needs minutes for 20,000 objects; this
entry point builds the objects from the workload's own code instead.

Run: ``python -m benchmarks.seeded_apiserver --services N --endpoints-per-service E
--token T``; it prints ``listening on URL`` once every object is in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from benchmarks.workload import Workload
from lbd.testing.apiserver import ApiServer


async def _serve(args: argparse.Namespace) -> None:
    # History only needs to cover the reflectors' watches, which start after the list.
    server = ApiServer(token=args.token, bookmark_interval=60.0, history_size=1000)
    services, slices, node = Workload(args.services, args.endpoints_per_service).objects()
    server.put_object("nodes", node)
    server.put_objects("services", services)
    server.put_objects("endpointslices", slices)
    del services, slices
    await server.start(args.host, 0)
    print(f"listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seeded_apiserver")
    parser.add_argument("--services", type=int, required=True)
    parser.add_argument("--endpoints-per-service", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
