"""TLS material (made with `cryptography`), gRPC credentials from it, and HMAC-signed client tokens."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import errno
import hashlib
import hmac
import ipaddress
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmoe.wire import tensor_digest

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
KEY_MODE = 0o600
CERT_MODE = 0o644
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
MAX_TOKEN_CHARS = 4096
ENROLMENT_ENV = "FEDMOE_ENROLMENT_TOKEN"
ENROLMENT_FILE = "enrolment.token"

_CLIENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN_DOMAIN = b"fedmoe-token/1\x00"
_CLOCK_SKEW = dt.timedelta(minutes=5)


def client_cert_names(client: str) -> tuple[str, str]:
    """File names (certificate, key) of the client certificate for `client`."""
    return f"client-{client}.pem", f"client-{client}.key"


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write data to path atomically (temp file, fsync, os.replace) with exactly `mode`,
    whatever the umask.
    """
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _leaf(
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    days: int,
    sans: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_certs(
    directory: str | os.PathLike[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    clients: Sequence[str] = ("client",),
    days: int = 365,
    *,
    overwrite: bool = False,
) -> Path:
    """Create a CA, a server certificate for `hosts`, one client certificate per name and an enrolment token
    (enrolment.token, kept if present: clients given it may join) in `directory`.

    ECDSA P-256 keys (PKCS8 PEM, unencrypted, mode 0o600) and SHA-256 signatures; certificates mode 0o644.
    Refuses to replace an existing ca.key unless overwrite=True; ca.key is written last, so an interrupted
    run can simply be repeated.
    """
    if not hosts:
        raise ValueError("make_certs needs at least one host for the server certificate")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    for name in clients:
        if not _CLIENT_NAME.fullmatch(name):
            raise ValueError(
                f"client name {name!r} must match {_CLIENT_NAME.pattern} (it becomes a file name)"
            )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if (out / CA_KEY).exists() and not overwrite:
        raise FileExistsError(
            f"{out / CA_KEY} already exists; refusing to replace the CA (every issued certificate would stop "
            "verifying). Pass overwrite=True to create a new CA."
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoe CA")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_cert, server_key = _leaf(
        hosts[0], ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH, days, [_san(h) for h in hosts]
    )
    write_file(out / CA_CERT, _cert_pem(ca_cert), CERT_MODE)
    write_file(out / SERVER_CERT, _cert_pem(server_cert), CERT_MODE)
    write_file(out / SERVER_KEY, _key_pem(server_key), KEY_MODE)
    for name in clients:
        cert, key = _leaf(name, ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH, days)
        cert_name, key_name = client_cert_names(name)
        write_file(out / cert_name, _cert_pem(cert), CERT_MODE)
        write_file(out / key_name, _key_pem(key), KEY_MODE)
    _token_file(out / ENROLMENT_FILE)
    write_file(out / CA_KEY, _key_pem(ca_key), KEY_MODE)
    return out


def _read(directory: str | os.PathLike[str], name: str) -> bytes:
    path = Path(directory) / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            f"TLS file missing; create the certificates with `fedmoe certs --out {Path(directory)}`",
            str(path),
        ) from None


def server_credentials(
    directory: str | os.PathLike[str], require_client_cert: bool = False
) -> grpc.ServerCredentials:
    """Server TLS credentials from server.pem/server.key;
    with require_client_cert, clients need a cert from ca.pem.
    """
    pair = [(_read(directory, SERVER_KEY), _read(directory, SERVER_CERT))]
    if require_client_cert:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(directory, CA_CERT), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def channel_credentials(
    directory: str | os.PathLike[str], client: str | None = None
) -> grpc.ChannelCredentials:
    """Channel TLS credentials trusting ca.pem, presenting client-<client>.pem/.key when `client` is given."""
    ca = _read(directory, CA_CERT)
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    cert_name, key_name = client_cert_names(client)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=_read(directory, key_name),
        certificate_chain=_read(directory, cert_name),
    )


class AuthError(Exception):
    """A client token is malformed, forged or expired; `reason` says which and never contains the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    """Decode unpadded base64url, accepting only the canonical encoding (so no two strings decode alike)."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64e(data) != text:
        raise ValueError("non-canonical base64url")
    return data


class TokenAuthority:
    """Issues and verifies client tokens: base64url(expiry:client_id) "." base64url(HMAC-SHA256)."""

    def __init__(
        self, secret: bytes, ttl_seconds: float = 7 * 24 * 3600, clock: Callable[[], float] = time.time
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"token secret must be at least {MIN_SECRET_BYTES} bytes")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        self._secret = bytes(secret)
        self._ttl = ttl_seconds
        self._clock = clock

    def __repr__(self) -> str:
        return f"TokenAuthority(ttl_seconds={self._ttl})"

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, _TOKEN_DOMAIN + payload, hashlib.sha256).digest()

    def issue(self, client_id: str) -> str:
        """A URL-safe token naming client_id, valid for ttl_seconds from now."""
        if not client_id:
            raise ValueError("client_id must be a non-empty string")
        expiry = int(self._clock() + self._ttl)
        payload = f"{expiry}:{client_id}".encode()
        return f"{_b64e(payload)}.{_b64e(self._mac(payload))}"

    def verify(self, token: str) -> str:
        """The client_id in `token`; raises AuthError if it is malformed, forged or expired."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthError("malformed token")
        parts = token.split(".")
        if len(parts) != 2:
            raise AuthError("malformed token")
        try:
            payload, mac = _b64d(parts[0]), _b64d(parts[1])
        except (ValueError, binascii.Error):
            raise AuthError("malformed token") from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise AuthError("invalid token signature")
        expiry_text, sep, client_id = payload.decode("utf-8", errors="replace").partition(":")
        if not sep or not client_id or not expiry_text.isdigit():
            raise AuthError("malformed token")
        if self._clock() >= int(expiry_text):
            raise AuthError("token expired")
        return client_id

    @classmethod
    def load_or_create(
        cls, path: str | os.PathLike[str], *, ttl_seconds: float = 7 * 24 * 3600
    ) -> TokenAuthority:
        """An authority whose secret is read from `path`, created there (32 random bytes,
        mode 0o600) if absent.
        """
        file = Path(path)
        try:
            secret = file.read_bytes()
        except FileNotFoundError:
            file.parent.mkdir(parents=True, exist_ok=True)
            secret = os.urandom(SECRET_BYTES)
            write_file(file, secret, KEY_MODE)
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"token secret file {file} holds {len(secret)} bytes, expected {SECRET_BYTES}")
        return cls(secret, ttl_seconds=ttl_seconds)


def bearer(metadata: Sequence[tuple[str, str]] | None) -> str | None:
    """The token of the first "authorization: Bearer <token>" entry in gRPC invocation metadata, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    return None


def new_signing_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 key for signing a client's updates."""
    return ed25519.Ed25519PrivateKey.generate()


def public_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key, as sent at Join."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def update_digest(fields: Sequence[object], tensors: Mapping[str, Any]) -> bytes:
    """SHA-256 over an update's header fields and every tensor's name, bits,
    shape and bytes (names in order).

    A tensor's bytes enter as their BLAKE3 digest over payload || scales, the wire's checksum
    (`tensor_digest`): the sender hashes each tensor once for both, and the receiver reads the digests it
    verified on arrival.
    """
    digest = hashlib.sha256("\x1f".join(str(f) for f in fields).encode())
    for name in sorted(tensors):
        q = tensors[name]
        digest.update(f"\x1e{name}\x1f{q.bits}\x1f{tuple(q.shape)}\x1f".encode())
        digest.update(tensor_digest(q))
    return digest.digest()


def rejoin_message(client_id: str, proof_time: int) -> bytes:
    """What a member signs with its pinned key to rejoin without a valid token (see JoinRequest.proof)."""
    return b"fedmoe-rejoin/1\x00" + client_id.encode() + b"\x00" + str(int(proof_time)).encode()


def verify_signature(public_key: bytes, digest: bytes, signature: bytes) -> None:
    """Raise AuthError unless `signature` is the Ed25519 signature of `digest` by `public_key`."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, digest)
    except (InvalidSignature, ValueError):
        raise AuthError("invalid update signature") from None


def enrolment_token(state_dir: str | os.PathLike[str], certs: str | os.PathLike[str] | None = None) -> str:
    """The coordinator's enrolment token: $FEDMOE_ENROLMENT_TOKEN when set, else the one `fedmoe certs` made
    in the `certs` directory, else the one kept in <state_dir>/enrolment.token (made there when absent:
    32 random bytes in base64url, mode 0o600)."""
    given = given_enrolment(certs)
    if given:
        if len(given) < MIN_SECRET_BYTES:
            raise ValueError(f"an enrolment token has at least {MIN_SECRET_BYTES} characters")
        return given
    return _token_file(Path(state_dir) / ENROLMENT_FILE)


def given_enrolment(certs: str | os.PathLike[str] | None = None) -> str:
    """The enrolment token a client presents unless told one: $FEDMOE_ENROLMENT_TOKEN, else the
    enrolment.token of its `certs` directory, else ""."""
    given = os.environ.get(ENROLMENT_ENV, "").strip()
    if given or certs is None:
        return given
    try:
        return (Path(certs) / ENROLMENT_FILE).read_text(encoding="ascii").strip()
    except (FileNotFoundError, PermissionError):
        return ""


def _token_file(file: Path) -> str:
    """The token kept in `file`, made there when absent."""
    try:
        return file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        file.parent.mkdir(parents=True, exist_ok=True)
        token = _b64e(os.urandom(SECRET_BYTES))
        write_file(file, token.encode("ascii") + b"\n", KEY_MODE)
        return token
