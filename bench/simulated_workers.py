"""Workers that are not there: valid ``worker.caps`` and ``worker.heartbeat`` envelopes
shaped like a real agent's, and caps published raw, for benchmarks that load a
coordinator with thousands of workers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from bench.identities import Identity
from bench.paho_clients import paho_close, paho_connect


def caps_payload(wid: str, heartbeat_s: float) -> bytes:
    """A valid ``worker.caps`` envelope for a simulated worker."""
    from schemas.codec import encode, envelope
    from schemas.messages import WorkerCaps

    caps = WorkerCaps(
        wid=wid, name=wid, tags=["bench"], slots=2, executors=["process"],
        host={"hostname": f"sim-{wid}", "os": "Linux", "arch": "x86_64", "python": "3.11"},
        cpu={"count": 4, "physical": 2, "model": "simulated", "freq_mhz": 2400.0},
        memory_bytes=8 * 2**30, disk_total_bytes=100 * 2**30, disk_free_bytes=50 * 2**30,
        heartbeat_s=heartbeat_s, agent_version="bench",
    )
    return encode(envelope(caps))


def heartbeat_payload(wid: str, seq: int, interval_s: float, *, validate: bool = True) -> bytes:
    """A valid ``worker.heartbeat`` envelope, shaped like a real agent's (~370 B)."""
    from schemas.codec import encode, envelope
    from schemas.messages import WorkerHeartbeat

    beat = WorkerHeartbeat(
        wid=wid, seq=seq, interval_s=interval_s, cpu_percent=12.5 + seq % 50,
        load1=0.42, load5=0.37, load15=0.30, mem_used_bytes=3_123_456_789,
        mem_available_bytes=4_987_654_321, disk_free_bytes=53_687_091_200,
        net_sent_bytes=123_456_789 + seq, net_recv_bytes=987_654_321 + seq,
        free_slots=2, running=[],
    )
    return encode(envelope(beat), validate=validate)


def publish_caps(url: str, ident: Identity, root: str, wids: Sequence[str],
                 heartbeat_s: float, timeout: float = 120.0) -> float:
    """Publish a ``worker.caps`` (QoS 1, not retained) per wid; seconds until all acked."""
    from schemas.topics import Topics

    topics = Topics(root)
    payloads = [(topics.worker_caps(w), caps_payload(w, heartbeat_s)) for w in wids]
    client = paho_connect(url, ident)
    try:
        t0 = time.monotonic()
        infos = [client.publish(topic, payload, 1) for topic, payload in payloads]
        deadline = t0 + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        return time.monotonic() - t0
    finally:
        paho_close(client)
