"""netwatchd: eBPF node network observability for Kubernetes, per traffic class."""

__version__ = "0.1.0"
