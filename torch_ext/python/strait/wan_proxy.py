"""The simulated border's delay proxy: a user-space TCP relay that holds every
byte for a fixed one-way delay in each direction (the kernel here has no
tc netem). Run by strait.wan inside the border namespace; standalone (no torch,
no strait import) so it starts in a fraction of a second.

    python3 wan_proxy.py --delay-ms 75 --route NAME=LISTEN_HOST:PORT,TARGET_HOST:PORT ...

Prints "ready" once every route listens. On SIGTERM or SIGINT it prints one
JSON line, {NAME: {"to_site": bytes, "from_site": bytes}}, the bytes relayed
towards and from each route's target, and exits.

Each direction of each connection buffers at most --max-buffer bytes; a full
buffer stops reading, so TCP back-pressure reaches the sender and memory stays
bounded whatever the peers do.
"""

import argparse
import asyncio
import collections
import json
import signal
import sys

CHUNK = 256 * 1024


class Stats:
    def __init__(self, names):
        self.bytes = {n: {"to_site": 0, "from_site": 0} for n in names}


async def relay(reader, writer, delay_s, max_buffer, count):
    """Copies reader to writer, each chunk released delay_s after it arrived."""
    loop = asyncio.get_running_loop()
    queue = collections.deque()
    queued = 0
    changed = asyncio.Event()

    async def pump_in():
        nonlocal queued
        while True:
            while queued >= max_buffer:
                changed.clear()
                await changed.wait()
            data = await reader.read(CHUNK)
            queue.append((loop.time() + delay_s, data))
            queued += len(data)
            changed.set()
            if not data:
                return

    async def pump_out():
        nonlocal queued
        while True:
            while not queue:
                changed.clear()
                await changed.wait()
            due, data = queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.popleft()
            if not data:  # the sender closed its side: pass the close on, in order
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            queued -= len(data)
            count(len(data))
            changed.set()

    reading = asyncio.ensure_future(pump_in())
    try:
        await pump_out()
    finally:
        reading.cancel()


async def handle(client_r, client_w, target, delay_s, max_buffer, name, stats):
    try:
        site_r, site_w = await asyncio.wait_for(asyncio.open_connection(*target), timeout=5)
    except (OSError, asyncio.TimeoutError):
        client_w.close()  # the site is not listening (yet): the dialer retries
        return
    counters = stats.bytes[name]

    def to_site(n):
        counters["to_site"] += n

    def from_site(n):
        counters["from_site"] += n

    tasks = [asyncio.ensure_future(relay(client_r, site_w, delay_s, max_buffer, to_site)),
             asyncio.ensure_future(relay(site_r, client_w, delay_s, max_buffer, from_site))]
    try:
        # A reset on either side ends the connection in both directions.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                break
        else:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        for w in (client_w, site_w):
            w.close()


def parse_route(text):
    try:
        name, rest = text.split("=", 1)
        listen, target = rest.split(",", 1)

        def hp(s):
            host, port = s.rsplit(":", 1)
            return host, int(port)

        return name, hp(listen), hp(target)
    except ValueError:
        raise SystemExit(f"wan_proxy: bad route {text!r}: expected NAME=HOST:PORT,HOST:PORT")


async def main_async(args):
    routes = [parse_route(r) for r in args.route]
    stats = Stats([r[0] for r in routes])
    delay_s = args.delay_ms / 1000.0
    servers = []
    for name, listen, target in routes:
        def on_connect(r, w, target=target, name=name):
            return handle(r, w, target, delay_s, args.max_buffer, name, stats)
        servers.append(await asyncio.start_server(on_connect, *listen, reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    print(json.dumps(stats.bytes), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    ap.add_argument("--route", action="append", required=True, help="NAME=LISTEN_HOST:PORT,TARGET_HOST:PORT")
    ap.add_argument("--max-buffer", type=int, default=32 << 20, help="bytes held per direction per connection")
    args = ap.parse_args()
    try:
        asyncio.run(main_async(args))
    except OSError as e:
        print(f"wan_proxy: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
