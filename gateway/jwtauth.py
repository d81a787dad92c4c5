"""JWT verification for callers: signature, algorithm allow-list, claims, and JWKS key sets.

The algorithm always comes from the configuration, never from the token: the token's header is
read (unverified) only for `alg`, to reject a disallowed algorithm early, and for `kid`, to pick
the key. Key sets published at `jwks_url` are fetched with the application's aiohttp session at
start, refreshed in a background task, and refreshed early (at most once per
`jwks_min_refresh_s`) when a token names an unknown `kid`, so that forged tokens cannot hammer
the identity provider. Time claims are checked against the injected clock, and a token whose
lifetime (`exp - iat`) exceeds `max_lifetime_s` is refused whoever signed it: a leaked token
must not stay usable for years.

Every failure is a `JwtError` with a short fixed message that is safe to show the caller.
"""

from __future__ import annotations

import asyncio
import re
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import aiohttp
import jwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.warnings import InsecureKeyLengthWarning, RemovedInPyjwt3Warning

from gateway.logs import get_logger
from gateway.tasks import Tasks

if TYPE_CHECKING:
    from jwt.types import Options

    from gateway.config.schema import JwtConfig

_log = get_logger("gateway.jwtauth")

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

# A real JWKS document is a few KiB; this bounds what a misbehaving endpoint can make us buffer.
MAX_JWKS_BYTES = 1024 * 1024
MAX_CALLER_CHARS = 256
MAX_TIER_CHARS = 128
# 9999-12-31T23:59:59Z. A time claim beyond it (or before 1970) is not a date but garbage, and
# huge values (1e300, 10**400) would otherwise reach float arithmetic.
MAX_TIMESTAMP = 253_402_300_799
# PyJWT warns (and NIST SP 800-131A disallows) below this; such keys are refused outright.
MIN_RSA_BITS = 2048

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# Claims PyJWT knows; a caller claim among them can go in PyJWT's own `require` list.
_REGISTERED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})
_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")

_REFRESH_TASK_NAME = "jwtauth.jwks-refresh"
_FETCH_TASK_NAME = "jwtauth.jwks-fetch"


class JwtError(Exception):
    """Verification failed. str(exc) is safe to show a caller (never echoes the token or key
    material): it is one of a fixed set of short messages, at most naming a claim."""


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    """Who a verified token speaks for."""

    caller_id: str  # the caller_claim: a non-empty printable string, <= 256 chars
    tier: str | None  # the tier_claim if configured and present (<= 128 chars), else None


def looks_like_jwt(token: str) -> bool:
    """True when `token` has the shape of a compact JWS (three base64url segments separated by
    dots, the first a JSON object, i.e. starting with "eyJ"). A cheap routing check between JWT
    and API-key authentication; it proves nothing about the token."""
    return _JWT_SHAPE.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class _Key:
    """A verification key and the configured algorithms it may verify."""

    key: PublicKey | bytes
    algorithms: frozenset[str]
    kid: str | None


@dataclass(frozen=True, slots=True)
class _KeySet:
    """An immutable snapshot of the usable keys of a JWKS document (swapped whole)."""

    keys: tuple[_Key, ...] = ()

    def by_kid(self, kid: str) -> list[_Key]:
        return [k for k in self.keys if k.kid == kid]


class _JwksError(Exception):
    """A JWKS fetch or document failed (logged, never shown to a caller)."""


class JwtVerifier:
    """Verifies caller JWTs against one `JwtConfig`.

    Lifecycle: construct (reads a PEM key file at once), `await start(session)` once the
    application's client session exists, `verify()` per request, `await close()` at shutdown.
    """

    def __init__(self, config: JwtConfig, *, clock: Callable[[], float] = time.time) -> None:
        """Compile the configuration. Reads `public_key_file` now and raises ValueError with a
        clear message if it is unreadable, not a PEM public key, a key too weak to trust, or a
        key type that none of the configured algorithms use."""
        self._config = config
        self._clock = clock
        self._allowed = frozenset(config.algorithms)
        self._algorithm_list = list(config.algorithms)
        self._require = ["exp", "iat", "iss", "aud"]
        if config.caller_claim in _REGISTERED_CLAIMS and config.caller_claim not in self._require:
            self._require.append(config.caller_claim)
        self._static_key: _Key | None = None
        if config.public_key_file is not None:
            self._static_key = _load_pem_key(config.public_key_file, self._allowed)
        elif config.secret is not None:
            self._static_key = _Key(
                config.secret.get_secret_value().encode("utf-8"), self._allowed, None
            )
        self._keyset = _KeySet()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._tasks = Tasks("jwtauth")
        self._fetch_task: asyncio.Task[None] | None = None
        self._last_fetch_at: float | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        """With `jwks_url`: fetch the key set once, then refresh it every `jwks_refresh_s` in a
        background task named "jwtauth.jwks-refresh". A failed fetch is logged, not raised (the
        gateway must start while the identity provider is down); start() takes at most about
        `jwks_timeout_s`. No-op for a PEM key or a shared secret. Raises RuntimeError if called
        twice or after close()."""
        if self._config.jwks_url is None:
            return
        if self._session is not None or self._closed:
            raise RuntimeError("JwtVerifier.start() called twice or after close()")
        self._session = session
        await self._begin_fetch()
        self._spawn(self._refresh_loop(), _REFRESH_TASK_NAME)

    async def close(self) -> None:
        """Cancel the refresh task and any in-flight fetch, and wait until they have ended.
        Idempotent. Requests waiting on a cancelled fetch fail with "unknown signing key";
        afterwards unknown `kid`s no longer trigger fetches (known keys still verify)."""
        self._closed = True
        await self._tasks.cancel()
        self._fetch_task = None

    async def verify(self, token: str) -> JwtIdentity:
        """The identity a valid token speaks for. Raises JwtError (message safe for callers).

        Order: size bound (before any parsing), header `alg` against the allow-list, key
        lookup (may await one rate-limited JWKS refresh), signature, iss/aud, then the time
        claims (well-formed, lifetime within `max_lifetime_s`, valid now) and the identity."""
        if len(token) > self._config.max_token_bytes:
            raise JwtError("token too large")
        if not token.isascii():  # so that characters == bytes below
            raise JwtError("malformed token")
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise JwtError("algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtError("malformed token")
        key = self._static_key
        if key is None:
            key = await self._jwks_key(kid, alg)
        if alg not in key.algorithms:
            raise JwtError("algorithm does not match the signing key")
        claims = self._decode(token, key)
        self._check_times(claims)
        return self._identity(claims)

    # -- claims -------------------------------------------------------------------------------

    def _decode(self, token: str, key: _Key) -> dict[str, Any]:
        # PyJWT checks signature, iss, aud and presence; exp/nbf/iat are checked in _identity
        # against the injected clock (PyJWT would read the wall clock and accept NaN/Infinity
        # and numeric strings).
        options: Options = {
            "require": self._require,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        try:
            with _quiet_pyjwt():
                return jwt.decode(
                    token,
                    key.key,
                    algorithms=self._algorithm_list,
                    audience=self._config.audience,
                    issuer=self._config.issuer,
                    leeway=self._config.leeway_s,
                    options=options,
                )
        except jwt.PyJWTError as exc:
            raise JwtError(_message_for(exc)) from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            # A malformed token reaching cryptography or json beyond what PyJWT maps.
            raise JwtError("malformed token") from None

    def _check_times(self, claims: dict[str, Any]) -> None:
        """Raise JwtError unless exp, iat (and nbf, if present) are plain numbers between 1970
        and 9999, the lifetime `exp - iat` is at most `max_lifetime_s`, and the token is valid
        at the injected clock's now (within `leeway_s`)."""
        exp = _numeric_claim(claims, "exp")
        iat = _numeric_claim(claims, "iat")
        nbf = _numeric_claim(claims, "nbf") if claims.get("nbf") is not None else None
        # The leeway absorbs clock skew at the moment of use; it does not lengthen a lifetime.
        # A negative lifetime is not refused here: such a token is expired or not yet issued,
        # and within the leeway both ends may cross.
        if exp - iat > self._config.max_lifetime_s:
            raise JwtError("token lifetime exceeds the allowed maximum")
        now = self._clock()
        leeway = self._config.leeway_s
        if exp <= now - leeway:
            raise JwtError("token expired")
        if iat > now + leeway:
            raise JwtError("token issued in the future")
        if nbf is not None and nbf > now + leeway:
            raise JwtError("token not yet valid")

    def _identity(self, claims: dict[str, Any]) -> JwtIdentity:
        caller_claim = self._config.caller_claim
        caller = claims.get(caller_claim)
        if caller is None:
            raise JwtError(f"missing claim {caller_claim}")
        if not _is_label(caller, MAX_CALLER_CHARS):
            raise JwtError(f"invalid claim {caller_claim}")
        tier: str | None = None
        tier_claim = self._config.tier_claim
        if tier_claim is not None:
            value = claims.get(tier_claim)
            if value is not None:
                if not _is_label(value, MAX_TIER_CHARS):
                    raise JwtError(f"invalid claim {tier_claim}")
                tier = value
        return JwtIdentity(caller_id=caller, tier=tier)

    # -- JWKS ---------------------------------------------------------------------------------

    async def _jwks_key(self, kid: str | None, alg: str) -> _Key:
        key = self._lookup(kid, alg)
        if key is None:
            await self._refresh_after_miss()
            key = self._lookup(kid, alg)
        if key is None:
            raise JwtError("unknown signing key")
        return key

    def _lookup(self, kid: str | None, alg: str) -> _Key | None:
        """The key for `kid` (None = no such key: a refresh may help). A token without kid
        uses the only key of the set; with several keys it raises JwtError. Among keys
        sharing a kid, one that fits `alg` wins."""
        keys = self._keyset.keys
        if kid is None:
            if len(keys) > 1:
                raise JwtError("token has no key id")
            return keys[0] if keys else None
        matches = self._keyset.by_kid(kid)
        fitting = [k for k in matches if alg in k.algorithms]
        if fitting:
            return fitting[0]
        return matches[0] if matches else None

    async def _refresh_after_miss(self) -> None:
        """Refresh the key set for an unknown kid: joins a fetch already in flight, otherwise
        starts one unless the last fetch began less than `jwks_min_refresh_s` ago."""
        task = self._fetch_task
        if task is None or task.done():
            if self._session is None or self._closed:
                return
            last = self._last_fetch_at
            elapsed = None if last is None else self._clock() - last
            # A clock that went backwards (elapsed < 0) does not block refreshes.
            if elapsed is not None and 0 <= elapsed < self._config.jwks_min_refresh_s:
                return
            task = self._begin_fetch()
        # The fetch is shared. asyncio.wait (unlike awaiting the task) neither cancels it when
        # this request is cancelled nor raises here when close() cancels it.
        await asyncio.wait((task,))

    def _begin_fetch(self) -> asyncio.Task[None]:
        self._last_fetch_at = self._clock()
        task = self._spawn(self._fetch_and_install(), _FETCH_TASK_NAME)
        self._fetch_task = task
        return task

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.jwks_refresh_s)
            task = self._fetch_task
            if task is None or task.done():
                task = self._begin_fetch()
            await asyncio.wait((task,))

    async def _fetch_and_install(self) -> None:
        """Fetch and install the key set; never raises except CancelledError. A failed fetch,
        or a document without a usable key, keeps the previous set."""
        url = self._config.jwks_url
        try:
            keyset = _parse_jwks(await self._fetch(), self._allowed)
        except Exception as exc:
            _log.warning("jwks_fetch_failed", url=url, error=_describe(exc))
            return
        if not keyset.keys:
            _log.warning("jwks_no_usable_keys", url=url, allowed=sorted(self._allowed))
            return
        self._keyset = keyset
        _log.info("jwks_refreshed", url=url, kids=[k.kid for k in keyset.keys])

    async def _fetch(self) -> Any:
        session, url = self._session, self._config.jwks_url
        assert session is not None
        assert url is not None
        async with (
            asyncio.timeout(self._config.jwks_timeout_s),
            session.get(url, headers={"Accept": "application/json"}) as resp,
        ):
            if resp.status != 200:
                raise _JwksError(f"HTTP status {resp.status}")
            if resp.content_length is not None and resp.content_length > MAX_JWKS_BYTES:
                raise _JwksError("JWKS document too large")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _JwksError("JWKS document too large")
        return orjson.loads(body)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a named background task (close() cancels what is still running)."""
        return self._tasks.spawn(coro, name)


# -- helpers ----------------------------------------------------------------------------------


@contextmanager
def _quiet_pyjwt() -> Iterator[None]:
    # filterwarnings=error in tests, and a warning per request in production, are both wrong:
    # e.g. an HS512 secret shorter than 64 bytes (the config requires >= 32) makes PyJWT warn.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        warnings.simplefilter("ignore", RemovedInPyjwt3Warning)
        yield


def _unverified_header(token: str) -> dict[str, Any]:
    try:
        with _quiet_pyjwt():
            return jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise JwtError("malformed token") from None
    except (ValueError, TypeError, RecursionError):
        raise JwtError("malformed token") from None


def _message_for(exc: jwt.PyJWTError) -> str:
    """A fixed, caller-safe message for a PyJWT exception (PyJWT's own texts may quote data)."""
    match exc:
        case jwt.MissingRequiredClaimError():
            # The name comes from our own `require` list (or is "aud").
            return f"missing claim {exc.claim}"
        case jwt.ExpiredSignatureError():
            return "token expired"
        case jwt.ImmatureSignatureError():
            return "token not yet valid"
        case jwt.InvalidAudienceError():
            return "invalid audience"
        case jwt.InvalidIssuerError():
            return "invalid issuer"
        case jwt.InvalidSignatureError():
            return "invalid signature"
        case jwt.InvalidAlgorithmError():
            return "algorithm not allowed"
        case jwt.InvalidIssuedAtError():
            return "invalid claim iat"
        case InvalidSubjectError():
            return "invalid claim sub"
        case InvalidJTIError():
            return "invalid claim jti"
        case jwt.InvalidKeyError():
            return "invalid signature"
        case jwt.DecodeError():
            return "malformed token"
        case _:
            return "invalid token"


def _numeric_claim(claims: dict[str, Any], name: str) -> float:
    """The NumericDate claim `name`. Raises JwtError "missing claim <name>" when absent and
    "invalid claim <name>" for a bool, a string, NaN, an infinity, or a value outside
    0..MAX_TIMESTAMP."""
    value = claims.get(name)
    if value is None:
        raise JwtError(f"missing claim {name}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtError(f"invalid claim {name}")
    # Also false for NaN and the infinities; and an int is compared exactly, so 10**400 never
    # reaches float arithmetic (OverflowError).
    if not 0 <= value <= MAX_TIMESTAMP:
        raise JwtError(f"invalid claim {name}")
    return value


def _is_label(value: object, max_chars: int) -> bool:
    # Caller ids and tiers end up in logs and limit keys: printable text only.
    return isinstance(value, str) and 0 < len(value) <= max_chars and value.isprintable()


def _algorithms_for(key: PublicKey) -> frozenset[str]:
    """Every algorithm (configured or not) that can verify with `key`."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALG_BY_CURVE.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    return frozenset({"EdDSA"})


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    return type(key).__name__


def _load_pem_key(path: str, allowed: frozenset[str]) -> _Key:
    where = f"jwt.public_key_file {path!r}"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(
            f"{where} is not a PEM public key ('-----BEGIN PUBLIC KEY-----'; for a "
            "certificate, extract its key with 'openssl x509 -pubkey -noout')"
        ) from exc
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise ValueError(f"{where} holds a {_kind(key)} key, which JWTs do not use")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{where} holds a {key.key_size}-bit RSA key (at least 2048 needed)")
    algorithms = _algorithms_for(key) & allowed
    if not algorithms:
        raise ValueError(
            f"{where} holds a {_kind(key)} key, but none of the configured algorithms "
            f"({', '.join(sorted(allowed))}) can use it"
        )
    return _Key(key, algorithms, None)


def _parse_jwks(document: Any, allowed: frozenset[str]) -> _KeySet:
    """The usable keys of a JWKS document. Keys are parsed one by one with PyJWT and skipped
    (not fatal) when PyJWT cannot use them, when they are not signature keys, not public keys,
    too weak, or when no allowed algorithm fits them (their own `alg`, if stated, must be
    allowed). Raises _JwksError if the document is not a JWK set at all."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _JwksError("not a JWK set")
    keys: list[_Key] = []
    for raw in document["keys"]:
        if not isinstance(raw, dict):
            continue
        kid = raw.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        if raw.get("use", "sig") != "sig":
            continue
        stated = raw.get("alg")
        if stated is not None and stated not in allowed:
            continue
        try:
            # One key at a time (what PyJWKSet does inside), so that a single odd key cannot
            # fail the whole set and so that its raw `alg`/`use` stay visible.
            parsed = jwt.PyJWK.from_dict(raw)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            _log.debug("jwks_key_skipped", kid=kid, reason="unusable")
            continue
        key = parsed.key
        if not isinstance(
            key,
            rsa.RSAPublicKey
            | ec.EllipticCurvePublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ):
            # Symmetric ("oct") or private keys have no place in a public key set.
            _log.debug("jwks_key_skipped", kid=kid, reason="not a public key")
            continue
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            _log.debug("jwks_key_skipped", kid=kid, reason="RSA key too short")
            continue
        algorithms = _algorithms_for(key) & allowed
        if stated is not None:
            algorithms &= {stated}
        if not algorithms:
            continue
        keys.append(_Key(key, algorithms, kid))
    return _KeySet(tuple(keys))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name
