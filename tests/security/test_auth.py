"""Bearer tokens on the controller API: a real controller over TLS with a tokens file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.auth import TokenAuthorizer, is_read_method, load_tokens, token_digest
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.cli import main as cli_main
from mecbench.client import Client
from mecbench.client_errors import ClientError
from mecbench.core.errors import PermissionDenied, Unauthenticated
from mecbench.core.server import build_server
from mecbench.core.settings import SettingsError
from mecbench.core.tls import TlsSettings
from mecbench.v1 import common_pb2, controller_pb2
from tests.controller.conftest import Stack, short_settings, start_stack, stop_stack, synthetic_sut
from tests.security.conftest import Pki

READER_TOKEN = "reader-token-0123456789"
RUNNER_TOKEN = "runner-token-9876543210"


def write_tokens(path: Path, entries: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps({"tokens": entries}))
    return path


@pytest.fixture(scope="module")
def token_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A controller over TLS (no client certificates) that wants a token for everything."""
    directory = tmp_path_factory.mktemp("tokens")
    tokens = directory / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        f"  - {{name: alice, role: read, sha256: {token_digest(READER_TOKEN)}}}\n"
        f"  - {{name: ci, role: run, sha256: {token_digest(RUNNER_TOKEN).upper()}}}\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        for name, value in pki.controller.env().items():
            patch.setenv(name, value)
        patch.setenv("MECBENCH_CONTROLLER_TOKENS_FILE", str(tokens))
        stack = start_stack(directory / "controller")
        try:
            yield stack
        finally:
            stop_stack(stack)


def sdk(stack: Stack, pki: Pki, token: str | None) -> Client:
    return Client(stack.server.address, ca_file=pki.ca.cert, token=token, retries=0, timeout_s=30)


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(ClientError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code


def test_a_call_without_a_token_or_with_an_unknown_one_is_unauthenticated(token_stack: Stack, pki: Pki) -> None:
    with sdk(token_stack, pki, None) as anonymous:
        assert code_of(anonymous.list_runs) == grpc.StatusCode.UNAUTHENTICATED
    with sdk(token_stack, pki, "not-a-token") as stranger:
        assert code_of(stranger.list_runs) == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(token_stack: Stack) -> None:
    # start_stack's channel: TLS from the environment, no token.
    reply = health_pb2_grpc.HealthStub(token_stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_run_token_runs_and_a_read_token_only_reads(token_stack: Stack, pki: Pki) -> None:
    with sdk(token_stack, pki, RUNNER_TOKEN) as runner:
        runner.deploy_sut("sut-auth", synthetic_sut(0.001))
        run = runner.start_run(
            controller_pb2.RunSpec(
                experiment_id="auth", sut_id="sut-auth",
                settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=20),
            )
        )
        final = runner.wait_run(run.run_id, timeout=60)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error

    with sdk(token_stack, pki, READER_TOKEN) as reader:
        assert run.run_id in {r.run_id for r in reader.list_runs()}
        assert reader.get_run(run.run_id).state == common_pb2.RUN_STATE_SUCCEEDED
        events = list(reader.watch_run(run.run_id, timeout=30))
        assert events and events[-1].run.state == common_pb2.RUN_STATE_SUCCEEDED
        with pytest.raises(ClientError) as caught:
            reader.start_run(controller_pb2.RunSpec(experiment_id="auth", sut_id="sut-auth",
                                                    settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM)))
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "'read'" in caught.value.details and "StartRun" in caught.value.details
        assert code_of(lambda: reader.cancel_run(run.run_id)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: reader.deploy_sut("x", synthetic_sut())) == grpc.StatusCode.PERMISSION_DENIED


# --- the tokens file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "bob", "role": "run", "token": "s3cret"}, "never the token"),
        ({"name": "bob", "role": "admin", "sha256": "0" * 64}, "role 'admin' is not one of read, run"),
        ({"name": "bob", "role": "read", "sha256": "abc"}, "64 hexadecimal digits"),
        ({"name": "bob", "role": "read"}, "missing"),
    ],
)
def test_a_bad_tokens_file_is_a_clear_start_up_error(tmp_path: Path, entry: dict[str, str], message: str) -> None:
    tokens = write_tokens(tmp_path / "tokens.json", [entry])
    with pytest.raises(SettingsError, match=message):
        create_server("127.0.0.1:0", ControllerSettings.load(data_dir=tmp_path / "data", tokens_file=tokens))
    # Nothing was started: the file is read before the controller's app exists.
    assert not (tmp_path / "data").exists()


def test_the_controller_command_reports_a_bad_tokens_file_in_one_line(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.json", [{"name": "bob", "role": "root", "sha256": "0" * 64}])
    result = subprocess.run(
        [sys.executable, "-m", "mecbench", "controller", "--listen", "127.0.0.1:0"],
        env={"MECBENCH_CONTROLLER_TOKENS_FILE": str(tokens), "MECBENCH_CONTROLLER_DATA_DIR": str(tmp_path / "data"),
             "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "role 'root' is not one of read, run" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_create_prints_a_token_and_an_entry_the_controller_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["token", "create", "--name", "dana", "--role", "run", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["sha256"] == token_digest(made["token"])
    entries = load_tokens(write_tokens(tmp_path / "t.json", [{k: made[k] for k in ("name", "role", "sha256")}]))
    assert [(e.name, e.role) for e in entries] == [("dana", "run")]


class _Context:
    def __init__(self, token: str | None) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def test_the_authorizer_names_the_caller_and_checks_roles(tmp_path: Path) -> None:
    authorizer = TokenAuthorizer.from_file(write_tokens(tmp_path / "t.json", [
        {"name": "alice", "role": "read", "sha256": token_digest(READER_TOKEN)},
    ]))
    assert authorizer("/mecbench.v1.Controller/ListRuns", _Context(READER_TOKEN)) == "alice"
    with pytest.raises(PermissionDenied, match="alice"):
        authorizer("/mecbench.v1.Controller/UploadBlob", _Context(READER_TOKEN))
    with pytest.raises(Unauthenticated):
        authorizer("/mecbench.v1.Controller/ListRuns", _Context(None))
    assert is_read_method("/mecbench.v1.Controller/WatchRun")
    assert not is_read_method("/mecbench.v1.Controller/CancelRun")


def test_the_interceptor_binds_the_caller_into_the_log_context_and_leaves_health_open() -> None:
    asked: list[str] = []

    def authorizer(method: str, _context: grpc.ServicerContext) -> str | None:
        asked.append(method)
        return "alice"

    def who(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        return str(structlog.contextvars.get_contextvars().get("caller", "")).encode()

    def register(server: grpc.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(who)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Who": handler})])

    running = build_server("127.0.0.1:0", register, ["test.Echo"], tls=TlsSettings(), authorizer=authorizer)
    try:
        with grpc.insecure_channel(running.address) as channel:
            assert channel.unary_unary("/test.Echo/Who")(b"", timeout=10) == b"alice"
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        running.stop(grace=0.5)
    assert asked == ["/test.Echo/Who"]
