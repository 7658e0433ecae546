"""The drop tail: individual drops with pod, class, reason, kernel location and 5-tuple, rate-limited in
the kernel so it can never flood (GET /api/v1/drops/recent, behind `netwatchctl drops --follow`)."""

from __future__ import annotations

import json
import time

import pytest

from netwatchd.lab.traffic import ping, send_udp
from tests.support import start_netwatchd

pytestmark = pytest.mark.kernel


def recent(d, since=0, rate=20):
    status, body = d.get(f"/api/v1/drops/recent?since={since}&rate={rate}")
    assert status == 200, body
    return json.loads(body)


def test_tail_shows_the_drops_the_test_caused_and_respects_its_rate_limit(lab):
    node = lab.add_node("n1")
    a, c = node.add_pod("a"), node.add_pod("c")
    d = start_netwatchd(["--pod-cidr", f"{node.pod_cidr},{node.pod_cidr6}"], netns=node.netns)
    try:
        assert ping(a, c.ip) == 1
        node.iptables("-I", "FORWARD", "-s", a.ip, "-d", c.ip, "-p", "udp", "--dport", "6000", "-j", "DROP")
        first = recent(d)  # turns the tail on
        t0 = time.monotonic()
        send_udp(a, c.ip, 6000, 300)  # one burst, well over the limit of 20/s
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        doc = recent(d, since=first["seq"])
        ours = [e for e in doc["events"] if e["dport"] == 6000 and e["src"] == a.ip]
        assert ours, doc
        # at most `rate` per started second of the burst (the window is the kernel's wall second)
        assert len(ours) <= 20 * (int(elapsed) + 2)
        assert doc["suppressed"] >= 300 - len(ours) - 5
        e = ours[0]
        assert (e["reason"], e["protocol"], e["traffic_class"], e["direction"]) == (
            "NETFILTER_DROP", "udp", "pod_to_pod_local", "egress")
        assert e["dst"] == c.ip and e["sport"] > 0 and e["location"] and not e["location"].startswith("0x")
        assert e["netns"] == node.netns_inode()
        # sequence numbers move forward; asking again from the last one returns nothing already seen
        assert all(ev["seq"] > doc["seq"] for ev in recent(d, since=doc["seq"])["events"])
    finally:
        assert d.stop() == 0


def test_tail_is_off_until_followed(lab):
    node = lab.add_node("n1")
    a, c = node.add_pod("a"), node.add_pod("c")
    d = start_netwatchd(["--pod-cidr", node.pod_cidr], netns=node.netns)
    try:
        node.iptables("-I", "FORWARD", "-s", a.ip, "-d", c.ip, "-j", "DROP")
        send_udp(a, c.ip, 6001, 10)
        time.sleep(1.0)
        doc = recent(d)
        # nothing was emitted before anyone followed
        assert [e for e in doc["events"] if e["dport"] == 6001] == [] and doc["suppressed"] == 0
        assert d.get("/api/v1/drops/recent?since=x")[0] == 400
    finally:
        assert d.stop() == 0
