"""A simulated border for local runs: `./strait launch CONFIG --wan PROFILE`.

Every site gets its own network namespace, joined to a "border" namespace by a
veth pair. Both ends of each veth are rate-limited with `tc tbf` (upload and
download). The border routes between the sites' subnets, and every packet it
forwards passes through a TUN device read by a user-space delay router
(`strait_wan_delay`, C++), which holds it for half the round-trip time before
the kernel sends it on: tc netem, the usual tool, is not in this kernel.

    site i namespace                    border namespace
    wan0 10.99.i.1/24 --veth-- s<i> 10.99.i.254 -> rule: from s<i> -> tun0 -> delay -> routed on
    gateway listens here                ip_forward on; strait_wan_delay counts bytes per site pair

The job config is rewritten so that each site's endpoint is its namespace
address. Every protocol between sites — the gateways, a gloo world that spans
sites, TCP's own acknowledgements — sees the profile's rate and round-trip
time. Inside a site, workers talk over the namespace's own interfaces, as
they would inside one cluster.

Not modelled: loss (other than drops from a full queue), jitter, reordering.

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
SUBNET = "10.99"
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


def _delay_tool():
    root = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
    build = os.environ.get("STRAIT_BUILD_DIR", os.path.join(root, "build"))
    return os.path.join(build, "transport", "strait_wan_delay")


def check_can_simulate():
    """Raises WanError saying why this machine cannot run a simulated border."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        raise WanError(f"--wan needs {' and '.join(missing)} (Debian package iproute2): apt-get install iproute2")
    if os.geteuid() != 0:
        raise WanError("--wan needs root: it creates network namespaces (ip netns) and shapes their links "
                       "(tc tbf). Run it as root, or leave out --wan to run every site on loopback with no "
                       "simulated border")
    if not os.path.exists("/dev/net/tun"):
        raise WanError("--wan needs /dev/net/tun (the delay router is a TUN device); load the tun module")
    if not os.path.exists(_delay_tool()):
        raise WanError(f"--wan needs {_delay_tool()}: build it with ./strait build (or set STRAIT_BUILD_DIR)")


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise WanError(f"simulated border: `{' '.join(cmd)}` failed: {r.stderr.strip()}")


class Border:
    """Context manager: namespaces, shaped veths and the delay router for
    `sites` (names, in the config's order), torn down on exit."""

    def __init__(self, profile, sites, log=None, tag=None, sysctls=None):
        """`tag` names the namespaces (strait<TAG>-s<i>, strait<TAG>-wan;
        default: this process's pid): borders that exist at the same time
        in one process need tags of their own. `sysctls`: `net.*` settings
        ("net.ipv4.tcp_slow_start_after_idle=0") made in every site's
        namespace, to simulate gateway hosts set up otherwise. Without them
        a site's TCP is a new namespace's: Linux's defaults for the
        per-namespace settings (slow start after idle on, whatever this
        host has) and this host's default congestion control."""
        self.profile = profile
        self.rate, self.rtt = parse_profile(profile)
        self.sites = list(sites)
        if len(self.sites) > 200:
            raise WanError("--wan supports at most 200 sites")
        tag = f"{os.getpid() % 100000}" if tag is None else str(tag)
        if not tag.replace("-", "").isalnum() or len(tag) > 8:
            raise WanError(f"simulated border: tag {tag!r} must be at most 8 letters, digits or '-'")
        self.ns = [f"strait{tag}-s{i}" for i in range(len(self.sites))]
        self.border_ns = f"strait{tag}-wan"
        self.delay = None
        self.stats = {}
        self.log = log or (lambda msg: print(f"strait wan: {msg}", file=sys.stderr))
        self._tmp = None
        self.sysctls = list(sysctls or [])
        for kv in self.sysctls:
            key, _, value = kv.partition("=")
            if not re.fullmatch(r"net(\.[A-Za-z0-9_]+)+", key) or not re.fullmatch(r"[A-Za-z0-9_. -]+", value):
                raise WanError(f"simulated border: sysctl {kv!r} is not KEY=VALUE with a net.* key, e.g. "
                               "net.ipv4.tcp_slow_start_after_idle=0")

    # -- addresses ------------------------------------------------------

    def site_addr(self, i):
        return f"{SUBNET}.{i}.1"

    def prefix(self, site):
        """Command prefix that runs a process inside `site`'s namespace."""
        return ["ip", "netns", "exec", self.ns[self.sites.index(site)]]

    def env(self, site):
        """Environment for a process of `site`: gloo binds to its namespace's link."""
        return {"GLOO_SOCKET_IFNAME": "wan0", "STRAIT_WAN_ADDR": self.site_addr(self.sites.index(site))}

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
        tbf = ["tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst), "latency", "400ms"]
        _run(["ip", "netns", "add", self.border_ns])
        wan = ["ip", "netns", "exec", self.border_ns]
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                           ("net.ipv4.conf.default.rp_filter", "0")):
            _run(wan + ["sysctl", "-q", "-w", f"{key}={value}"])
        _run(wan + ["ip", "link", "set", "lo", "up"])
        _run(wan + ["ip", "tuntap", "add", "dev", "tun0", "mode", "tun"])
        # The kernel queues what it hands to the delay router; 500 packets
        # (the default) overflowed at 1 Gbit/s, dropping packets the link
        # itself would not have.
        _run(wan + ["ip", "link", "set", "tun0", "txqueuelen", "10000", "up"])
        self.delay = subprocess.Popen(wan + [_delay_tool(), "--tun", "tun0", "--delay-ms", str(self.rtt * 1000 / 2),
                                             "--queue-bytes", str(max(4 << 20, int(self.rate / 8 * 2)))],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.delay.stdout.readline().strip()
        if line != "ready":
            err = self.delay.stderr.read() if self.delay.poll() is not None else ""
            raise WanError(f"simulated border: the delay router did not start: {line} {err.strip()}")
        _run(wan + ["ip", "route", "add", "default", "dev", "tun0", "table", "100"])
        for i, ns in enumerate(self.ns):
            _run(["ip", "netns", "add", ns])
            inside = ["ip", "netns", "exec", ns]
            _run(inside + ["ip", "link", "set", "lo", "up"])
            for kv in self.sysctls:
                _run(inside + ["sysctl", "-q", "-w", kv])
            _run(wan + ["ip", "link", "add", f"s{i}", "type", "veth", "peer", "name", "wan0", "netns", ns])
            _run(wan + ["ip", "addr", "add", f"{SUBNET}.{i}.254/24", "dev", f"s{i}"])
            _run(wan + ["ip", "link", "set", f"s{i}", "up"])
            _run(wan + ["tc", "qdisc", "add", "dev", f"s{i}", "root"] + tbf)  # download of site i
            # Everything that enters the border from a site goes through the delay router.
            _run(wan + ["ip", "rule", "add", "iif", f"s{i}", "lookup", "100", "priority", "100"])
            _run(inside + ["ip", "addr", "add", f"{self.site_addr(i)}/24", "dev", "wan0"])
            _run(inside + ["ip", "link", "set", "wan0", "up"])
            _run(inside + ["ip", "route", "add", "default", "via", f"{SUBNET}.{i}.254"])
            _run(inside + ["tc", "qdisc", "add", "dev", "wan0", "root"] + tbf)  # upload of site i
        self.log(f"{self.profile}: {len(self.sites)} sites in namespaces {', '.join(self.ns)}, "
                 f"{self.rate / 1e6:g} Mbit/s each way per site (tc tbf), {self.rtt * 1000:g} ms round trip "
                 f"(delay router in {self.border_ns})" +
                 (f"; in the sites: {', '.join(self.sysctls)}" if self.sysctls else ""))

    def rewrite_config(self, config_path, out_dir=None):
        """Writes the job config with each site's endpoint at its namespace
        address (same port) and key paths made absolute; returns its path."""
        import yaml

        with open(config_path) as f:
            doc = yaml.safe_load(f)
        if (doc.get("transport") or {}).get("insecure"):
            raise WanError("--wan: this config sets transport.insecure, and strait refuses plaintext off loopback; "
                           "the simulated border is a network. Generate keys (./strait keys generate SITE) and "
                           "list them in the config instead")
        base = os.path.dirname(os.path.abspath(config_path))
        for i, s in enumerate(doc["sites"]):
            port = int(str(s["endpoint"]).rsplit(":", 1)[1])
            s["endpoint"] = f"tcp://{self.site_addr(i)}:{port}"
            s.pop("bind", None)
            for key in ("public_key", "secret_key"):
                if s.get(key):
                    s[key] = os.path.join(base, os.path.expanduser(str(s[key])))
        ckpt = doc.get("checkpoint")
        if isinstance(ckpt, dict) and ckpt.get("dir"):  # stays where the original config puts it
            ckpt["dir"] = os.path.join(base, os.path.expanduser(str(ckpt["dir"])))
        if out_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="strait-wan-")
            out_dir = self._tmp
        path = os.path.join(out_dir, "wan-" + os.path.basename(config_path))
        with open(path, "w") as f:
            f.write(f"# {config_path} across the simulated border {self.profile} (written by strait.wan)\n")
            yaml.safe_dump(doc, f, sort_keys=False)
        return path

    def snapshot(self):
        """IP bytes that crossed the border so far, every direction (the delay
        router prints its counts on SIGUSR1). For sampling bytes over time."""
        import signal

        if self.delay is None or self.delay.poll() is not None:
            return None
        self.delay.send_signal(signal.SIGUSR1)
        line = self.delay.stdout.readline()
        try:
            pairs = json.loads(line).get("pairs", {})
        except ValueError:
            return None
        return sum(v["bytes"] for k, v in pairs.items() if k.split("->")[0] != k.split("->")[1])

    def close(self):
        """Stops the delay router (keeping its byte counts) and removes the namespaces."""
        if self.delay is not None:
            if self.delay.poll() is None:
                self.delay.terminate()
                try:
                    out, _ = self.delay.communicate(timeout=10)
                    last = [l for l in out.splitlines() if l.startswith("{")]
                    if last:
                        self.stats = json.loads(last[-1])
                except subprocess.TimeoutExpired:
                    self.delay.kill()
                    self.delay.wait()
            self.delay = None
        for ns in self.ns + [self.border_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def bytes_between(self):
        """{(from site, to site): IP bytes} that crossed the border (after close())."""
        out = {}
        for key, v in (self.stats.get("pairs") or {}).items():
            a, b = (int(x) for x in key.split("->"))
            if a < len(self.sites) and b < len(self.sites) and a != b:
                out[(self.sites[a], self.sites[b])] = v["bytes"]
        return out

    def total_bytes(self):
        """IP bytes (headers included) that crossed the border, every direction."""
        return sum(self.bytes_between().values())

    def summary(self):
        """What crossed the border, as the network saw it (after close())."""
        pairs = self.bytes_between()
        if not pairs:
            return "nothing crossed the border" if self.stats else "no byte counts from the delay router"
        per = ", ".join(f"{a} -> {b} {v / 1e6:.3f} MB" for (a, b), v in pairs.items())
        dropped = self.stats.get("dropped", 0)
        return (f"{self.total_bytes() / 1e6:.3f} MB crossed the border (IP bytes): {per}"
                + (f"; {dropped} packets dropped at the border queue" if dropped else ""))
