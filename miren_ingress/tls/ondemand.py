"""Certificates on demand: the first TLS handshake for a name that routes obtains one (ACME).

**Who may get one.** Only a name the route table would serve *now* as a route host or a live
preview (`RouteTable.certifiable`): an exact route host, or `<label>.<host>` whose label has a
live preview. Never an unknown label, an expired preview, a name under a wildcard route without
a preview, or the default route's "any host": a stranger's handshake for `random.example.com`
makes no order. The refusal is immediate (no store call, no network).

**One order per name.** Concurrent handshakes for a new name share one issuance (a future per
name: the sentinel pattern again); a failed one blocks new orders for that name for
`acme.failure_backoff`, doubling up to an hour, and never blocks other names.

**Where it lives.** Certificates, keys and the ACME account are store entities
(`TlsCertificate`, `AcmeAccount`): a restart or another node loads them and serves the same
certificate (same serial) instead of ordering again. A background task renews a certificate once
`acme.renew_at` (2/3) of its lifetime has passed; the new one serves the handshakes that start
after it, the old one keeps serving until then, so a renewal never fails a handshake.

**The protocol** is the `acme` package's (RFC 8555), its blocking calls run in a worker thread.
The HTTP-01 challenge is answered by the proxy itself on the plain listener
(`/.well-known/acme-challenge/<token>`, `Engine.acme_answers`); TLS-ALPN-01 (RFC 8737), which
the `acme` package no longer builds, by the TLS listener: a handshake offering only the
`acme-tls/1` protocol gets a self-signed certificate carrying the key authorization's digest
(`challenge_context`), and nothing else is served on such a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from miren_ingress.tls.certs import Certificate, CertificateError, CertStore, server_context
from miren_ingress.tls.config import AcmeConfig
from miren_ingress.tls.metrics import TlsMetrics
from miren_store.entities import AcmeAccount, TlsCertificate
from miren_store.errors import Conflict, NotFound, StoreError
from miren_store.store import Store, put

log = logging.getLogger("miren.tls")

MAX_BACKOFF = 3600.0
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # id-pe-acmeIdentifier (RFC 8737)


class IssuanceFailed(Exception):
    """An order did not end with a certificate (the reason is the message)."""


@attrs.define
class _Backoff:
    until: float
    delay: float


class OnDemand:
    """Obtains, stores, serves and renews ACME certificates (see the module docstring)."""

    def __init__(  # noqa: PLR0917  (its collaborators, each of its own type)
        self,
        config: AcmeConfig,
        store: Store,
        certs: CertStore,
        certifiable: Callable[[str], bool],
        answers: dict[bytes, bytes],
        metrics: TlsMetrics,
    ) -> None:
        assert config.directory is not None
        self._config = config
        self._directory = config.directory
        self._store = store
        self._certs = certs
        self._certifiable = certifiable
        self._answers = answers
        self._metrics = metrics
        self._inflight: dict[str, asyncio.Future[ssl.SSLContext]] = {}
        self._alpn: dict[str, ssl.SSLContext] = {}  # name -> TLS-ALPN-01 answer (pending)
        self._backoff: dict[str, _Backoff] = {}
        self._account: tuple[Any, str] | None = None  # (josepy JWK, account uri)
        self._account_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Orders wait on the CA for up to acme.timeout: their own threads, so they never hold
        # the default executor others need (scrypt checks, log reads).
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="miren-acme")
        self._renewer: asyncio.Task[None] | None = None
        self.orders = 0  # orders placed (tests, metrics)

    async def start(self) -> None:
        """Load the stored certificates (a restart reuses them), then renew in the background."""
        for entity in await self._store.list(TlsCertificate):
            try:
                cert = Certificate.from_pem(
                    entity.chain_pem.encode(), entity.key_pem.encode(), "acme"
                )
                self._certs.add(cert)
                self._metrics.observe(cert)
            except CertificateError as exc:
                log.warning("stored certificate for %s is unusable: %s", entity.name, exc)
        self._renewer = asyncio.create_task(self._renew_loop(), name="miren-tls-renew")

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._renewer] if self._renewer else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- handshakes ------------------------------------------------------------------------------

    def challenge_context(self, name: str) -> ssl.SSLContext | None:
        """The TLS-ALPN-01 answer for `name` while its order waits for validation."""
        return self._alpn.get(name)

    async def context_for(self, name: str) -> ssl.SSLContext | None:
        """The context for a handshake naming `name`: a stored certificate, else one obtained
        now when the name may have one; None (refuse the handshake) otherwise."""
        found = self._certs.lookup(name)
        if found is not None:
            return found[1]
        if not self._certifiable(name):
            self._metrics.refused.inc()
            return None
        loop = asyncio.get_running_loop()
        fut = self._inflight.get(name)
        if fut is None:
            backoff = self._backoff.get(name)
            if backoff is not None and loop.time() < backoff.until:
                return None
            fut = loop.create_future()
            self._inflight[name] = fut
            task = loop.create_task(self._obtain(name, fut), name=f"miren-acme {name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(fut)
        except IssuanceFailed:
            return None

    async def _obtain(self, name: str, fut: asyncio.Future[ssl.SSLContext]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._issue(name)
        except Exception as exc:
            reason = _reason(exc)
            self._metrics.failed.labels(reason=reason).inc()
            log.warning("no certificate for %s: %s", name, exc)
            old = self._backoff.get(name)
            delay = self._config.failure_backoff if old is None else min(old.delay * 2, MAX_BACKOFF)
            self._backoff[name] = _Backoff(loop.time() + delay, delay)
            fut.set_exception(IssuanceFailed(reason))
            fut.exception()  # (retrieved: every waiter may have gone)
        else:
            self._backoff.pop(name, None)
            found = self._certs.lookup(name)
            assert found is not None
            fut.set_result(found[1])
        finally:
            del self._inflight[name]

    async def _issue(self, name: str) -> Certificate:
        """Order a certificate for `name`, store it, serve it."""
        t0 = asyncio.get_running_loop().time()
        async with asyncio.timeout(self._config.timeout):
            key, uri = await self._ensure_account()
            self.orders += 1
            loop = asyncio.get_running_loop()
            chain_pem, key_pem = await loop.run_in_executor(
                self._threads, self._order, key, uri, name
            )
        cert = Certificate.from_pem(chain_pem, key_pem, "acme")
        await self._save(name, cert)
        self._certs.add(cert)
        self._metrics.observe(cert)
        self._metrics.issued.inc()
        self._metrics.issue_seconds.observe(asyncio.get_running_loop().time() - t0)
        log.info("certificate for %s issued (serial %x, until %s)", name, cert.serial,
                 cert.not_after.isoformat())  # fmt: skip
        return cert

    # -- the account -----------------------------------------------------------------------------

    async def _ensure_account(self) -> tuple[Any, str]:
        async with self._account_lock:
            if self._account is None:
                self._account = await self._load_or_register()
            return self._account

    async def _load_or_register(self) -> tuple[Any, str]:
        from josepy.jwk import JWKRSA

        account_id = hashlib.sha256(self._directory.encode()).hexdigest()[:32]
        try:
            stored = await self._store.get(AcmeAccount, account_id)
        except NotFound:
            stored = None
        if stored is not None and stored.uri:
            key = JWKRSA.load(stored.key_pem.encode())
            return key, stored.uri
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key = JWKRSA(key=private)
        uri = await asyncio.get_running_loop().run_in_executor(self._threads, self._register, key)
        entity = AcmeAccount(
            id=account_id, directory=self._directory, key_pem=key_pem.decode(), uri=uri
        )
        try:
            await self._store.create(entity)
        except Conflict:  # another node registered first: use its account
            stored = await self._store.get(AcmeAccount, account_id)
            return JWKRSA.load(stored.key_pem.encode()), stored.uri
        return key, uri

    def _client(self, key: Any, uri: str | None) -> Any:
        from acme import client, messages

        # requests takes a CA file where acme's annotation says bool (it passes it through).
        verify: Any = self._config.ca_bundle or True
        net = client.ClientNetwork(key, user_agent="miren-edge", verify_ssl=verify)
        if uri:
            net.account = messages.RegistrationResource(body=messages.Registration(), uri=uri)
        directory = client.ClientV2.get_directory(self._directory, net)
        return client.ClientV2(directory, net)

    def _register(self, key: Any) -> str:
        """(worker thread) A new account; its URI."""
        from acme import messages

        acme = self._client(key, None)
        if self._config.email:
            new = messages.NewRegistration.from_data(
                email=self._config.email, terms_of_service_agreed=True
            )
        else:
            new = messages.NewRegistration.from_data(terms_of_service_agreed=True)
        regr = acme.new_account(new)
        return str(regr.uri)

    # -- an order --------------------------------------------------------------------------------

    def _order(self, key: Any, uri: str, name: str) -> tuple[bytes, bytes]:
        """(worker thread) Order, answer HTTP-01, finalize: (chain PEM, key PEM)."""
        from acme import crypto_util

        acme = self._client(key, uri)
        private = ec.generate_private_key(ec.SECP256R1())
        key_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = acme.new_order(crypto_util.make_csr(key_pem, [name]))
        published: list[bytes] = []
        kind = self._config.challenge
        try:
            for authz in order.authorizations:
                challenge = next(
                    (c for c in authz.body.challenges if _challenge_type(c.chall) == kind), None
                )
                if challenge is None:
                    raise IssuanceFailed(f"the ACME server offers no {kind} challenge")
                if kind == "http-01":
                    response, validation = challenge.response_and_validation(acme.net.key)
                    token = challenge.chall.encode("token").encode()
                    self._answers[token] = validation.encode()  # (a dict store: atomic)
                    published.append(token)
                else:
                    token_text = challenge.chall.jobj["token"]
                    self._alpn[name] = alpn_challenge_context(
                        name, key_authorization(token_text, acme.net.key)
                    )
                    response = _TlsAlpnResponse()
                acme.answer_challenge(challenge, response)
            deadline = datetime.now() + timedelta(seconds=self._config.timeout)
            done = acme.poll_and_finalize(order, deadline=deadline)
        finally:
            for token in published:
                self._answers.pop(token, None)
            self._alpn.pop(name, None)
        return done.fullchain_pem.encode(), key_pem

    async def _save(self, name: str, cert: Certificate) -> None:
        entity = TlsCertificate(
            name=name,
            chain_pem=cert.chain_pem.decode(),
            key_pem=cert.key_pem.decode(),
            not_after=cert.not_after,
            serial=f"{cert.serial:x}",
        )
        try:
            await put(self._store, entity)
        except Conflict:
            raise StoreError(f"could not store the certificate for {name}") from None

    # -- renewal ---------------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.check_interval)
            await self.renew_due()

    async def renew_due(self) -> int:
        """Renew every ACME certificate past `renew_at` of its lifetime; returns how many."""
        now = datetime.now(UTC)
        renewed = 0
        for cert in self._certs.certificates():
            self._metrics.observe(cert, now)
            if cert.source != "acme" or cert.lifetime_used(now) < self._config.renew_at:
                continue
            name = cert.names[0]
            if name in self._inflight:
                continue
            try:
                await self._issue(name)
                renewed += 1
                self._metrics.renewed.inc()
            except Exception as exc:
                self._metrics.failed.labels(reason=_reason(exc)).inc()
                log.warning("renewal of %s failed (the current one serves on): %s", name, exc)
        return renewed


def _challenge_type(chall: Any) -> str:
    """A challenge's type, also for one the `acme` package does not model (tls-alpn-01)."""
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type"))
    return str(chall.typ)


class _TlsAlpnResponse(challenges.ChallengeResponse):
    """The (empty) answer that tells the CA to check TLS-ALPN-01 now."""

    typ = "tls-alpn-01"

    def __bool__(self) -> bool:
        # The package sends an empty (falsy) object as an empty payload, a POST-as-GET that
        # starts nothing; the answer must be the JSON `{}` (RFC 8555 §7.5.1).
        return True


def key_authorization(token: str, account_key: Any) -> str:
    """RFC 8555 §8.1: `token.base64url(SHA-256 JWK thumbprint of the account key)`."""
    from josepy import b64

    thumbprint = account_key.thumbprint(hash_function=hashes.SHA256)
    return f"{token}.{b64.b64encode(thumbprint).decode()}"


def alpn_challenge_context(name: str, authorization: str) -> ssl.SSLContext:
    """RFC 8737 §3: a self-signed certificate for `name` with the critical acmeIdentifier
    extension holding SHA-256(key authorization), served only with ALPN `acme-tls/1`."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(authorization.encode()).digest()
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            # The DER of an OCTET STRING of 32 bytes: tag 4, length 32, the digest.
            x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    certificate = Certificate(
        chain_pem=chain, key_pem=private, names=(name,), not_before=now, not_after=now,
        serial=cert.serial_number, source="tls-alpn-01",
    )  # fmt: skip
    return server_context(certificate, alpn=["acme-tls/1"])


def _reason(exc: BaseException) -> str:
    """A short label for a failure (metrics)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, StoreError):
        return "store"
    module = type(exc).__module__
    if module.startswith("acme") or isinstance(exc, IssuanceFailed):
        return "acme"
    if module.startswith("requests") or isinstance(exc, OSError):
        return "network"
    return "other"
