"""Packaging: the wheel, the container image and the Helm chart, checked with the real tools.

- The wheel built from the repository carries the BPF C sources (netwatchd/bpf) and both console scripts.
- The Containerfile is hadolint-clean; the image builds without any container registry (a base image made
  by debootstrap, `--pull=never`) and its `netwatchd --version` runs in a container; the image also runs
  the real daemon with exactly the chart's capabilities (probes attach, SIGTERM detaches them).
- The chart passes `helm lint`; `helm template` with the defaults and with every option on renders
  manifests that pass the Kubernetes schemas (kubernetes-validate, strict); the CRD kinds (ServiceMonitor,
  PrometheusRule, SecurityContextConstraints) are checked structurally; every flag of the daemon's argument
  parser has a chart value, and the rendered container args parse with that parser.

External tools come from scripts/tools.sh (cached under .cache/tools); a test skips, saying why, only when
a tool cannot be had (no npm / registry, or missing Debian packages for the image build).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import netwatchd
from netwatchd.daemon import build_parser
from netwatchd.kernel import env

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "netwatchd"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
ALERTS = REPO / "alerts" / "netwatchd-rules.yaml"
TOOLS = REPO / "scripts" / "tools.sh"
RELEASE, NAMESPACE = "nw", "netwatchd"

# Flags the chart renders from other values than `config` (--listen from metrics.bindAddress/port).
CHART_MANAGED_FLAGS = {"--listen"}
# Kubernetes kinds with a schema in kubernetes-validate; the chart's CRD kinds are checked structurally.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "SecurityContextConstraints"}


# ----------------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path printed by `scripts/tools.sh NAME` (fetched and cached on first use); skip if unavailable."""
    proc = subprocess.run(
        ["bash", str(TOOLS), name], capture_output=True, text=True, timeout=600,
        env={**os.environ, "NETWATCHD_VENV": sys.prefix},
    )
    lines = [ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith(f"{name} ")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        pytest.skip(f"{name} cannot be installed here (scripts/tools.sh {name}: {tail or 'no output'})")
    return lines[0][1]


@pytest.fixture(scope="session")
def helm() -> str:
    return _tool("helm")


@pytest.fixture(scope="session")
def kubernetes_validate():
    _tool("kubernetes-validate")
    import kubernetes_validate

    return kubernetes_validate


# ----------------------------------------------------------------------------------------------------
# The daemon's flags -> chart values
# ----------------------------------------------------------------------------------------------------


def daemon_flags() -> dict[str, argparse.Action]:
    """Every long option of `netwatchd` (but --help/--version) -> its argparse action."""
    flags = {}
    for action in build_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and longs[0] not in ("--help", "--version"):
            flags[longs[0]] = action
    return flags


def camel(flag: str) -> str:
    """--pod-series-grace -> podSeriesGrace (the chart's `config` key)."""
    first, *rest = flag.removeprefix("--").split("-")
    return first + "".join(p.capitalize() for p in rest)


def sample_config() -> tuple[dict, dict]:
    """A non-default value for every flag: (chart `config` values, expected parsed attribute values)."""
    values, expected = {}, {}
    for flag, action in daemon_flags().items():
        if flag in CHART_MANAGED_FLAGS:
            continue
        key = camel(flag)
        if isinstance(action, argparse._StoreTrueAction):
            values[key], expected[action.dest] = True, True
        elif isinstance(action, argparse._AppendAction):
            items = ["192.0.2.0/24", "2001:db8::/64"]
            values[key], expected[action.dest] = items, items
        elif isinstance(action, argparse._StoreAction):
            if action.choices:
                value = next(c for c in reversed(list(action.choices)) if c != action.default)
            elif action.type is int:
                value = 1234567  # big enough that a float64 rendering would show up as 1.234567e+06
            elif action.type is float:
                value = 2.5
            else:
                value = f"sample-{key}"
            values[key], expected[action.dest] = value, value
        else:
            raise AssertionError(f"{flag}: argparse action {type(action).__name__} has no chart rendering rule")
    return values, expected


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def render(helm: str, tmp_path: Path, *values: Path | dict) -> list[dict]:
    """`helm template` of the chart with the given values files/dicts, as a list of manifests."""
    args = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for i, v in enumerate(values):
        if isinstance(v, dict):
            path = tmp_path / f"values-{i}.yaml"
            path.write_text(yaml.safe_dump(v))
            v = path
        args += ["-f", str(v)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container_of(docs: list[dict]) -> dict:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


VARIANTS = {
    "default": lambda: [],
    "all-options": lambda: [ALL_OPTIONS, {"config": sample_config()[0]}],
}


def schema_versions(kv, minimum: str) -> list[str]:
    """The Kubernetes versions kubernetes-validate has schemas for, from `minimum` on."""
    root = Path(kv.__file__).parent / "kubernetes-json-schema"
    found = {m.group(1) for p in root.iterdir() if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", p.name))}
    key = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    return sorted((v for v in found if key(v) >= key(minimum)), key=key)


# ----------------------------------------------------------------------------------------------------
# Wheel
# ----------------------------------------------------------------------------------------------------


def test_wheel_ships_bpf_sources_and_console_scripts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and re.search(r"No matching distribution found for hatchling|Could not fetch URL",
                                          proc.stderr + proc.stdout):
        pytest.skip(f"the build backend (hatchling) cannot be installed: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("netwatchd-*.whl")
    assert wheel.name.startswith(f"netwatchd-{netwatchd.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    # Every BPF source of the repository, at netwatchd/bpf/<same relative path>.
    sources = sorted(p.relative_to(REPO / "bpf").as_posix() for p in (REPO / "bpf").rglob("*")
               if p.is_file() and p.suffix in (".c", ".h"))
    assert "include/netwatch.h" in sources and any(s.endswith(".c") for s in sources)
    missing = [s for s in sources if f"netwatchd/bpf/{s}" not in names]
    assert not missing, f"BPF sources missing from the wheel: {missing}"
    # The console scripts of pyproject.toml.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"netwatchd", "netwatchctl"}
    section = entry_points.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    declared = dict(line.replace(" ", "").split("=", 1) for line in section.strip().splitlines() if "=" in line)
    assert declared == scripts
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


# ----------------------------------------------------------------------------------------------------
# Containerfile
# ----------------------------------------------------------------------------------------------------


def test_containerfile_is_hadolint_clean() -> None:
    hadolint = _tool("hadolint")
    proc = subprocess.run([hadolint, "--no-color", "--config", str(REPO / ".hadolint.yaml"), "Containerfile"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------
# Chart: values, lint, schemas
# ----------------------------------------------------------------------------------------------------


def test_chart_values_cover_every_daemon_flag() -> None:
    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    wanted = {camel(f) for f in daemon_flags() if f not in CHART_MANAGED_FLAGS}
    missing = sorted(wanted - set(config))
    stale = sorted(set(config) - wanted)
    assert not missing, f"netwatchd flags without a value in charts/netwatchd/values.yaml `config`: {missing}"
    assert not stale, f"values.yaml `config` keys that are no netwatchd flag: {stale}"
    # Unset keys keep the daemon's own default: the chart must not pin a default that may change.
    flags = daemon_flags()
    for flag, action in flags.items():
        key = camel(flag)
        if key in config and config[key] not in (None, "", [], False):
            assert flag == "--kubelet-url", f"config.{key} should be null/empty (daemon default {action.default!r})"


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint(helm: str, tmp_path: Path, variant: str) -> None:
    args = [helm, "lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    for i, v in enumerate(VARIANTS[variant]()):
        if isinstance(v, dict):
            path = tmp_path / f"values-{i}.yaml"
            path.write_text(yaml.safe_dump(v))
            v = path
        args += ["-f", str(v)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_pass_kubernetes_schemas(helm: str, kubernetes_validate, tmp_path: Path,
                                                     variant: str) -> None:
    docs = render(helm, tmp_path, *VARIANTS[variant]())
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Service", "ServiceAccount"]
    if variant == "all-options":
        expected += sorted(CRD_KINDS)
    assert kinds == sorted(expected)
    # The chart says kubeVersion >= 1.25; the all-options values use appArmorProfile (a 1.30 field).
    versions = schema_versions(kubernetes_validate, "1.25.0" if variant == "default" else "1.30.0")
    assert versions, "kubernetes-validate has no schemas"
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc}")


# ----------------------------------------------------------------------------------------------------
# Chart: what the DaemonSet asks of the node
# ----------------------------------------------------------------------------------------------------


def test_daemonset_runs_everywhere_on_the_host_network(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod.get("hostIPC") is not True
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    c = pod["containers"][0]
    assert c["image"] == f"ghcr.io/netwatchd/netwatchd:{netwatchd.__version__}"
    # Environment: the node's name and IP from the downward API; the kubelet URL built from NODE_IP.
    envs = {e["name"]: e for e in c["env"]}
    assert envs["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert envs["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert "--kubelet-url=https://$(NODE_IP):10250" in c["args"]
    # netwatchd, BCC and bpftool read the fixed host paths: no host-root prefix.
    assert "NETWATCHD_HOST_ROOT" not in envs
    # Health: liveness on /healthz, readiness on /readyz, on the named metrics port (9990).
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", 9990)
    assert "--listen=0.0.0.0:9990" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]


def test_daemonset_security_is_exactly_the_capabilities(helm: str, tmp_path: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    caps = values["securityContext"]["capabilities"]["add"]
    assert set(caps) >= {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"}
    sc = container_of(render(helm, tmp_path))["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"add": caps, "drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    # With CAP_SYS_ADMIN, no_new_privs means nothing (Kubernetes documents allowPrivilegeEscalation as true).
    assert "allowPrivilegeEscalation" not in sc
    # Without SYS_ADMIN (a kernel with CAP_BPF, no pod netns entering), no_new_privs is set.
    less = [c for c in caps if c != "SYS_ADMIN"]
    sc = container_of(render(helm, tmp_path, {"securityContext": {"capabilities": {"add": less}}}))["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    # privileged only as an option.
    sc = container_of(render(helm, tmp_path, {"securityContext": {"privileged": True}}))["securityContext"]
    assert sc["privileged"] is True and "capabilities" not in sc


def test_daemonset_mounts_what_the_daemon_reads(helm: str, tmp_path: Path) -> None:
    pod = one(render(helm, tmp_path), "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}

    def host(path: str) -> tuple[dict, dict]:
        m = mounts[path]
        return m, volumes[m["name"]]["hostPath"]

    for path, ro in [("/sys/kernel/btf", True), ("/sys/kernel/tracing", True), ("/sys/fs/bpf", False),
                     ("/run/netns", True), ("/lib/modules", True), ("/usr/src", True)]:
        m, hp = host(path)
        assert hp["path"] == path, "host paths are mounted at the same path (no NETWATCHD_HOST_ROOT)"
        assert m.get("readOnly", False) is ro, path
    assert mounts["/run/netns"]["mountPropagation"] == "HostToContainer"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # Consistent with what the daemon's start-up checks look for (kernel/env.py, without a host root).
    paths = env.HostPaths()
    assert str(paths.btf.parent) in mounts
    assert str(paths.tracefs_candidates[0]) in mounts
    assert str(paths.modules) in mounts
    # /proc: hostPID makes the container's own /proc the host's PID space; no extra mount.
    assert "/proc" not in mounts and "/host/proc" not in mounts
    # Kernel headers off (e.g. RHCOS, no headers on the node): the image's fallback headers are used.
    pod = one(render(helm, tmp_path, {"hostPaths": {"kernelHeaders": {"enabled": False}}}),
              "DaemonSet")["spec"]["template"]["spec"]
    assert not {"/lib/modules", "/usr/src"} & {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}


def test_rendered_args_are_every_flag_and_parse_with_the_daemon(helm: str, tmp_path: Path) -> None:
    values, expected = sample_config()
    docs = render(helm, tmp_path, ALL_OPTIONS, {"config": values})
    c = container_of(docs)
    args = c["args"]
    assert args[0] == "netwatchd"
    extra = yaml.safe_load(ALL_OPTIONS.read_text())["extraArgs"]
    assert args[len(args) - len(extra):] == extra
    rendered = [a.replace("$(NODE_IP)", "192.0.2.10") for a in args[1:len(args) - len(extra)]]
    flags_seen = {a.split("=", 1)[0] for a in rendered}
    assert flags_seen == set(daemon_flags()), "every daemon flag rendered once the chart value is set"
    parsed = build_parser().parse_args(rendered)
    # kubeletCA.configMap wins over config.kubeletCaFile: the file in the mounted ConfigMap.
    expected["kubelet_ca_file"] = "/etc/netwatchd/kubelet-ca/ca-bundle.crt"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/netwatchd/kubelet-ca"}
    for dest, value in expected.items():
        assert getattr(parsed, dest) == value, f"--{dest.replace('_', '-')}: {getattr(parsed, dest)!r} != {value!r}"
    assert parsed.listen == "0.0.0.0:9991"
    # Every value left at null/false renders nothing: the defaults' args are the daemon's defaults.
    default_args = container_of(render(helm, tmp_path))["args"]
    assert default_args == ["netwatchd", "--listen=0.0.0.0:9990", "--kubelet-url=https://$(NODE_IP):10250"]


def test_rbac_is_read_only_and_minimal(helm: str, tmp_path: Path) -> None:
    def rules(*values) -> list[dict]:
        return one(render(helm, tmp_path, *values), "ClusterRole")["rules"]

    def grants(rs: list[dict]) -> set[tuple[str, str]]:
        return {(r, v) for rule in rs for r in rule["resources"] for v in rule["verbs"]}

    default = rules()
    assert grants(default) == {
        ("services", "get"), ("services", "list"), ("services", "watch"),
        ("nodes", "get"), ("nodes", "list"), ("nodes", "watch"),
        ("nodes/pods", "get"),   # kubelet GET /pods with KubeletFineGrainedAuthz (1.33+)
        ("nodes/proxy", "get"),  # the same request on older kubelets
    }
    assert all(rule["apiGroups"] == [""] for rule in default)
    assert ("nodes/proxy", "get") not in grants(rules({"rbac": {"kubeletProxyFallback": False}}))
    scc = rules({"openshift": {"scc": {"create": True}}})
    (use,) = [r for r in scc if r["apiGroups"] == ["security.openshift.io"]]
    assert use["verbs"] == ["use"] and use["resourceNames"] == [f"{RELEASE}-netwatchd-{NAMESPACE}"]
    binding = one(render(helm, tmp_path), "ClusterRoleBinding")
    sa = one(render(helm, tmp_path), "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert one(render(helm, tmp_path), "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == \
        sa["metadata"]["name"]


def test_metrics_service_is_headless_and_selects_the_pods(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    svc = one(docs, "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9990, "targetPort": "metrics", "protocol": "TCP"}]
    labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


# ----------------------------------------------------------------------------------------------------
# Chart: CRD kinds, checked structurally
# ----------------------------------------------------------------------------------------------------


def test_prometheus_rule_is_the_alerts_file(helm: str, tmp_path: Path) -> None:
    if not ALERTS.is_file():
        pytest.skip("alerts/netwatchd-rules.yaml is not in the repository yet")
    chart_copy = CHART / "files" / "netwatchd-rules.yaml"
    assert chart_copy.read_bytes() == ALERTS.read_bytes(), \
        "charts/netwatchd/files/netwatchd-rules.yaml must be alerts/netwatchd-rules.yaml (a symlink to it)"
    docs = render(helm, tmp_path, {"metrics": {"prometheusRule": {"enabled": True}}})
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"], r
    assert "PrometheusRule" not in {d["kind"] for d in render(helm, tmp_path)}


def test_packaged_chart_carries_the_rules_file(helm: str, tmp_path: Path) -> None:
    """`helm package` follows the files/ symlink: the published chart holds the rules themselves."""
    proc = subprocess.run([helm, "package", str(CHART), "--destination", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = tmp_path.glob("netwatchd-*.tgz")
    with tarfile.open(archive) as tar:
        member = tar.getmember("netwatchd/files/netwatchd-rules.yaml")
        assert member.isfile()
        content = tar.extractfile(member).read()
    assert content == (CHART / "files" / "netwatchd-rules.yaml").read_bytes()
    assert "groups" in yaml.safe_load(content)


def test_service_monitor_scrapes_the_metrics_port_with_a_node_label(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, ALL_OPTIONS)
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == "monitoring" and sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # job="netwatchd" (the alert rules match it) from the Service's name label.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "netwatchd"
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", ep["interval"]) and re.fullmatch(r"\d+[smh]", ep["scrapeTimeout"])
    relabel = ep["relabelings"][0]
    assert relabel == {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"}
    assert ep["relabelings"][1]["targetLabel"] == "host_ip"
    assert ep["metricRelabelings"][0]["action"] == "drop"


# Required fields of security.openshift.io/v1 SecurityContextConstraints (OpenShift's CRD) and their types.
SCC_REQUIRED = {
    "allowHostDirVolumePlugin": bool, "allowHostIPC": bool, "allowHostNetwork": bool, "allowHostPID": bool,
    "allowHostPorts": bool, "allowPrivilegedContainer": bool, "readOnlyRootFilesystem": bool,
    "allowedCapabilities": list, "defaultAddCapabilities": list, "requiredDropCapabilities": list,
    "volumes": list, "priority": (int, type(None)),
}
SCC_VOLUMES = {"*", "none", "awsElasticBlockStore", "azureDisk", "azureFile", "cephFS", "cinder", "configMap",
               "csi", "downwardAPI", "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk",
               "gitRepo", "glusterfs", "hostPath", "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk",
               "portworxVolume", "projected", "quobyte", "rbd", "scaleIO", "secret", "storageOS", "vsphere"}


@pytest.mark.parametrize("privileged", [False, True])
def test_openshift_scc_allows_exactly_the_pod(helm: str, tmp_path: Path, privileged: bool) -> None:
    docs = render(helm, tmp_path, {"openshift": {"scc": {"create": True}},
                                   "securityContext": {"privileged": privileged}})
    scc = one(docs, "SecurityContextConstraints")
    assert scc["apiVersion"] == "security.openshift.io/v1"
    assert "namespace" not in scc["metadata"], "SCCs are cluster-scoped"
    for field, kind in SCC_REQUIRED.items():
        assert field in scc and isinstance(scc[field], kind), f"SCC.{field}"
    for strategy in ("runAsUser", "seLinuxContext", "fsGroup", "supplementalGroups"):
        assert scc[strategy]["type"] in {"RunAsAny", "MustRunAs", "MustRunAsRange", "MustRunAsNonRoot"}
    assert set(scc["volumes"]) <= SCC_VOLUMES
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    # Everything the pod asks for is allowed, and nothing it does not use.
    assert scc["allowHostNetwork"] == pod["hostNetwork"] and scc["allowHostPID"] == pod["hostPID"]
    assert scc["allowHostIPC"] is False
    assert scc["allowPrivilegedContainer"] is privileged
    if not privileged:
        assert scc["allowedCapabilities"] == c["securityContext"]["capabilities"]["add"]
    used = set()
    for v in pod["volumes"]:
        used |= set(v) - {"name"}
    assert used <= set(scc["volumes"])
    assert pod["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    seccomp = {"Unconfined": "unconfined", "RuntimeDefault": "runtime/default"}
    assert seccomp[pod["securityContext"]["seccompProfile"]["type"]] in scc["seccompProfiles"]
    rbac = one(docs, "ClusterRole")
    assert any(scc["metadata"]["name"] in r.get("resourceNames", []) for r in rbac["rules"])


# ----------------------------------------------------------------------------------------------------
# Image: offline build with podman, then run it
# ----------------------------------------------------------------------------------------------------

PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


class Podman:
    """podman on a private, temporary storage root (runc, cgroupfs, no events, no registry)."""

    def __init__(self, root: Path, driver: str) -> None:
        self.root, self.driver = root, driver
        self.base = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"),
                     "--tmpdir", str(root / "tmp"), "--storage-driver", driver, "--runtime", "runc",
                     "--cgroup-manager", "cgroupfs", "--events-backend", "none"]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:2])} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if os.geteuid() != 0:
        pytest.skip("the image build test runs podman as root")
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Debian packages not installed: {' '.join(missing)} (scripts/bootstrap.sh should install them)")
    root = tmp_path_factory.mktemp("podman")
    tarball = _tool("base-image")
    # overlay when the kernel and file system allow it (much faster), else vfs.
    drivers = [os.environ["NETWATCHD_PODMAN_STORAGE_DRIVER"]] if "NETWATCHD_PODMAN_STORAGE_DRIVER" in os.environ \
        else ["overlay", "vfs"]
    p = None
    for driver in drivers:
        p = Podman(root / driver, driver)
        if p("import", "--quiet", tarball, "localhost/netwatchd-base:bookworm", check=False).returncode == 0:
            break
        shutil.rmtree(root / driver, ignore_errors=True)
        p = None
    if p is None:
        pytest.fail(f"podman cannot import the base image with storage drivers {drivers}")
    try:
        yield p
    finally:
        p("rm", "--all", "--force", check=False, timeout=120)
        p("rmi", "--all", "--force", check=False, timeout=300)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """netwatchd's wheel, its dependencies and the build backend, for a build that reaches no index."""
    wh = REPO / ".cache" / "wheelhouse"
    wh.mkdir(parents=True, exist_ok=True)
    for old in wh.glob("netwatchd-*.whl"):
        old.unlink()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wh),
                           "--find-links", str(wh), str(REPO), "hatchling"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"the Python wheels cannot be fetched: {proc.stderr.strip().splitlines()[-1:]}")
    return wh


@pytest.fixture(scope="module")
def image(podman: Podman, wheelhouse: Path) -> str:
    tag = "localhost/netwatchd:packaging-test"
    started = time.monotonic()
    podman("build", "--pull=never", "--format", "docker", "--layers=false", "--jobs", "3", "--network", "host",
           *PODMAN_ULIMITS,
           "--volume", f"{wheelhouse}:/wheelhouse:ro", "--build-arg", "PIP_FIND_LINKS=/wheelhouse",
           "--build-arg", "PIP_NO_INDEX=1", "--build-arg", "BASE_IMAGE=localhost/netwatchd-base:bookworm",
           "--build-arg", f"VERSION={netwatchd.__version__}",
           "--tag", tag, "--file", str(REPO / "Containerfile"), str(REPO), timeout=900)
    size = podman("images", "--format", "{{.Size}}", tag).stdout.strip()
    print(f"image built in {time.monotonic() - started:.0f} s ({podman.driver} storage), {size}")
    return tag


@pytest.mark.timeout(1200)
def test_image_runs_netwatchd_version(podman: Podman, image: str) -> None:
    proc = podman("run", "--rm", "--network", "none", *PODMAN_ULIMITS, image, "netwatchd", "--version", timeout=120)
    assert proc.stdout.strip() == f"netwatchd {netwatchd.__version__}"


@pytest.mark.timeout(1200)
def test_image_contents(podman: Podman, image: str) -> None:
    """No package manager at run time; the BPF sources in the installed package; fallback headers chosen."""
    proc = podman("run", "--rm", "--network", "none", *PODMAN_ULIMITS, "--entrypoint", "/bin/sh", image, "-c",
                  "command -v apt-get apt pip pip3 || true; "
                  "python3 -c 'from netwatchd.probes.loader import bpf_source_dir as d; print(d())'; "
                  "ls /opt/netwatchd/kernel-headers/include/linux/skbuff.h; "
                  "echo headers=$(cat /opt/netwatchd/kernel-headers/.netwatchd-headers-version); "
                  "/usr/local/bin/netwatchd-entrypoint sh -c 'echo chosen=$BCC_KERNEL_SOURCE'", timeout=120)
    lines = proc.stdout.split()
    assert not [ln for ln in lines if re.search(r"/(apt|apt-get|pip3?)$", ln)], proc.stdout
    installed = r"/opt/netwatchd/venv/lib/python3\.\d+/site-packages/netwatchd/bpf"
    assert [ln for ln in lines if re.fullmatch(installed, ln)], proc.stdout
    assert "/opt/netwatchd/kernel-headers/include/linux/skbuff.h" in lines
    assert [ln for ln in lines if re.fullmatch(r"headers=\d+\.\d+\.\d+-\d+-amd64", ln)], proc.stdout
    # No node headers mounted: the entry point points BCC at the image's own.
    assert "chosen=/opt/netwatchd/kernel-headers" in lines, proc.stdout
    # The node's own tree, mounted as the chart does, is used as it is.
    if (Path("/lib/modules") / os.uname().release / "build" / "include").is_dir():
        proc = podman("run", "--rm", "--network", "none", *PODMAN_ULIMITS, "--volume", "/lib/modules:/lib/modules:ro",
                      "--volume", "/usr/src:/usr/src:ro", image, "sh", "-c", "echo chosen=${BCC_KERNEL_SOURCE:-node}",
                      timeout=120)
        assert proc.stdout.split() == ["chosen=node"], proc.stdout


def remove_stale_netns(prefix: str) -> None:
    """Delete `PREFIX<pid>-*` namespaces left by runs whose process is gone (an interrupted test)."""
    for path in Path("/run/netns").glob(f"{prefix}*"):
        m = re.match(rf"{re.escape(prefix)}(\d+)-", path.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", path.name], check=False)


@pytest.mark.timeout(1200)
def test_image_runs_the_daemon_with_the_chart_capabilities(podman: Podman, image: str) -> None:
    """The image's daemon, confined like the chart's pod, attaches its probes in a fresh node netns."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    caps = values["securityContext"]["capabilities"]["add"]
    remove_stale_netns("nwpkg-")
    netns = f"nwpkg-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    name = f"netwatchd-{netns}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        # No /lib/modules mount: the image's fallback kernel headers are what BCC compiles with.
        podman("run", "--detach", "--name", name, *PODMAN_ULIMITS, "--network", f"ns:/run/netns/{netns}",
               "--pid", "host", "--cap-drop", "ALL", "--cap-add", ",".join(f"CAP_{c}" for c in caps),
               "--security-opt", "seccomp=unconfined", "--read-only", "--tmpfs", "/tmp",
               "--volume", "/sys/kernel/btf:/sys/kernel/btf:ro",
               "--volume", "/sys/kernel/tracing:/sys/kernel/tracing:ro",
               "--volume", "/sys/fs/bpf:/sys/fs/bpf",
               "--volume", "/run/netns:/run/netns:ro,rslave",
               image, "--listen", "127.0.0.1:9990", "--no-apiserver", timeout=120)
        metrics, deadline = "", time.monotonic() + 180
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["ip", "netns", "exec", netns, sys.executable, "-c",
                 "import urllib.request as u; u.urlopen('http://127.0.0.1:9990/readyz', timeout=2); "
                 "print(u.urlopen('http://127.0.0.1:9990/metrics', timeout=10).read().decode())"],
                capture_output=True, text=True, timeout=30)
            if proc.returncode == 0:
                metrics = proc.stdout
                break
            if podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "false":
                break
            time.sleep(1)
        logs = podman("logs", name, check=False).stderr
        assert metrics, f"netwatchd in the image never became ready:\n{logs[-4000:]}"
        attached = re.findall(r'^netwatch_probe_attached\{([^}]*)\} (\S+)$', metrics, re.M)
        assert attached and any(float(v) == 1 for _, v in attached), metrics
        # A probe may miss a hook this kernel lacks, but never fail for lack of a privilege in the container.
        failures = [ln for ln in logs.splitlines() if '"probe_not_attached"' in ln and '"missing hook' not in ln]
        assert not failures, "probes failed under the chart's capabilities:\n" + "\n".join(failures)
        assert podman("stop", "--time", "30", name, timeout=60).returncode == 0
        logs = podman("logs", name, check=False).stderr
        assert '"detached"' in logs, logs[-2000:]
    finally:
        podman("rm", "--force", name, check=False, timeout=60)
        subprocess.run(["ip", "netns", "del", netns], check=False)
