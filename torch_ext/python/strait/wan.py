"""A simulated border for local runs: `./strait launch CONFIG --wan PROFILE`.

Every site gets its own network namespace, joined to a "border" namespace by a
veth pair. Both ends of each veth are rate-limited with `tc tbf` (upload and
download), and a user-space delay proxy in the border namespace (wan_proxy.py)
adds the profile's latency: tc netem, the usual tool, is not in this kernel.

    site i namespace                border namespace
    wan0 10.99.0.(1+i) --veth-- s(i) -- bridge br0 10.99.0.254
    gateway binds here                  proxy 10.99.0.(101+i) -> 10.99.0.(1+i)

The job config is rewritten so that site i's `endpoint` (what peers dial) is its
proxy address and its `bind` (where it listens) is its own namespace address.
A message from site A to site B thus crosses A's uplink, the proxy (one-way
delay) and B's downlink. Workers inside a site still talk over their
namespace's loopback, as they would inside one cluster.

What it models and what it does not: the link rate and the round-trip time an
application sees are those of the profile. TCP's own acknowledgements run
between each endpoint and the proxy, so a sender's congestion window grows as on
a short path: a real long fat pipe with a small window would be slower than
this emulation. Loss and jitter are not modelled.

Profiles are RATE-RTT: a rate in kbit, mbit or gbit and a round-trip time in
ms, e.g. `100mbit-150ms` (a thin intercontinental link), `1gbit-40ms` (a leased
line within a region), `10mbit-300ms` (a congested or satellite link).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

PROFILES = {
    "100mbit-150ms": "a thin intercontinental link, e.g. Hangzhou to Frankfurt",
    "1gbit-40ms": "a leased line within a region, e.g. Hangzhou to Singapore",
    "10mbit-300ms": "a congested or satellite link",
}
SUBNET = "10.99.0"
HERE = os.path.dirname(os.path.abspath(__file__))


class WanError(RuntimeError):
    """The simulated border cannot be set up (profile, permissions, tools)."""


def parse_profile(text):
    """'100mbit-150ms' -> (rate in bit/s, round-trip time in s)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)-(\d+(?:\.\d+)?)ms", text or "")
    if not m:
        known = ", ".join(f"{k} ({v})" for k, v in PROFILES.items())
        raise WanError(f"--wan {text!r}: a profile is RATE-RTT such as 100mbit-150ms (rate in kbit, mbit or gbit; "
                       f"round-trip time in ms); named ones: {known}")
    rate = float(m.group(1)) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m.group(2)]
    rtt = float(m.group(3)) / 1000.0
    if not 1e5 <= rate <= 1e11:
        raise WanError(f"--wan {text!r}: the rate must be between 100kbit and 100gbit")
    if rtt > 10:
        raise WanError(f"--wan {text!r}: the round-trip time must be at most 10000ms")
    return rate, rtt


def check_can_simulate():
    """Raises WanError saying why this machine cannot run a simulated border."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        raise WanError(f"--wan needs {' and '.join(missing)} (Debian package iproute2): apt-get install iproute2")
    if os.geteuid() != 0:
        raise WanError("--wan needs root: it creates network namespaces (ip netns) and shapes their links "
                       "(tc tbf). Run it as root, or leave out --wan to run every site on loopback with no "
                       "simulated border")


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise WanError(f"simulated border: `{' '.join(cmd)}` failed: {r.stderr.strip()}")


class Border:
    """Context manager: namespaces, shaped veths and the delay proxy for
    `sites` (names, in the config's order), torn down on exit."""

    def __init__(self, profile, sites, log=None):
        self.profile = profile
        self.rate, self.rtt = parse_profile(profile)
        self.sites = list(sites)
        if len(self.sites) > 90:
            raise WanError("--wan supports at most 90 sites")
        tag = f"{os.getpid() % 100000}"
        self.ns = [f"strait{tag}-s{i}" for i in range(len(self.sites))]
        self.border_ns = f"strait{tag}-wan"
        self.proxy = None
        self.routes = []
        self.bytes = {}
        self.log = log or (lambda msg: print(f"strait wan: {msg}", file=sys.stderr))
        self._tmp = None

    # -- addresses ------------------------------------------------------

    def site_addr(self, i):
        return f"{SUBNET}.{1 + i}"

    def proxy_addr(self, i):
        return f"{SUBNET}.{101 + i}"

    def prefix(self, site):
        """Command prefix that runs a process inside `site`'s namespace."""
        return ["ip", "netns", "exec", self.ns[self.sites.index(site)]]

    # -- set up / tear down -----------------------------------------------

    def __enter__(self):
        check_can_simulate()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self):
        rate_kbit = max(100, int(self.rate / 1000))
        burst = max(32 * 1024, int(self.rate / 8 / 100))  # 10 ms of traffic
        tbf = ["tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst), "latency", "200ms"]
        _run(["ip", "netns", "add", self.border_ns])
        wan = ["ip", "netns", "exec", self.border_ns]
        _run(wan + ["ip", "link", "set", "lo", "up"])
        _run(wan + ["ip", "link", "add", "br0", "type", "bridge"])
        _run(wan + ["ip", "addr", "add", f"{SUBNET}.254/24", "dev", "br0"])
        _run(wan + ["ip", "link", "set", "br0", "up"])
        for i, ns in enumerate(self.ns):
            _run(["ip", "netns", "add", ns])
            inside = ["ip", "netns", "exec", ns]
            _run(inside + ["ip", "link", "set", "lo", "up"])
            _run(wan + ["ip", "link", "add", f"s{i}", "type", "veth", "peer", "name", "wan0", "netns", ns])
            _run(wan + ["ip", "link", "set", f"s{i}", "master", "br0"])
            _run(wan + ["ip", "link", "set", f"s{i}", "up"])
            _run(wan + ["tc", "qdisc", "add", "dev", f"s{i}", "root"] + tbf)  # download of site i
            _run(wan + ["ip", "addr", "add", f"{self.proxy_addr(i)}/24", "dev", "br0"])
            _run(inside + ["ip", "addr", "add", f"{self.site_addr(i)}/24", "dev", "wan0"])
            _run(inside + ["ip", "link", "set", "wan0", "up"])
            _run(inside + ["tc", "qdisc", "add", "dev", "wan0", "root"] + tbf)  # upload of site i
        self.log(f"{self.profile}: {len(self.sites)} sites in namespaces {', '.join(self.ns)}, "
                 f"{self.rate / 1e6:g} Mbit/s each way per site (tc tbf), {self.rtt * 1000:g} ms round trip "
                 f"(delay proxy in {self.border_ns})")

    def start_proxy(self, ports):
        """Starts the delay proxy for each site's gateway port (site order)."""
        cmd = ["ip", "netns", "exec", self.border_ns, sys.executable, os.path.join(HERE, "wan_proxy.py"),
               "--delay-ms", str(self.rtt * 1000 / 2)]
        for i, (name, port) in enumerate(zip(self.sites, ports)):
            cmd += ["--route", f"{name}={self.proxy_addr(i)}:{port},{self.site_addr(i)}:{port}"]
        self.proxy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proxy.stdout.readline().strip()
        if line != "ready":
            err = self.proxy.stderr.read() if self.proxy.poll() is not None else ""
            raise WanError(f"simulated border: the delay proxy did not start: {line} {err.strip()}")

    def rewrite_config(self, config_path, out_dir=None):
        """Writes the job config with each site's endpoint at its proxy and its
        bind in its namespace; key paths made absolute. Starts the proxy.
        Returns the new config's path."""
        import yaml

        with open(config_path) as f:
            doc = yaml.safe_load(f)
        if (doc.get("transport") or {}).get("insecure"):
            raise WanError("--wan: this config sets transport.insecure, and strait refuses plaintext off loopback; "
                           "the simulated border is a network. Generate keys (./strait keys generate SITE) and "
                           "list them in the config instead")
        base = os.path.dirname(os.path.abspath(config_path))
        ports = []
        for i, s in enumerate(doc["sites"]):
            port = int(str(s["endpoint"]).rsplit(":", 1)[1])
            ports.append(port)
            s["endpoint"] = f"tcp://{self.proxy_addr(i)}:{port}"
            s["bind"] = f"tcp://{self.site_addr(i)}:{port}"
            for key in ("public_key", "secret_key"):
                if s.get(key):
                    s[key] = os.path.join(base, os.path.expanduser(str(s[key])))
        if out_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="strait-wan-")
            out_dir = self._tmp
        path = os.path.join(out_dir, "wan-" + os.path.basename(config_path))
        with open(path, "w") as f:
            f.write(f"# {config_path} across the simulated border {self.profile} (written by strait.wan)\n")
            yaml.safe_dump(doc, f, sort_keys=False)
        self.start_proxy(ports)
        return path

    def close(self):
        """Stops the proxy (keeping its byte counts) and removes the namespaces."""
        if self.proxy is not None:
            if self.proxy.poll() is None:
                self.proxy.terminate()
                try:
                    out, _ = self.proxy.communicate(timeout=10)
                    last = [l for l in out.splitlines() if l.startswith("{")]
                    if last:
                        self.bytes = json.loads(last[-1])
                except subprocess.TimeoutExpired:
                    self.proxy.kill()
                    self.proxy.wait()
            self.proxy = None
        for ns in self.ns + [self.border_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def total_bytes(self):
        """Bytes the delay proxy relayed, both directions, every site."""
        return sum(b["to_site"] + b["from_site"] for b in self.bytes.values())

    def summary(self):
        """What crossed the border, as the network saw it (after close())."""
        if not self.bytes:
            return "no byte counts from the delay proxy"
        per = ", ".join(f"to {n} {b['to_site'] / 1e6:.3f} MB (replies {b['from_site'] / 1e6:.3f} MB)"
                        for n, b in self.bytes.items())
        return f"{self.total_bytes() / 1e6:.3f} MB crossed the border: {per}"

