"""TLS, mutual TLS and bearer tokens on real servers, with throwaway certificates made here."""

import datetime
import ipaddress
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.crossrec_client import ClientSecurity
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from tests.reliability.support import HealthWatch
from tools.stack import ServiceProcess, free_port

TOKEN = "s3cret-token-for-tests"


def _cert(subject: str, issuer_key, issuer_name, key, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                          subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("crossrec test CA", ca_key, None, ca_key, ca=True)
    paths = {"ca": root / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"crossrec {name}", ca_key, ca.subject, key, server=server)
        paths[name] = root / f"{name}.pem"
        paths[f"{name}_key"] = root / f"{name}.key"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    (root / "token").write_text(TOKEN + "\n")
    paths["token"] = root / "token"
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def secure_embedding(model_repo, pki, tmp_path_factory):
    """Embedding with mutual TLS and a bearer token, and a plaintext health-only port
    (`proc.health_address`)."""
    security = ClientSecurity(pki["ca"], pki["client"], pki["client_key"], TOKEN)
    health_port = free_port()
    proc = ServiceProcess("embedding", [
        "--model-repo", str(model_repo), "--tls-cert", pki["server"], "--tls-key",
        pki["server_key"], "--tls-client-ca", pki["ca"], "--auth-token-file", pki["token"],
        "--health-port", str(health_port)],
        tmp_path_factory.mktemp("secure"), security=security).start().wait_ready()
    proc.health_address = f"127.0.0.1:{health_port}"
    yield proc, security
    assert proc.stop() == 0


def embed(channel, metadata=()):
    return embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
        embedding_pb2.EmbedRequest(texts=["stapler"]), timeout=10, metadata=metadata)


def test_mutual_tls_with_the_token_is_served(secure_embedding):
    proc, security = secure_embedding
    with security.channel(proc.address) as channel:
        assert len(embed(channel, security.metadata()).embeddings) == 1


@pytest.mark.parametrize("metadata", [
    (), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
    (("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")),
    (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")),
    (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}"))],
    ids=["missing", "wrong", "no-bearer", "wrong-then-right", "right-then-wrong",
         "right-twice"])
def test_a_missing_wrong_or_repeated_token_is_unauthenticated(secure_embedding, metadata):
    proc, security = secure_embedding
    with security.channel(proc.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            embed(channel, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token_so_probes_work(secure_embedding):
    proc, security = secure_embedding
    with security.channel(proc.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_and_certificate_less_clients_are_refused(secure_embedding, pki):
    proc, security = secure_embedding
    for client in (ClientSecurity(token=TOKEN), ClientSecurity(pki["ca"], token=TOKEN)):
        with client.channel(proc.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                embed(channel, client.metadata())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_service_to_service_calls_use_tls_and_the_token(secure_embedding, pki, model_repo,
                                                         tmp_path):
    embedding, security = secure_embedding
    fusion = ServiceProcess("fusion", [
        "--model-repo", str(model_repo), "--embedding-address", embedding.address,
        "--sqlite-path", str(tmp_path / "f.sqlite3"),
        "--tls-cert", pki["server"], "--tls-key", pki["server_key"],
        "--tls-client-ca", pki["ca"], "--auth-token-file", pki["token"],
        "--upstream-tls-ca", pki["ca"], "--upstream-tls-cert", pki["client"],
        "--upstream-tls-key", pki["client_key"]], tmp_path, security=security)
    fusion.start().wait_ready(60)
    try:
        with security.channel(fusion.address) as channel:
            reply = fusion_pb2_grpc.FusionServiceStub(channel).Ingest(fusion_pb2.IngestRequest(
                events=[dict(event_id="s1", user_id="u", platform="office", action=2,
                             item_id="i1", item_text="secure stapler")]),
                timeout=30, metadata=security.metadata())
        assert reply.accepted == 1  # fusion reached embedding over mutual TLS with the token
    finally:
        assert fusion.stop() == 0


# --- the plaintext health-only port (kubelet's gRPC probes cannot do TLS) --------------------
def health_check(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=5).status


def test_the_health_port_answers_plaintext_checks_without_a_token(secure_embedding):
    proc, _ = secure_embedding
    with grpc.insecure_channel(proc.health_address) as channel:
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("metadata", [(), (("authorization", f"Bearer {TOKEN}"),)])
def test_the_health_port_serves_nothing_but_health(secure_embedding, metadata):
    proc, _ = secure_embedding
    with grpc.insecure_channel(proc.health_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            embed(channel, metadata)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        reflection = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            list(reflection(iter([b""]), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_health_port_reports_not_serving_on_sigterm_before_it_closes(secure_embedding, pki,
                                                                         model_repo, tmp_path):
    embedding, security = secure_embedding
    health_port = free_port()
    fusion = ServiceProcess("fusion", [
        "--model-repo", str(model_repo), "--embedding-address", embedding.address,
        "--sqlite-path", str(tmp_path / "f.sqlite3"),
        "--tls-cert", pki["server"], "--tls-key", pki["server_key"],
        "--auth-token-file", pki["token"], "--health-port", str(health_port),
        "--upstream-tls-ca", pki["ca"], "--upstream-tls-cert", pki["client"],
        "--upstream-tls-key", pki["client_key"]], tmp_path,
        security=ClientSecurity(pki["ca"], token=TOKEN))
    fusion.start().wait_ready(60)
    health_address = f"127.0.0.1:{health_port}"
    try:
        with grpc.insecure_channel(health_address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                fusion_pb2_grpc.FusionServiceStub(channel).GetProfile(
                    fusion_pb2.GetProfileRequest(user_id="u"), timeout=5,
                    metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        watch = HealthWatch(health_address, limit_s=30)
        try:
            fusion.proc.terminate()
            assert watch.wait_not_serving(20) is not None, watch.watched
        finally:
            watch.close()
    finally:
        assert fusion.stop() == 0


# --- auth never fails open -------------------------------------------------------------------
START_LIMIT_S = 60.0


def start_refused(model_repo, run_dir, *args) -> tuple[int, str]:
    """Start embedding with `args`; (exit code, its output) once it exits. Fails the test if
    it serves instead (a port file appears) or is still running after START_LIMIT_S."""
    proc = ServiceProcess("embedding", ["--model-repo", str(model_repo), *args], run_dir)
    proc.start()
    deadline = time.monotonic() + START_LIMIT_S
    try:
        while proc.proc.poll() is None and time.monotonic() < deadline:
            assert not proc.port_file.exists(), f"started serving with {args}: fails open"
            time.sleep(0.05)
        assert proc.proc.poll() is not None, f"still running after {START_LIMIT_S:.0f} s"
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    return proc.proc.returncode, proc.log_path.read_text()


@pytest.mark.parametrize("content", ["", "  \n\t\n", None], ids=["empty", "whitespace",
                                                                  "missing"])
def test_an_empty_or_missing_token_file_refuses_to_start_with_a_one_line_error(
        model_repo, tmp_path, content):
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    code, output = start_refused(model_repo, tmp_path / "run", "--auth-token-file", str(token))
    errors = [line for line in output.splitlines() if '"level": "ERROR"' in line]
    print(f"\n{content!r}: exit {code}: {errors}")
    assert code != 0
    assert "Traceback" not in output
    assert len(errors) == 1 and "--auth-token-file" in errors[0] and str(token) in errors[0]


def reflection_list(channel, metadata=()):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=10, metadata=metadata)
    return [s.name for r in replies for s in r.list_services_response.service]


def test_reflection_needs_the_token_when_auth_is_on(secure_embedding):
    proc, security = secure_embedding
    with security.channel(proc.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            reflection_list(channel)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        names = reflection_list(channel, security.metadata())
    assert "crossrec.embedding.v1.EmbeddingService" in names
