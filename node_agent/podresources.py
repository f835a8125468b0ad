"""The kubelet's pod-resources API: which devices the kubelet gave a pod's containers.

The kubelet serves `v1.PodResourcesLister` on a unix socket of the node
(`/var/lib/kubelet/pod-resources/kubelet.sock`; the DaemonSet mounts its folder). For a GPU the
device ids are the GPU UUIDs the device plugin allocated (`nvidia.com/gpu`), which is what the pod
holds whether or not its processes have touched the GPU yet, where NVML's process lists only
show GPUs in use. Where the socket is not mounted, the caller falls back to NVML.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from mecbench.core.errors import FailedPrecondition, NotFound
from mecbench.kubelet import podresources_pb2, podresources_pb2_grpc

TIMEOUT_S = 5.0


def pod_devices(socket: Path, namespace: str, name: str) -> dict[str, list[str]]:
    """Resource name (e.g. `nvidia.com/gpu`) to the device ids the kubelet gave the pod's
    containers. FailedPrecondition when the kubelet cannot be asked, NotFound when it does not
    know the pod."""
    if not socket.exists():
        raise FailedPrecondition(f"the kubelet's pod-resources socket {socket} is not mounted")
    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            reply = podresources_pb2_grpc.PodResourcesListerStub(channel).List(
                podresources_pb2.ListPodResourcesRequest(), timeout=TIMEOUT_S
            )
    except grpc.RpcError as exc:
        raise FailedPrecondition(f"the kubelet's pod-resources API at {socket} failed: {exc.code().name}") from None
    for pod in reply.pod_resources:
        if pod.namespace == namespace and pod.name == name:
            devices: dict[str, list[str]] = {}
            for container in pod.containers:
                for device in container.devices:
                    devices.setdefault(device.resource_name, []).extend(device.device_ids)
            return devices
    raise NotFound(f"the kubelet lists no pod {namespace}/{name}")
