"""`netwatchctl demo`: a lab node with pods, a service, a second node and an external host, netwatchd
watching it through a lab kubelet and apiserver, mixed traffic with a few injected faults, and `top`.

Faults, so there is something to see:
- service shop/cart has two backends; one of them is blackholed (iptables DROP on its port): connects to
  the service time out half the time -> pod_to_service drops and `timeout` connect failures for shop/web;
- shop/web also connects to a port nobody listens on -> NO_SOCKET drops, `refused` connect failures;
- shop/api talks to the "internet" host, and to a pod on node 2 over vxlan;
- a slow path (a TUN delay line, when netwatchd.lab.delay is available) between shop/api and shop/db.

Everything is torn down on exit (Ctrl-C, or `q` in top).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from netwatchd.lab.cluster import LabCluster
from netwatchd.lab.netns import Lab
from netwatchd.lab.traffic import start_load, start_tcp_server


def build(lab: Lab):
    n1, n2 = lab.add_node("node1"), lab.add_node("node2")
    lab.add_uplink(n1, n2)
    internet = lab.add_internet(n1)
    web, api, cart, db = (n1.add_pod(n, namespace="shop") for n in ("web", "api", "cart", "db"))
    cart2 = n2.add_pod("cart-2", namespace="shop")
    for p, port in ((cart, 8080), (cart2, 8080), (db, 5432), (api, 8000)):
        start_tcp_server(p, port)
    start_tcp_server(internet, 443, ip="0.0.0.0")
    cluster = LabCluster(lab, n1)
    cluster.add_service("shop", "cart", "10.96.0.10", 80, [(cart, 8080), (cart2, 8080)])
    cluster.add_service("shop", "api", "10.96.0.11", 80, [(api, 8000)])
    # fault 1: one backend of shop/cart is blackholed (its traffic crosses node1's FORWARD to node2)
    n1.iptables("-I", "FORWARD", "-d", cart2.ip, "-p", "tcp", "--dport", "8080", "-j", "DROP")
    slow = None
    try:  # the slow path needs the TUN delay line (netwatchd.lab.delay)
        from netwatchd.lab import delay

        slow = delay.add_delay(api, db, one_way_ms=15) if hasattr(delay, "add_delay") else None
    except Exception:  # noqa: BLE001 - the demo runs without a slow path
        slow = None
    loads = [
        start_load(web, [("tcp", "10.96.0.10", 80), ("tcp", "10.96.0.11", 80), ("tcp", cart.ip, 9)], 0.3),
        start_load(api, [("tcp", db.ip, 5432), ("tcp", internet.ip, 443), ("tcp", cart2.ip, 8080),
                         ("udp", db.ip, 5353)], 0.3),
        start_load(db, [("udp", web.ip, 7000)], 0.5),
    ]
    return n1, cluster, loads, slow


def run(argv: list[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("netwatchctl demo: needs root (it builds network namespaces and loads BPF); try sudo", file=sys.stderr)
        return 2
    port = 9990
    with Lab() as lab:
        print("building the lab: 2 nodes, 5 pods, 2 services, an internet host ...", file=sys.stderr)
        n1, cluster, _loads, _slow = build(lab)
        try:
            args = [sys.executable, "-m", "netwatchd.daemon", "--listen", f"127.0.0.1:{port}", "--interval", "1",
                    *cluster.netwatchd_args()]
            daemon = n1.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            print(f"netwatchd starting in {n1.netns} (logs: JSON on its stderr) ...", file=sys.stderr)
            time.sleep(4)
            if daemon.poll() is not None:
                print(daemon.stderr.read()[-2000:], file=sys.stderr)
                return 1
            top = ["ip", "netns", "exec", n1.netns, sys.executable, "-m", "netwatchd.ctl", "top",
                   "--endpoint", f"http://127.0.0.1:{port}", *(argv or [])]
            with contextlib.suppress(KeyboardInterrupt):
                subprocess.run(top, check=False)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(20)
        finally:
            cluster.close()
    print("lab torn down", file=sys.stderr)
    return 0
