"""A lab Kubernetes control plane for lab nodes: a kubelet and an apiserver that describe the lab as it is.

`LabCluster` wires `netwatchd.lab.kubeapi`'s servers to a `Lab`: the kubelet of the node netwatchd runs
on serves that node's lab pods, the apiserver serves every lab node (pod CIDRs, node IPs) and the Services
added through `add_service` (which also installs kube-proxy-style DNAT on every node). Both listen inside
the node's network namespace, where netwatchd runs, exactly as on a real node.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from netwatchd.lab.kubeapi import LabApiServer, LabCA, LabKubelet, PodSpec
from netwatchd.lab.netns import Lab, Node, Pod


def pod_spec(pod: Pod) -> PodSpec:
    ips = [pod.ip] + ([pod.ip6] if pod.ip6 else [])
    return PodSpec(name=pod.name, namespace=pod.namespace, uid=pod.uid, node_name=pod.node.name, ips=ips,
                   host_network=pod.host_network, owner_kind="ReplicaSet", owner_name=f"{pod.name}-6d8f9c7b5")


class LabCluster:
    """Kubelet + apiserver for `node` of `lab` (see module docstring); a context manager."""

    def __init__(self, lab: Lab, node: Node, service_cidrs: Sequence[str] = ("10.96.0.0/12", "fd00:10:96::/108")):
        self.lab, self.node = lab, node
        self.service_cidrs = list(service_cidrs)
        self.ca = LabCA()
        self.kubelet = LabKubelet(ca=self.ca, netns=node.netns)
        self.api = LabApiServer(ca=self.ca, netns=node.netns)
        self._dir = tempfile.mkdtemp(prefix="nwcluster-")
        self.kubelet_token_file = os.path.join(self._dir, "kubelet-token")
        with open(self.kubelet_token_file, "w") as f:
            f.write(self.kubelet.token or "")
        self.hidden: set[str] = set()  # pod keys the kubelet does not list (tests: pods gone from the API)
        self.sync()

    def sync(self) -> None:
        """Publish the lab as it is now: this node's pods to the kubelet, every node to the apiserver."""
        self.kubelet.set_pods(pod_spec(p) for k, p in self.node.pods.items() if k not in self.hidden)
        for n in self.lab.nodes.values():
            self.api.upsert_node(n.name, [n.pod_cidr, n.pod_cidr6], [n.node_ip])

    def add_service(self, namespace: str, name: str, vip: str, port: int, backends: Sequence[tuple[Pod, int]],
                    proto: str = "tcp") -> None:
        """A ClusterIP Service: DNAT on every lab node (kube-proxy) and the object in the apiserver."""
        v6 = ":" in vip
        targets = [((p.ip6 if v6 else p.ip), bport) for p, bport in backends]
        for n in self.lab.nodes.values():
            n.add_cluster_ip_service(vip, port, targets, proto=proto)
        self.api.upsert_service(namespace, name, [vip], [(port, proto.upper())])

    def netwatchd_args(self, apiserver: bool = True) -> list[str]:
        args = ["--kubelet-url", self.kubelet.url, "--kubelet-token-file", self.kubelet_token_file,
                "--kubelet-ca-file", self.ca.ca_file, "--node-name", self.node.name,
                "--service-cidr", ",".join(self.service_cidrs)]
        if apiserver:
            args += ["--kubeconfig", self.api.kubeconfig_path]
        else:
            args += ["--no-apiserver", "--pod-cidr", f"{self.node.pod_cidr},{self.node.pod_cidr6}"]
        return args

    def close(self) -> None:
        self.kubelet.close()
        self.api.close()
        self.ca.close()
        for f in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, f))
        os.rmdir(self._dir)

    def __enter__(self) -> LabCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
