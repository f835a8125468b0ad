"""MECBench node agent: traffic shaping through netlink, GPU pinning and telemetry, one per node."""
