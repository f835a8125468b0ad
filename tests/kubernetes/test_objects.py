"""Every object the Kubernetes backend generates passes kubernetes-validate --strict (for the
oldest supported and the newest known Kubernetes version) and the API server's own rules."""

from __future__ import annotations

import pytest

from controller.backends import k8s_objects as objects
from mecbench.core import durations
from mecbench.core.errors import InvalidArgument
from mecbench.v1 import common_pb2, sut_agent_pb2
from tests.kubernetes.checks import VERSIONS, all_problems
from tests.kubernetes.conftest import cluster_config

CTX = objects.ObjectContext(
    namespace="mecbench",
    image="ghcr.io/mecbench/mecbench:0.1.0",
    owner_label="mecbench-controller-owner-a1b2c3",
    expires_at="2030-01-01T00:00:00Z",
    owner=objects.OwnerRef("mecbench-controller-owner-a1b2c3", "5f0c6a8e-6c1e-4d7b-9a36-0c2b8f1d2e3f"),
    gpu_runtime_class="nvidia",
    store_secret="mecbench-store",
)


def synthetic(**fields: object) -> sut_agent_pb2.SutConfig:
    return sut_agent_pb2.SutConfig(
        synthetic=sut_agent_pb2.SyntheticBackendConfig(mean=durations.from_seconds(0.001)),
        **fields,  # type: ignore[arg-type]
    )


SUT_CONFIGS = {
    "plain": synthetic(),
    "gpu-resources-selector": synthetic(
        resources=common_pb2.ResourceLimits(cpu_cores=3.5, memory_bytes=8 * 2**30),
        gpus=common_pb2.GpuRequest(count=2),
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "kubernetes.io/arch": "amd64"},
    ),
    "image-override": synthetic(image="registry.example/mecbench-with-model:1.2"),
    "onnxruntime": sut_agent_pb2.SutConfig(
        onnxruntime=sut_agent_pb2.OnnxRuntimeBackendConfig(model_path="/models/resnet50.onnx"),
        image="registry.example/mecbench-resnet:1", gpus=common_pb2.GpuRequest(count=1),
    ),
    "external-sidecar": sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(server_type="openai", endpoint="http://127.0.0.1:8000",
                                                     model="meta-llama/Llama-3.1-8B-Instruct"),
        image="vllm/vllm-openai:v0.10.0", args=["--model", "meta-llama/Llama-3.1-8B-Instruct", "--port", "8000"],
        env={"HF_HOME": "/tmp/hf"}, gpus=common_pb2.GpuRequest(count=1),
        resources=common_pb2.ResourceLimits(cpu_cores=8, memory_bytes=64 * 2**30),
    ),
    "external-profile": sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(profile="model-server"),
        env={"OMP_NUM_THREADS": "4"},
    ),
}


@pytest.mark.parametrize("case", sorted(SUT_CONFIGS))
def test_sut_pod_validates_strictly(case: str) -> None:
    pod = objects.sut_pod(CTX, objects.salted_name("experiment-42", "sut", "a1b2c3"), "sut-experiment-42",
                          SUT_CONFIGS[case])
    assert all_problems(pod) == []


def test_gpu_sut_pod_asks_the_device_plugin_and_tolerates_gpu_nodes() -> None:
    pod = objects.sut_pod(CTX, "mecbench-x-sut-a1b2c3", "sut-x", SUT_CONFIGS["gpu-resources-selector"])
    spec = pod["spec"]
    [agent] = spec["containers"]
    assert agent["resources"] == {
        "requests": {"cpu": "3500m", "memory": str(8 * 2**30), "nvidia.com/gpu": "2"},
        "limits": {"cpu": "3500m", "memory": str(8 * 2**30), "nvidia.com/gpu": "2"},
    }
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "amd64", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert agent["readinessProbe"]["grpc"] == {"port": objects.GRPC_PORT}
    assert {p["containerPort"] for p in agent["ports"]} == {objects.GRPC_PORT, objects.TCP_DATA_PLANE_PORT}
    assert agent["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False


def test_image_override_replaces_the_agents_image_and_a_sidecar_runs_the_server() -> None:
    pod = objects.sut_pod(CTX, "mecbench-x-sut-a1b2c3", "sut-x", SUT_CONFIGS["image-override"])
    [agent] = pod["spec"]["containers"]
    assert agent["image"] == "registry.example/mecbench-with-model:1.2"
    assert agent["command"] == ["mecbench"] and agent["args"][0] == "sut-agent"

    pod = objects.sut_pod(CTX, "mecbench-x-sut-a1b2c3", "sut-x", SUT_CONFIGS["external-sidecar"])
    agent, server = pod["spec"]["containers"]
    assert agent["image"] == CTX.image and "resources" not in agent
    assert server["image"] == "vllm/vllm-openai:v0.10.0"
    assert server["args"][-2:] == ["--port", "8000"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "HF_HOME", "value": "/tmp/hf"} in server["env"]


def test_sut_service_exposes_grpc_and_the_tcp_data_plane() -> None:
    service = objects.sut_service(CTX, "mecbench-x-sut-a1b2c3", "mecbench-x-sut-a1b2c3", "sut-x")
    assert all_problems(service) == []
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("grpc", objects.GRPC_PORT), ("tcp-data", objects.TCP_DATA_PLANE_PORT)
    ]


def test_loadgen_pod_and_job_validate_strictly() -> None:
    env = {"MECBENCH_LOADGEN_MAX_SESSIONS": "4"}
    pod = objects.loadgen_pod(CTX, objects.salted_name("default", "loadgen", "a1b2c3"), "loadgen-default", env)
    job = objects.loadgen_job(CTX, objects.salted_name("0123456789-r1-c0", "job", "a1b2c3"), "job-0123456789-r1-c0",
                              env, active_deadline_s=86400, ttl_after_finished_s=300)
    assert all_problems(pod) == []
    assert all_problems(job) == []
    assert job["spec"]["ttlSecondsAfterFinished"] == 300
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["labels"][objects.LABEL_EXPERIMENT] == "run-0123456789"


def test_owner_configmap_validates_and_has_no_owner_itself() -> None:
    configmap = objects.owner_configmap(CTX, "mecbench-controller-owner-a1b2c3", "controller")
    assert all_problems(configmap) == []
    assert "ownerReferences" not in configmap["metadata"]
    assert configmap["metadata"]["labels"][objects.LABEL_COMPONENT] == "owner"


@pytest.mark.parametrize("scope", ["run-0123456789", "A_Very/Odd Name!!", "x" * 200, "-", ""])
def test_salted_names_are_dns_labels_of_at_most_63(scope: str) -> None:
    for kind in ("sut", "loadgen", "job", "owner"):
        name = objects.salted_name(scope, kind, objects.new_salt())
        assert objects.is_dns_label(name) and len(name) <= 63
        assert name.startswith("mecbench-") and f"-{kind}-" in name


def test_experiment_labels() -> None:
    assert objects.experiment_of("sut-run-0123456789") == "run-0123456789"
    assert objects.experiment_of("job-0123456789-r2-c3") == "run-0123456789"
    assert objects.experiment_of("sut-quickstart-synthetic") == "quickstart-synthetic"
    assert objects.experiment_of("loadgen-default") == "loadgen-default"
    assert objects.label_value("--" + "y" * 80 + "..") == "y" * 61


def test_what_the_cluster_cannot_do_is_refused_all_at_once() -> None:
    config = synthetic(gpus=common_pb2.GpuRequest(indices=[0]), args=["--x"], env={"A=B": "1"}, image="has space")
    with pytest.raises(InvalidArgument) as caught:
        objects.sut_pod(CTX, "mecbench-x-sut-a1b2c3", "sut-x", config)
    assert {v.field for v in caught.value.violations} == {"sut.gpus.indices", "sut.args", "sut.env", "sut.image"}


def test_cpu_quantities() -> None:
    assert objects.cpu_quantity(0.5) == "500m"
    assert objects.cpu_quantity(2) == "2000m"
    assert objects.cpu_quantity(0.0001) == "1m"
    assert objects.cpu_quantity(1.0005) == "1001m"


# --- cluster SUTs (issue 23) ------------------------------------------------------------------------

TLS_CTX = objects.ObjectContext(**{**CTX.__dict__, "tls_secret": "mecbench-agent-tls"})


@pytest.mark.parametrize("gpus", [(), (1, 1)])
def test_every_cluster_object_validates_strictly(gpus: tuple[int, ...]) -> None:
    config = cluster_config("w1", "w2", gpus=gpus, image="registry.example/vllm-mecbench:0.10")
    config.gpus.count = 1 if gpus else 0
    names = objects.cluster_names("run-0123456789abcdef-with-a-long-experiment-name", "a1b2c3")
    agent = "sut-run-0123456789abcdef-with-a-long-experiment-name"
    bodies = [
        objects.leader_worker_set(TLS_CTX, names, agent, config),
        objects.cluster_head_pod(TLS_CTX, names, agent, config),
        objects.members_service(TLS_CTX, names, agent),
        objects.sut_service(TLS_CTX, names.base, names.base, agent),
        objects.worker_statefulset(TLS_CTX, names, agent, config, 0),
        objects.members_network_policy(TLS_CTX, names, agent, [(6379, 6379), (10002, 10100)]),
        objects.members_network_policy(TLS_CTX, names, agent, None),
    ]
    problems = {f"{b['kind']}/{b['metadata']['name']}": all_problems(b) for b in bodies}
    assert {k: v for k, v in problems.items() if v} == {}
    lws, head = bodies[0], bodies[1]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert lws["spec"]["startupPolicy"] == "LeaderReady" and template["restartPolicy"] == "None"
    assert template["size"] == 3
    # Worker agents admit the controller only; the head also LoadGens (the data plane).
    worker_env = {e["name"]: e["value"] for e in template["workerTemplate"]["spec"]["containers"][0]["env"]}
    head_env = {e["name"]: e["value"] for e in head["spec"]["containers"][0]["env"]}
    assert worker_env["MECBENCH_SUT_TLS_ALLOWED_CLIENTS"] == "mecbench-controller"
    assert head_env["MECBENCH_SUT_TLS_ALLOWED_CLIENTS"] == "mecbench-controller,mecbench-agent"
    # The cluster's image is the agents' own in every member: no sidecar.
    assert [c["image"] for c in head["spec"]["containers"]] == ["registry.example/vllm-mecbench:0.10"]
    if gpus:
        worker = template["workerTemplate"]["spec"]
        assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert worker["runtimeClassName"] == "nvidia" and worker["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_checks_refuse_a_leader_worker_set_the_api_server_would() -> None:
    """The LeaderWorkerSet checks can fail: an unknown field, a wrong enum, a bad pod template."""
    names = objects.cluster_names("x", "a1b2c3")
    good = objects.leader_worker_set(TLS_CTX, names, "sut-x", cluster_config("w1"))
    assert all_problems(good) == []
    bad = objects.leader_worker_set(TLS_CTX, names, "sut-x", cluster_config("w1"))
    bad["spec"]["startupPolicy"] = "WhenReady"
    bad["spec"]["leaderWorkerTemplate"]["sizes"] = 2
    bad["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    bad["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["restartPolicy"] = "Never"
    problems = " | ".join(all_problems(bad))
    assert "WhenReady" in problems and "sizes" in problems
    assert "workerTemplate: 1.33: template.spec.containers.0.imagePullPolicy" in problems
    assert "leaderTemplate: its pods are a StatefulSet's: restartPolicy Always" in problems


def test_versions_checked_include_a_current_one() -> None:
    assert VERSIONS[0] == "1.33"
    assert tuple(int(x) for x in VERSIONS[-1].split(".")[:2]) >= (1, 33)
