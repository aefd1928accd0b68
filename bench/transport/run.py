#!/usr/bin/env python3
"""`./strait bench transport [--json]`: the gateway's goodput next to raw TCP.

Two processes exchange a payload (256 MiB each way by default, the pattern of
a two-site all-gather): raw TCP sockets (bench/transport/raw_tcp.cc), then two
strait gateways in plaintext and with CurveZMQ, all on loopback in one run.
CurveZMQ runs twice on loopback: one stream, and the default number of
parallel streams (transport.streams). As root it repeats raw TCP and the
gateway across two network namespaces joined by a veth pair limited to 100
Mbit/s with `tc tbf`, then across long fat links of the simulated border
(strait.wan: rate and round trip, e.g. 1gbit-150ms): raw TCP with one
connection and with as many as strait's streams, strait with one stream and
with its default. The gateway runs CurveZMQ there: strait refuses plaintext
off loopback by design, so shaped_plain_mbps is null and shaped_curve_mbps
carries the figure.

Rates are in bits per second (Gbit/s, Mbit/s) of payload, one direction.
Progress goes to stderr; --json prints one JSON object on stdout.
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402  (distinct ports within this process)
from strait import wan as strait_wan  # noqa: E402

DEFAULT_STREAMS = 8  # core::kDefaultStreams (core/config/config.h)

NS = ("strait-bench-a", "strait-bench-b")
NS_ADDR = ("10.77.0.1", "10.77.0.2")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_pair(cmds, timeout):
    """Starts two commands, waits for both, returns their stdout."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"bench transport: {cmds[0][0]} did not finish within {timeout} s")
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"bench transport: {' '.join(p.args)} failed ({p.returncode}): {err.strip()}")
        outs.append(out)
    return outs


def raw_tcp(binary, addrs, ports, nbytes, rounds, wrap=(None, None), streams=1):
    cmds = []
    for i in range(2):
        c = [binary, "--listen", f"{addrs[i]}:{ports[i]}", "--peer", f"{addrs[1 - i]}:{ports[1 - i]}",
             "--bytes", str(nbytes), "--rounds", str(rounds), "--streams", str(streams)]
        cmds.append((wrap[i] or []) + c)
    outs = run_pair(cmds, timeout=600)
    secs = max(float(re.search(r"seconds ([0-9.]+)", o).group(1)) for o in outs)
    return nbytes * 8 / secs


def gateway(binary, ports, nbytes, rounds, keys=None, chunk=1 << 20, wrap=(None, None), hosts=None, streams=1):
    cmds = []
    for i in range(2):
        c = [binary, "--site", str(i), "--ports", ",".join(map(str, ports)), "--rounds", str(rounds),
             "--bytes", str(nbytes), "--chunk", str(chunk), "--hard-deadline-ms", "600000",
             "--round-deadline-ms", "600000", "--streams", str(streams)]
        c += ["--keys", keys] if keys else ["--insecure"]
        if hosts:
            c += ["--hosts", ",".join(hosts)]
        cmds.append((wrap[i] or []) + c)
    outs = run_pair(cmds, timeout=900)
    best = min(float(s) for o in outs for s in re.findall(r"seconds ([0-9.]+)", o))
    return nbytes * 8 / best


def setup_namespaces(rate_mbit):
    teardown_namespaces()
    cmds = [
        ["ip", "netns", "add", NS[0]], ["ip", "netns", "add", NS[1]],
        ["ip", "link", "add", "strait-va", "type", "veth", "peer", "name", "strait-vb"],
        ["ip", "link", "set", "strait-va", "netns", NS[0]], ["ip", "link", "set", "strait-vb", "netns", NS[1]],
    ]
    for i, dev in enumerate(("strait-va", "strait-vb")):
        ns = ["ip", "netns", "exec", NS[i]]
        cmds += [ns + ["ip", "addr", "add", f"{NS_ADDR[i]}/24", "dev", dev], ns + ["ip", "link", "set", dev, "up"],
                 ns + ["ip", "link", "set", "lo", "up"],
                 ns + ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                       "burst", "128kb", "latency", "100ms"]]
    for c in cmds:
        subprocess.run(c, check=True, capture_output=True)


class CpuMeter:
    """The machine's busy fraction (all cores) between start and stop, from /proc/stat."""

    def __enter__(self):
        self.t0 = self._read()
        return self

    def __exit__(self, *exc):
        t1 = self._read()
        d = [b - a for a, b in zip(self.t0, t1)]
        self.busy = 1 - (d[3] + d[4]) / max(1, sum(d))  # idle + iowait

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]


def long_fat_link(profile, tcp_bin, peer_bin, keys_bin, nbytes, rounds, streams):
    """Raw TCP and strait across the simulated border's `profile`."""
    rate, rtt = strait_wan.parse_profile(profile)
    out = {"link_mbps": rate / 1e6, "rtt_ms": rtt * 1000, "payload_bytes": nbytes, "streams": streams}
    with strait_wan.Border(profile, ["s0", "s1"], log=log) as border:
        addrs = (border.site_addr(0), border.site_addr(1))
        wrap = (border.prefix("s0"), border.prefix("s1"))
        # What caps one connection: its largest send buffer over the round trip.
        wmem = subprocess.run(wrap[0] + ["sysctl", "-n", "net.ipv4.tcp_wmem"], capture_output=True,
                              text=True).stdout.split()
        if wmem:
            out["tcp_wmem_max"] = int(wmem[-1])
            out["one_stream_window_bound_mbps"] = int(wmem[-1]) * 8 / rtt / 1e6
        for n in sorted({1, streams}):
            log(f"{profile}: raw TCP, {n} connection(s) each way, {nbytes >> 20} MiB ...")
            with CpuMeter() as cpu:
                out[f"raw_tcp_{n}_mbps"] = raw_tcp(tcp_bin, addrs, (7301, 7301), nbytes, rounds, wrap, n) / 1e6
            out[f"raw_tcp_{n}_cpu_busy"] = cpu.busy
        keydir = tempfile.mkdtemp(prefix="strait-bench-keys-")
        try:
            for s in ("s0", "s1"):
                subprocess.run([keys_bin, "generate", s, "--dir", keydir], check=True, capture_output=True)
            for n in sorted({1, streams}):
                log(f"{profile}: strait CurveZMQ, {n} stream(s) ...")
                with CpuMeter() as cpu:
                    out[f"strait_{n}_mbps"] = gateway(peer_bin, (7401, 7401), nbytes, rounds, keys=keydir, wrap=wrap,
                                                      hosts=addrs, streams=n) / 1e6
                out[f"strait_{n}_cpu_busy"] = cpu.busy
        finally:
            shutil.rmtree(keydir, ignore_errors=True)
    link = rate / 1e6
    out["strait_vs_link"] = out[f"strait_{streams}_mbps"] / link
    out["strait_1_vs_link"] = out["strait_1_mbps"] / link
    out["raw_tcp_1_vs_link"] = out["raw_tcp_1_mbps"] / link
    out["streams_vs_one"] = out[f"strait_{streams}_mbps"] / out["strait_1_mbps"]
    return out


def idle_rounds(profile, tcp_bin, peer_bin, keys_bin, nbytes, gap_ms, rounds, streams):
    """A small payload each way after the link sat idle (DiLoCo's pattern:
    a sync every few seconds), raw TCP next to strait, under the host's TCP
    settings and, where the kernel allows them in a namespace, Reno with and
    without slow start after idle. Each figure is the median time of a
    round (both payloads in at both sides), the first round left out."""
    allowed = open("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read().split()
    settings = [("namespace default", None)]
    if "reno" in allowed:
        settings += [("reno, slow start after idle", ("reno", "1")), ("reno, no slow start after idle", ("reno", "0"))]
    out = {"profile": profile, "payload_bytes": nbytes, "gap_ms": gap_ms, "rounds": rounds, "streams": streams,
           "settings": {}}

    def rounds_after_first(outs, pattern, key):
        """{key: the median, key_all: every time} of both processes' rounds."""
        times = [float(x) for o in outs for x in re.findall(pattern, o)[1:]]
        return {key: statistics.median(times) if times else None, key + "_all": times}

    keydir = tempfile.mkdtemp(prefix="strait-bench-keys-")
    try:
        for s in ("s0", "s1"):
            subprocess.run([keys_bin, "generate", s, "--dir", keydir], check=True, capture_output=True)
        for name, tcp in settings:
            sysctls = [f"net.ipv4.tcp_congestion_control={tcp[0]}",
                       f"net.ipv4.tcp_slow_start_after_idle={tcp[1]}"] if tcp else []
            with strait_wan.Border(profile, ["s0", "s1"], log=lambda m: None, sysctls=sysctls) as border:
                addrs = (border.site_addr(0), border.site_addr(1))
                wrap = (border.prefix("s0"), border.prefix("s1"))
                # What the sites' TCP is (a new namespace does not take this
                # host's per-namespace settings), read inside each.
                row = {"tcp": [subprocess.run(w + ["sysctl", "-n", "net.ipv4.tcp_congestion_control",
                                                   "net.ipv4.tcp_slow_start_after_idle"], capture_output=True,
                                              text=True, check=True).stdout.split() for w in wrap]}
                log(f"{profile}, {name}: raw TCP, {nbytes} bytes each way every {gap_ms} ms ...")
                cmds = [w + [tcp_bin, "--listen", f"{addrs[i]}:7301", "--peer", f"{addrs[1 - i]}:7301", "--bytes",
                             str(nbytes), "--rounds", str(rounds), "--gap-ms", str(gap_ms)] for i, w in enumerate(wrap)]
                row.update(rounds_after_first(run_pair(cmds, timeout=600), r"round \d+ seconds ([0-9.]+)",
                                              "raw_tcp_s"))
                for n in sorted({1, streams}):
                    log(f"{profile}, {name}: strait, {n} stream(s) ...")
                    cmds = [w + [peer_bin, "--site", str(i), "--ports", "7401,7401", "--hosts", ",".join(addrs),
                                 "--keys", keydir, "--rounds", str(rounds), "--bytes", str(nbytes), "--gap-ms",
                                 str(gap_ms), "--heartbeat-ms", "500", "--streams", str(n),
                                 "--round-deadline-ms", "600000", "--hard-deadline-ms", "600000"]
                            for i, w in enumerate(wrap)]
                    row.update(rounds_after_first(run_pair(cmds, timeout=600), r"round \d+ ok seconds ([0-9.]+)",
                                                  f"strait_{n}_s"))
                out["settings"][name] = row
    finally:
        shutil.rmtree(keydir, ignore_errors=True)
    return out


def teardown_namespaces():
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--bytes", type=int, default=256 << 20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-shaped", action="store_true", help="skip the network-namespace run")
    ap.add_argument("--rate-mbit", type=int, default=100)
    ap.add_argument("--wan", default="1gbit-150ms,10gbit-50ms",
                    help="long fat links of the simulated border, comma-separated ('' skips them)")
    ap.add_argument("--wan-bytes", type=int, default=512 << 20, help="payload each way on a long fat link")
    ap.add_argument("--wan-rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=DEFAULT_STREAMS, help="strait's streams next to one")
    ap.add_argument("--idle", action="store_true",
                    help="instead: a small payload after an idle gap (DiLoCo's syncs), raw TCP next to strait, "
                         "under several TCP settings (needs root)")
    ap.add_argument("--idle-wan", default="100mbit-150ms", help="--idle: the simulated border")
    ap.add_argument("--idle-bytes", type=int, default=77740,
                    help="--idle: payload each way (default: a DiLoCo sign payload of bench e2e's model)")
    ap.add_argument("--idle-gap-ms", type=int, default=2000, help="--idle: idle time between rounds")
    ap.add_argument("--idle-rounds", type=int, default=12, help="--idle: rounds (the first is left out)")
    args = ap.parse_args()
    if args.idle:
        return idle_main(args)

    tcp_bin = os.path.join(args.build, "bench", "strait_bench_tcp")
    peer_bin = os.path.join(args.build, "tests", "cpp", "strait_test_peer")
    keys_bin = os.path.join(args.build, "transport", "strait_keys")
    n = args.bytes
    res = {"payload_bytes": n, "units": "bits per second of payload, one direction"}

    lo = ("127.0.0.1", "127.0.0.1")
    log(f"raw TCP, loopback, {n >> 20} MiB each way ...")
    res["raw_tcp_gbps"] = raw_tcp(tcp_bin, lo, (free_port(), free_port()), n, args.rounds) / 1e9
    log("strait gateway, plaintext, loopback ...")
    res["plain_gbps"] = gateway(peer_bin, (free_port(), free_port()), n, args.rounds) / 1e9
    keydir = tempfile.mkdtemp(prefix="strait-bench-keys-")
    try:
        for s in ("s0", "s1"):
            subprocess.run([keys_bin, "generate", s, "--dir", keydir], check=True, capture_output=True)
        log("strait gateway, CurveZMQ, loopback, one stream ...")
        with CpuMeter() as cpu:
            res["curve_gbps"] = gateway(peer_bin, (free_port(), free_port()), n, args.rounds, keys=keydir) / 1e9
        res["curve_cpu_busy"] = cpu.busy
        log(f"strait gateway, CurveZMQ, loopback, {args.streams} streams ...")
        with CpuMeter() as cpu:
            res["curve_streams_gbps"] = gateway(peer_bin, (free_port(), free_port()), n, args.rounds, keys=keydir,
                                                streams=args.streams) / 1e9
        res["curve_streams_cpu_busy"] = cpu.busy
        res["curve_streams"] = args.streams
        res["curve_streams_vs_one"] = res["curve_streams_gbps"] / res["curve_gbps"]
    finally:
        shutil.rmtree(keydir, ignore_errors=True)
    res["peer_max_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res["plain_vs_raw"] = res["plain_gbps"] / res["raw_tcp_gbps"]
    res["curve_vs_raw"] = res["curve_gbps"] / res["raw_tcp_gbps"]

    if args.no_shaped:
        res["shaped"] = "skipped (--no-shaped)"
    elif os.geteuid() != 0:
        res["shaped"] = "skipped: needs root for network namespaces (ip netns, tc tbf)"
        log(res["shaped"])
    else:
        try:
            setup_namespaces(args.rate_mbit)
            wrap = tuple(["ip", "netns", "exec", ns] for ns in NS)
            res["shaped_link_mbps"] = args.rate_mbit
            log(f"raw TCP across a {args.rate_mbit} Mbit/s veth (tc tbf), {n >> 20} MiB each way ...")
            res["shaped_raw_tcp_mbps"] = raw_tcp(tcp_bin, NS_ADDR, (7301, 7302), n, 1, wrap) / 1e6
            log("strait gateway, CurveZMQ, same link (plaintext is refused off loopback) ...")
            keydir = tempfile.mkdtemp(prefix="strait-bench-keys-")
            try:
                for s in ("s0", "s1"):
                    subprocess.run([keys_bin, "generate", s, "--dir", keydir], check=True, capture_output=True)
                res["shaped_curve_mbps"] = gateway(peer_bin, (7401, 7402), n, 1, keys=keydir, wrap=wrap, streams=args.streams,
                                                   hosts=NS_ADDR) / 1e6
            finally:
                shutil.rmtree(keydir, ignore_errors=True)
            res["shaped_plain_mbps"] = None
            res["shaped_curve_vs_link"] = res["shaped_curve_mbps"] / args.rate_mbit
        finally:
            teardown_namespaces()
    profiles = [p for p in args.wan.split(",") if p]
    res["long_fat_links"] = {}
    for profile in profiles:
        try:
            strait_wan.check_can_simulate()
        except strait_wan.WanError as e:
            res["long_fat_links"][profile] = f"skipped: {e}"
            log(res["long_fat_links"][profile])
            continue
        res["long_fat_links"][profile] = long_fat_link(profile, tcp_bin, peer_bin, keys_bin, args.wan_bytes,
                                                        args.wan_rounds, args.streams)

    if args.json:
        print(json.dumps(res))
        return
    print(f"payload {n >> 20} MiB each way between two processes; rates are payload bits/s, one direction")
    print(f"  raw TCP, loopback           {res['raw_tcp_gbps']:8.2f} Gbit/s")
    print(f"  strait plaintext, loopback  {res['plain_gbps']:8.2f} Gbit/s  ({res['plain_vs_raw']:.2f}x raw TCP)")
    print(f"  strait CurveZMQ, loopback   {res['curve_gbps']:8.2f} Gbit/s  ({res['curve_vs_raw']:.2f}x raw TCP; "
          f"machine {res['curve_cpu_busy']:.0%} busy)")
    print(f"    with {res['curve_streams']} streams     {res['curve_streams_gbps']:8.2f} Gbit/s  "
          f"({res['curve_streams_vs_one']:.2f}x one stream; machine {res['curve_streams_cpu_busy']:.0%} busy)")
    print(f"  peak RSS of a gateway process: {res['peer_max_rss_mib']:.0f} MiB")
    if "shaped_curve_mbps" in res:
        print(f"  {args.rate_mbit} Mbit/s link: raw TCP {res['shaped_raw_tcp_mbps']:.1f} Mbit/s, strait CurveZMQ "
              f"{res['shaped_curve_mbps']:.1f} Mbit/s ({res['shaped_curve_vs_link']:.2f}x the link)")
    else:
        print(f"  shaped link: {res['shaped']}")
    for profile, r in res["long_fat_links"].items():
        if isinstance(r, str):
            print(f"  {profile}: {r}")
            continue
        n = r["streams"]
        print(f"  {profile} (simulated border, {r['payload_bytes'] >> 20} MiB each way), Mbit/s:")
        print(f"    raw TCP, 1 connection   {r['raw_tcp_1_mbps']:8.1f}  ({r['raw_tcp_1_vs_link']:.2f}x the link)")
        print(f"    raw TCP, {n} connections {r[f'raw_tcp_{n}_mbps']:8.1f}  (machine {r[f'raw_tcp_{n}_cpu_busy']:.0%} busy)")
        print(f"    strait, 1 stream        {r['strait_1_mbps']:8.1f}  ({r['strait_1_vs_link']:.2f}x the link)")
        print(f"    strait, {n} streams      {r[f'strait_{n}_mbps']:8.1f}  ({r['strait_vs_link']:.2f}x the link, "
              f"{r['streams_vs_one']:.2f}x one stream; machine {r[f'strait_{n}_cpu_busy']:.0%} busy)")
        if "one_stream_window_bound_mbps" in r:
            print(f"    one connection's bound: tcp_wmem max {r['tcp_wmem_max'] >> 20} MiB / {r['rtt_ms']:.0f} ms = "
                  f"{r['one_stream_window_bound_mbps']:.0f} Mbit/s")


def idle_main(args):
    try:
        strait_wan.check_can_simulate()
    except strait_wan.WanError as e:
        raise SystemExit(f"bench transport --idle: {e}")
    r = idle_rounds(args.idle_wan, os.path.join(args.build, "bench", "strait_bench_tcp"),
                    os.path.join(args.build, "tests", "cpp", "strait_test_peer"),
                    os.path.join(args.build, "transport", "strait_keys"), args.idle_bytes, args.idle_gap_ms,
                    args.idle_rounds, args.streams)
    if args.json:
        print(json.dumps(r))
        return
    rate, rtt = strait_wan.parse_profile(args.idle_wan)
    print(f"{r['payload_bytes']} bytes each way every {r['gap_ms']} ms across {r['profile']} (one way "
          f"{rtt * 500:.0f} ms); median seconds a round, both payloads in")
    n = r["streams"]
    print(f"{'TCP settings in the sites':<44}{'raw TCP':>9}{'strait, 1 stream':>18}{f'strait, {n} streams':>20}")

    def cell(x, width):
        return f"{x:{width}.3f}" if x is not None else f"{'-':>{width}}"

    for name, row in r["settings"].items():
        cc, ssai = row["tcp"][0]
        label = f"{name}: {cc}, slow start after idle {ssai}"
        print(f"{label:<44}{cell(row['raw_tcp_s'], 9)}{cell(row['strait_1_s'], 18)}{cell(row[f'strait_{n}_s'], 20)}")


if __name__ == "__main__":
    main()
