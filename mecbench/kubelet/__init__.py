"""Generated from protos/mecbench/kubelet (the kubelet's pod-resources API) by scripts/genproto.py."""
