"""A peer written from docs/PROTOCOL.md alone — pyzmq, classes protoc
generates from transport/proto/strait.proto, hashlib's BLAKE2b and XXH3 from
the xxhash package, nothing of strait's code — exchanges rounds with a real
gateway over CurveZMQ. It computes the config fingerprint from the canonical
text as the document specifies it, reads and writes key files in the
documented format, and checks the behaviours the document promises: the
handshake's refusals, Ack, Nack and Refuse, the re-Ack of a chunk for a
payload that is already complete (whatever its layout), and the kind check."""

import hashlib
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest
import torch
import xxhash
import zmq

import strait
from strait.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 4096  # transport.chunk_bytes below
STREAMS = 2   # transport.streams below


def wire_module(tmp):
    """strait.proto compiled by protoc, imported from tmp."""
    protoc = shutil.which("protoc")
    assert protoc, "protoc (Debian's protobuf-compiler) is needed"
    subprocess.run([protoc, f"--python_out={tmp}", "-I", os.path.join(ROOT, "transport", "proto"), "strait.proto"],
                   check=True)
    spec = importlib.util.spec_from_file_location("strait_pb2", os.path.join(tmp, "strait_pb2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_key(path, z85, mode):
    """PROTOCOL.md, "Key files": one line, the key's 40 Z85 characters."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(z85.decode() + "\n")


def canonical_text(job, sites, chunk_bytes):
    """PROTOCOL.md, "The canonical text of a job config", for this test's
    config: every-step mode, the default pipeline, default transport except
    chunk_bytes, peer_timeout_ms, the deadlines and streams."""
    lines = [f"job {job}"]
    lines += [f"site {name} {jur} {endpoint} 1 1" for name, jur, endpoint in sites]
    lines.append("sync every_step")
    lines.append("compression fp32 1 0")
    lines.append(f"transport {chunk_bytes} 1073741824 4 64 100 30000 60 120 0 0 {STREAMS}")
    return "".join(line + "\n" for line in lines)


class Peer:
    """Site "b": a ROUTER at its endpoint (CURVE server) and a DEALER to
    site a's ROUTER (CURVE client)."""

    def __init__(self, wire, ctx, keys_b, key_a_public, endpoint_b, endpoint_a):
        self.wire = wire
        self.router = ctx.socket(zmq.ROUTER)
        self.router.curve_server = True
        self.router.curve_secretkey = keys_b[1]
        self.router.linger = 0
        self.router.bind(endpoint_b)
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.curve_serverkey = key_a_public
        self.dealer.curve_publickey = keys_b[0]
        self.dealer.curve_secretkey = keys_b[1]
        self.dealer.linger = 0
        self.dealer.connect(endpoint_a)
        self.incarnation = secrets.randbits(64)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.dealer, zmq.POLLIN)

    def envelope(self, **body):
        env = self.wire.Envelope()
        (name, msg), = body.items()
        getattr(env, name).CopyFrom(msg)
        return env.SerializeToString()

    def send(self, **body):
        self.dealer.send(self.envelope(**body))

    def send_chunk(self, round_, tag, payload, index, kind=1, total=None, data=None):
        total = len(payload) if total is None else total
        count = max(1, -(-total // CHUNK))
        piece = payload[index * CHUNK:(index + 1) * CHUNK] if data is None else data
        c = self.wire.Chunk(round=round_, tag=tag, incarnation=self.incarnation, index=index, count=count,
                            total_bytes=total, xxh3=xxhash.xxh3_64_intdigest(piece), kind=kind)
        self.dealer.send_multipart([self.envelope(chunk=c), piece])

    def poll(self, seconds):
        """(source, envelope, data) for each message within `seconds`."""
        out = []
        for sock, _ in self.poller.poll(int(seconds * 1000)):
            frames = sock.recv_multipart()
            if sock is self.router:
                routing, head, data = frames[0], frames[1], frames[2] if len(frames) > 2 else b""
            else:
                routing, head, data = None, frames[0], b""
            env = self.wire.Envelope()
            env.ParseFromString(head)
            out.append(("router" if routing is not None else "dealer", routing, env, data))
        return out


@pytest.fixture
def job(tmp_path):
    tmp = str(tmp_path)
    wire = wire_module(tmp)
    pa, pb = free_port(), free_port()
    ea, eb = f"tcp://127.0.0.1:{pa}", f"tcp://127.0.0.1:{pb}"
    keys = {s: zmq.curve_keypair() for s in ("a", "b")}
    for s, (public, secret) in keys.items():
        write_key(os.path.join(tmp, f"{s}.pub"), public, 0o644)
        write_key(os.path.join(tmp, f"{s}.key"), secret, 0o600)
    config = os.path.join(tmp, "job.yaml")
    with open(config, "w") as f:
        f.write(f"""job: {{id: doc-peer}}
sites:
  - {{name: a, jurisdiction: CN, endpoint: "{ea}", public_key: a.pub, secret_key: a.key}}
  - {{name: b, jurisdiction: SG, endpoint: "{eb}", public_key: b.pub}}
transport: {{chunk_bytes: {CHUNK}, heartbeat_ms: 100, peer_timeout_ms: 30000, round_deadline_s: 60, hard_deadline_s: 120,
            streams: {STREAMS}}}
""")
    text = canonical_text("doc-peer", [("a", "CN", ea), ("b", "SG", eb)], CHUNK)
    ctx = zmq.Context()
    gateway = torch.classes.strait.Gateway(config, "a", "")
    peer = Peer(wire, ctx, keys["b"], keys["a"][0], eb, ea)
    yield wire, gateway, peer, hashlib.blake2b(text.encode(), digest_size=32).digest()
    del gateway
    peer.router.close()
    peer.dealer.close()
    ctx.term()


def welcome_hello(wire, peer, routing, env, fingerprint, streams_seen):
    """Answers a's Hello on one of its streams (PROTOCOL.md: each stream of
    a site sends its own)."""
    assert env.hello.site == "a" and env.hello.jurisdiction == "CN"
    assert env.hello.config_fingerprint == fingerprint, "the canonical text of PROTOCOL.md"
    assert env.hello.stream < STREAMS
    streams_seen.add(env.hello.stream)
    w = wire.Welcome(accepted=True, site="b", incarnation=peer.incarnation)
    peer.router.send_multipart([routing, peer.envelope(welcome=w)])


def handshake(wire, peer, fingerprint, **override):
    """Our Hello to a (answered by a Welcome on the DEALER) and a's Hellos
    to us, one per stream (answered by ours on the ROUTER). Returns a's
    Welcome."""
    hello = dict(protocol_version=3, job_id="doc-peer", site="b", jurisdiction="SG",
                 config_fingerprint=fingerprint, incarnation=peer.incarnation)
    hello.update(override)
    peer.send(hello=wire.Hello(**hello))
    welcome, streams = None, set()
    deadline = time.monotonic() + 60
    while (welcome is None or len(streams) < STREAMS) and time.monotonic() < deadline:
        for source, routing, env, _ in peer.poll(0.1):
            if source == "dealer" and env.HasField("welcome"):
                welcome = env.welcome
            if source == "router" and env.HasField("hello"):
                welcome_hello(wire, peer, routing, env, fingerprint, streams)
        if welcome is not None and not welcome.accepted:
            return welcome
    assert welcome is not None and len(streams) == STREAMS, f"no handshake within 60 s (streams {streams})"
    return welcome


def exchange(wire, gateway, peer, round_, mine, theirs, before_ack=None, connections=None):
    """One round: a's payload reassembled from its chunks in whatever order
    and on whichever stream they come, ours sent and acknowledged by a,
    then ours acknowledged to a (before that, `before_ack()` runs and must
    be answered by one more Ack); returns what a's gateway reports.
    `connections` collects the connections a's chunks came on."""
    gateway.exchange(round_, "t", torch.frombuffer(bytearray(theirs), dtype=torch.uint8), "model_update")
    for i in range(max(1, -(-len(mine) // CHUNK))):
        peer.send_chunk(round_, "t", mine, i)
    want = max(1, -(-len(theirs) // CHUNK))
    got, acks, refusals, reply_to, done, probed = {}, 0, [], None, False, before_ack is None
    deadline = time.monotonic() + 60
    while not done and time.monotonic() < deadline:
        for source, routing, env, data in peer.poll(0.1):
            if source == "router" and env.HasField("chunk") and env.chunk.round == round_:
                assert xxhash.xxh3_64_intdigest(data) == env.chunk.xxh3
                got[env.chunk.index] = data
                reply_to = routing
                if connections is not None:
                    connections.add(routing)
            if source == "dealer" and env.HasField("ack") and env.ack.round == round_:
                acks += 1
            if source == "dealer" and env.HasField("refuse"):
                refusals.append(env.refuse.reason)
        if len(got) == want and acks >= 1:
            if not probed:
                before_ack()
                probed = True
            elif before_ack is None or acks >= 2:
                peer.router.send_multipart([reply_to, peer.envelope(ack=wire.Ack(round=round_, tag="t"))])
                done = True
        peer.send(heartbeat=wire.Heartbeat(incarnation=peer.incarnation))
    assert done and not refusals, (len(got), want, acks, refusals)
    assert b"".join(got[i] for i in sorted(got)) == theirs
    deadline = time.monotonic() + 60
    while not gateway.ready(round_, "t") and time.monotonic() < deadline:
        peer.poll(0.05)
    payloads, missing = gateway.result(round_, "t")
    return bytes(payloads[1].numpy().tobytes()), list(missing)


def test_a_peer_written_from_the_protocol_document_trains_with_a_real_gateway(job):
    wire, gateway, peer, fingerprint = job
    assert handshake(wire, peer, fingerprint).accepted
    connections = set()
    for r, n in ((0, 10000), (1, 0), (2, 3 * CHUNK)):
        mine = secrets.token_bytes(n)
        got, missing = exchange(wire, gateway, peer, r, mine, secrets.token_bytes(5000 + r + r * 3 * CHUNK),
                                connections=connections)
        assert got == mine and missing == []
    assert len(connections) >= STREAMS, "a's chunks are striped over its streams"

    # A chunk with a broken layout for a key whose payload is already in is
    # acknowledged again and changes nothing; the round still completes.
    mine = secrets.token_bytes(6000)

    def bad_layout_after_complete():
        peer.send_chunk(3, "t", mine, 0, total=123456)

    got, missing = exchange(wire, gateway, peer, 3, mine, secrets.token_bytes(7000), before_ack=bad_layout_after_complete)
    assert got == mine and missing == []

    # A checksum that does not match is answered with Nack for that index.
    gateway.exchange(4, "t", torch.zeros(10, dtype=torch.uint8), "model_update")
    c = wire.Chunk(round=4, tag="t", incarnation=peer.incarnation, index=0, count=1, total_bytes=10, xxh3=1, kind=1)
    peer.dealer.send_multipart([peer.envelope(chunk=c), b"0123456789"])
    # A kind outside 1-4 is refused, naming it.
    peer.send_chunk(5, "t", b"x" * 10, 0, kind=7)
    nack = refuse = None
    deadline = time.monotonic() + 60
    while (nack is None or refuse is None) and time.monotonic() < deadline:
        for source, _, env, _ in peer.poll(0.1):
            if source == "dealer" and env.HasField("nack"):
                nack = env.nack
            if source == "dealer" and env.HasField("refuse"):
                refuse = env.refuse
    assert nack is not None and (nack.round, nack.index) == (4, 0)
    assert refuse is not None and refuse.round == 5 and "message kind 7" in refuse.reason


@pytest.mark.parametrize("field,value,reason", [
    ("protocol_version", 9, "protocol version 9 is not supported"),
    ("job_id", "other", "job id 'other' differs"),
    ("site", "a", "site 'a' is this site"),
    ("site", "c", "site 'c' is not a site of job 'doc-peer'"),
    ("jurisdiction", "US", "site 'b' says its jurisdiction is 'US', the job config says 'SG'"),
    ("config_fingerprint", b"\0" * 32, "config fingerprint 00000000"),
])
def test_the_handshake_refuses_what_the_document_says_in_its_order(job, field, value, reason):
    wire, gateway, peer, fingerprint = job
    welcome = handshake(wire, peer, fingerprint, **{field: value})
    assert not welcome.accepted and welcome.reason.startswith(reason), welcome.reason
