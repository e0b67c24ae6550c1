"""TLS material, real gRPC TLS/mTLS round trips against the health service, and client tokens."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedmoe.security import (
    ENROLMENT_FILE,
    AuthError,
    TokenAuthority,
    bearer,
    channel_credentials,
    make_certs,
    server_credentials,
)

TIMEOUT = 5.0
SECRET = bytes(range(32))
KEYS = ["ca.key", "server.key", "client-client.key", "client-other.key"]
CERTS = ["ca.pem", "server.pem", "client-client.pem", "client-other.pem"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs") / "tls", clients=("client", "other"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("other-ca"))


def _cert(directory: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / name).read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_make_certs_writes_files_with_modes(certs: Path) -> None:
    assert sorted(p.name for p in certs.iterdir()) == sorted([*KEYS, *CERTS, ENROLMENT_FILE])
    assert _mode(certs / ENROLMENT_FILE) == 0o600 and len((certs / ENROLMENT_FILE).read_text().strip()) >= 32
    for name in KEYS:
        pem = (certs / name).read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert _mode(certs / name) == 0o600, name
    for name in CERTS:
        assert _mode(certs / name) == 0o644, name


def test_ca_is_self_signed_ca(certs: Path) -> None:
    ca = _cert(certs, "ca.pem")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)


def test_server_cert_issued_by_ca_with_sans(certs: Path, other_ca: Path) -> None:
    ca, server = _cert(certs, "ca.pem"), _cert(certs, "server.pem")
    server.verify_directly_issued_by(ca)
    with pytest.raises((ValueError, InvalidSignature)):
        server.verify_directly_issued_by(_cert(other_ca, "ca.pem"))
    assert isinstance(server.signature_hash_algorithm, hashes.SHA256)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_client_certs_issued_by_ca_for_client_auth(certs: Path) -> None:
    ca = _cert(certs, "ca.pem")
    for name in ("client", "other"):
        cert = _cert(certs, f"client-{name}.pem")
        cert.verify_directly_issued_by(ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH not in eku
        key = serialization.load_pem_private_key((certs / f"client-{name}.key").read_bytes(), password=None)
        assert key.public_key() == cert.public_key()


def test_refuses_to_overwrite_ca_unless_asked(tmp_path: Path) -> None:
    make_certs(tmp_path, hosts=("coordinator.example", "10.0.0.7"), clients=())
    ca_key = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(FileExistsError, match="ca.key"):
        make_certs(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == ca_key
    make_certs(tmp_path, overwrite=True)
    assert (tmp_path / "ca.key").read_bytes() != ca_key
    _cert(tmp_path, "server.pem").verify_directly_issued_by(_cert(tmp_path, "ca.pem"))


def test_rejects_client_names_that_are_not_file_names(tmp_path: Path) -> None:
    for bad in ("../evil", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            make_certs(tmp_path / "x", clients=(bad,))
    assert not (tmp_path / "x" / "ca.key").exists()


def test_missing_files_name_the_file_and_the_command(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedmoe certs --out") as info:
        server_credentials(tmp_path)
    assert info.value.filename == str(tmp_path / "server.key")
    with pytest.raises(FileNotFoundError, match="fedmoe certs --out") as info:
        channel_credentials(tmp_path)
    assert "ca.pem" in str(info.value)
    with pytest.raises(FileNotFoundError, match="client-nobody"):
        channel_credentials(certs, client="nobody")


@pytest.fixture
def serve(certs: Path) -> Iterator[Callable[..., int]]:
    servers: list[grpc.Server] = []

    def start(require_client_cert: bool = False) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servers.append(server)
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(certs, require_client_cert))
        assert port > 0
        server.start()
        return port

    try:
        yield start
    finally:
        for server in servers:
            server.stop(grace=None)


def _check(channel: grpc.Channel) -> int:
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status


def _check_fails(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _check(channel)
    return info.value.code()


def test_tls_round_trip(serve: Callable[..., int], certs: Path) -> None:
    port = serve()
    assert (
        _check(grpc.secure_channel(f"localhost:{port}", channel_credentials(certs)))
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert (
        _check(grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(certs)))
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_insecure_channel_to_tls_port_fails(serve: Callable[..., int]) -> None:
    port = serve()
    assert _check_fails(grpc.insecure_channel(f"127.0.0.1:{port}")) == grpc.StatusCode.UNAVAILABLE


def test_channel_trusting_another_ca_fails(serve: Callable[..., int], other_ca: Path) -> None:
    port = serve()
    assert (
        _check_fails(grpc.secure_channel(f"localhost:{port}", channel_credentials(other_ca)))
        == grpc.StatusCode.UNAVAILABLE
    )


def test_mutual_tls(serve: Callable[..., int], certs: Path, other_ca: Path) -> None:
    port = serve(require_client_cert=True)
    target = f"localhost:{port}"
    assert (
        _check_fails(grpc.secure_channel(target, channel_credentials(certs))) == grpc.StatusCode.UNAVAILABLE
    )
    # a client cert from another CA, presented while trusting the right server CA
    foreign = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(other_ca / "client-client.key").read_bytes(),
        certificate_chain=(other_ca / "client-client.pem").read_bytes(),
    )
    assert _check_fails(grpc.secure_channel(target, foreign)) == grpc.StatusCode.UNAVAILABLE
    creds = channel_credentials(certs, client="client")
    assert _check(grpc.secure_channel(target, creds)) == health_pb2.HealthCheckResponse.SERVING


def _secret_forms(secret: bytes) -> list[str]:
    return [secret.hex(), repr(secret), secret.decode("latin-1")]


def _assert_clean(err: AuthError, token: str, secret: bytes) -> None:
    text = str(err) + repr(err) + err.reason
    assert token not in text
    for form in _secret_forms(secret):
        assert form not in text


def _substitute(text: str, i: int) -> str:
    return text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]


def test_token_round_trip() -> None:
    authority = TokenAuthority(SECRET)
    for client_id in ("client-1", "ünïcode:with:colons", "x"):
        token = authority.issue(client_id)
        assert all(c.isalnum() or c in "-_." for c in token)
        assert authority.verify(token) == client_id
    assert authority.issue("a") != authority.issue("b")
    assert SECRET.hex() not in repr(authority)


def test_tampered_tokens_fail() -> None:
    authority = TokenAuthority(SECRET)
    token = authority.issue("client-1")
    payload, mac = token.split(".")
    targets = {
        "mac-middle": f"{payload}.{_substitute(mac, len(mac) // 2)}",
        "mac-last": f"{payload}.{_substitute(mac, len(mac) - 1)}",
        "payload-first": f"{_substitute(payload, 0)}.{mac}",
        "payload-last": f"{_substitute(payload, len(payload) - 1)}.{mac}",
    }
    # every single-character substitution anywhere in the token must be rejected
    targets.update({f"pos-{i}": _substitute(token, i) for i in range(len(token))})
    for label, forged in targets.items():
        assert forged != token, label
        with pytest.raises(AuthError) as info:
            authority.verify(forged)
        _assert_clean(info.value, forged, SECRET)


@pytest.mark.parametrize("bad", ["", "no-dot", "a.b.c", "!!!.???", "a.", ".a", "x" * 10_000])
def test_malformed_tokens_fail(bad: str) -> None:
    with pytest.raises(AuthError, match="malformed") as info:
        TokenAuthority(SECRET).verify(bad)
    if bad:
        _assert_clean(info.value, bad, SECRET)


def test_expired_token_fails() -> None:
    now = [1_000_000.0]
    authority = TokenAuthority(SECRET, ttl_seconds=60, clock=lambda: now[0])
    token = authority.issue("client-1")
    now[0] += 59
    assert authority.verify(token) == "client-1"
    now[0] += 2
    with pytest.raises(AuthError, match="expired") as info:
        authority.verify(token)
    _assert_clean(info.value, token, SECRET)


def test_token_from_another_secret_fails() -> None:
    other_secret = b"\xff" * 32
    token = TokenAuthority(other_secret).issue("client-1")
    with pytest.raises(AuthError) as info:
        TokenAuthority(SECRET).verify(token)
    _assert_clean(info.value, token, SECRET)
    _assert_clean(info.value, token, other_secret)


def test_authority_rejects_weak_settings() -> None:
    with pytest.raises(ValueError):
        TokenAuthority(b"short")
    with pytest.raises(ValueError):
        TokenAuthority(SECRET, ttl_seconds=0)
    with pytest.raises(ValueError):
        TokenAuthority(SECRET).issue("")


def test_load_or_create_persists_secret(tmp_path: Path) -> None:
    path = tmp_path / "state" / "token.secret"
    first = TokenAuthority.load_or_create(path)
    assert _mode(path) == 0o600
    secret = path.read_bytes()
    assert len(secret) == 32
    assert [p.name for p in path.parent.iterdir()] == ["token.secret"]  # no temp file left behind
    second = TokenAuthority.load_or_create(path)
    assert path.read_bytes() == secret
    assert second.verify(first.issue("a")) == "a"
    assert first.verify(second.issue("b")) == "b"
    other = TokenAuthority.load_or_create(tmp_path / "elsewhere.secret")
    with pytest.raises(AuthError):
        other.verify(first.issue("a"))


def test_load_or_create_rejects_corrupt_secret(tmp_path: Path) -> None:
    path = tmp_path / "token.secret"
    path.write_bytes(b"too short")
    with pytest.raises(ValueError, match="expected 32"):
        TokenAuthority.load_or_create(path)


def test_bearer_parses_metadata() -> None:
    assert bearer(None) is None
    assert bearer([]) is None
    assert bearer([("x-other", "Bearer nope")]) is None
    assert bearer([("authorization", "Bearer abc.def")]) == "abc.def"
    assert bearer([("user-agent", "grpc"), ("authorization", "bearer  tok ")]) == "tok"
    assert bearer([("Authorization", "Bearer tok")]) == "tok"
    assert bearer([("authorization", "Basic dXNlcjpwdw==")]) is None
    assert bearer([("authorization", "Bearer")]) is None
    assert bearer([("authorization", "Bearer ")]) is None
    assert bearer([("authorization", "Basic x"), ("authorization", "Bearer second")]) == "second"


def test_bearer_token_round_trip_through_grpc_metadata() -> None:
    authority = TokenAuthority(SECRET)
    token = authority.issue("client-7")
    metadata = (("authorization", f"Bearer {token}"),)
    assert authority.verify(bearer(metadata) or "") == "client-7"
