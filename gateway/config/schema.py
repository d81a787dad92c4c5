"""The YAML schema: typed, frozen, and strict (an unknown key is an error).

Only what the gateway implements is accepted: a key that parsed but did nothing would be a lie
told to the operator. Values are validated here; cross-references (a deployment naming an
unknown provider, mixed wire APIs in one model) are checked in `build_runtime`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+\*?$")
# Header names the gateway owns: forwarding a caller's value for one of these would let a caller
# pick the upstream credential or break framing.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "x-api-key",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "content-type",
        "accept-encoding",
        # hop-by-hop and credential-like headers
        "te",
        "trailer",
        "upgrade",
        "keep-alive",
        "expect",
        "proxy-authorization",
        "proxy-connection",
        "cookie",
    }
)

Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    # >1: that many processes share the port (SO_REUSEPORT), one event loop per core.
    workers: int = Field(1, ge=1, le=256)
    # Listen backlog: aiohttp's default of 128 drops connections when hundreds of clients
    # connect at once (each drop costs the client a 1 s SYN retransmit).
    backlog: int = Field(1024, ge=16, le=65535)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # Non-stream upstream bodies are buffered (to pass status and body intact); bound them.
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    drain_timeout_s: float = Field(30, ge=0, le=3600)
    # An SSE comment sent to the client after this much upstream silence, so that idle
    # proxies do not cut a stream while a model thinks (0 = off). Only at event boundaries.
    keepalive_comment_s: float = Field(15, ge=0, le=3600)
    # Upstream connection pool size: the peak number of concurrent upstream calls.
    max_upstream_connections: int = Field(1024, ge=1, le=100_000)
    # A request's whole body must arrive within this (408 after it, connection closed).
    body_timeout_s: float = Field(30, gt=0, le=3600)
    # An idle keep-alive connection is closed after this, and a request's headers must
    # arrive within it (from the connection's start or the previous response).
    keepalive_timeout_s: float = Field(75, gt=0, le=3600)
    # Bounds on what one body costs to parse: JSON objects + arrays, and nesting depth.
    # (Scalars are bounded relative to the body's size; see README "Request bodies".)
    max_json_containers: int = Field(100_000, ge=16, le=10_000_000)
    max_json_depth: int = Field(128, ge=8, le=200)
    # Request-body bytes held by all requests being read at once; past it, readers wait
    # (within body_timeout_s) for others to finish.
    max_body_bytes_in_flight: int = Field(512 * 1024 * 1024, ge=1024 * 1024, le=64 * 1024**3)
    # Reload when the file on disk changes (checked every watch_interval_s), as on SIGHUP.
    watch_config: bool = False
    watch_interval_s: float = Field(2, ge=0.1, le=3600)

    @model_validator(mode="after")
    def _budget_fits_one_body(self) -> ServerConfig:
        if self.max_body_bytes_in_flight < self.max_request_bytes:
            raise ValueError("max_body_bytes_in_flight must be >= max_request_bytes")
        return self


class ApiKeyConfig(_Strict):
    id: Identifier
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
    models: tuple[str, ...] | None = None  # None = every model (within the tier's list)
    tier: Identifier | None = None  # None = `auth.default_tier`

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


_SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class JwtConfig(_Strict):
    """Callers with JWTs. Algorithms come from here, never from the token."""

    issuer: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    audience: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    algorithms: tuple[str, ...] = Field(min_length=1)
    jwks_url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$")] | None = None
    public_key_file: str | None = None
    secret: SecretStr | None = None
    caller_claim: str = "sub"
    tier_claim: str | None = "tier"
    leeway_s: float = Field(30, ge=0, le=600)
    max_token_bytes: int = Field(8192, ge=256, le=65536)
    jwks_refresh_s: float = Field(300, ge=10, le=86400)
    # An unknown kid triggers a JWKS refresh at most this often (forged tokens cannot hammer it).
    jwks_min_refresh_s: float = Field(30, ge=1, le=3600)
    jwks_timeout_s: float = Field(5, gt=0, le=60)
    # Tokens whose lifetime (exp - iat) is longer are refused, whatever their signature.
    max_lifetime_s: float = Field(86400, gt=0, le=366 * 86400)

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtConfig:
        sources = [
            name
            for name, value in (
                ("jwks_url", self.jwks_url),
                ("public_key_file", self.public_key_file),
                ("secret", self.secret),
            )
            if value is not None
        ]
        if len(sources) != 1:
            raise ValueError("set exactly one of jwks_url, public_key_file, secret")
        algs = set(self.algorithms)
        unknown = algs - _SYMMETRIC - _ASYMMETRIC
        if unknown:
            raise ValueError(f"unsupported algorithm(s) {', '.join(sorted(unknown))}")
        # Mixing would open key confusion (an HS256 token "signed" with the public key).
        if self.secret is not None and not algs <= _SYMMETRIC:
            raise ValueError("a shared secret goes with HS256/HS384/HS512 only")
        if self.secret is None and not algs <= _ASYMMETRIC:
            raise ValueError("jwks_url / public_key_file go with asymmetric algorithms only")
        if self.secret is not None and len(self.secret.get_secret_value()) < 32:
            raise ValueError("the JWT secret must be at least 32 bytes")
        return self


class AuthConfig(_Strict):
    api_keys: tuple[ApiKeyConfig, ...] = ()
    jwt: JwtConfig | None = None
    # Tier of callers whose key or token names none (None = unlimited).
    default_tier: Identifier | None = None

    @model_validator(mode="after")
    def _unique(self) -> AuthConfig:
        seen_ids: set[str] = set()
        seen_digests: set[str] = set()
        for key in self.api_keys:
            if key.id in seen_ids:
                raise ValueError(f"duplicate api key id {key.id!r}")
            if key.sha256 in seen_digests:
                raise ValueError(f"api key {key.id!r} repeats the sha256 of another key")
            seen_ids.add(key.id)
            seen_digests.add(key.sha256)
        return self


class UpstreamKeyConfig(_Strict):
    id: Identifier
    secret: SecretStr
    weight: int = Field(1, ge=1, le=1000)

    @field_validator("secret")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("the secret is empty (is its environment variable set?)")
        return value


class ProviderLimits(_Strict):
    requests_per_minute: int | None = Field(None, ge=1, le=10_000_000)
    tokens_per_minute: int | None = Field(None, ge=1, le=10_000_000_000)


class ProviderConfig(_Strict):
    api: Literal["openai", "anthropic"]
    base_url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$")]
    keys: tuple[UpstreamKeyConfig, ...] = Field(min_length=1)
    key_strategy: Literal["least_in_flight", "weighted_round_robin"] = "least_in_flight"
    max_concurrent_per_key: int | None = Field(None, ge=1, le=1_000_000)
    # Caller request headers passed on upstream (exact names or a trailing-* prefix).
    forward_headers: tuple[str, ...] = ()
    # Fixed headers added to every upstream request (e.g. OpenAI-Organization).
    headers: dict[str, str] = Field(default_factory=dict)
    # Which field carries the output cap on Chat Completions when the gateway fills it in.
    chat_max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    # Sent when the caller sends no anthropic-version (Anthropic API only).
    anthropic_version: str = "2023-06-01"
    # Key health. A 429 without reset information cools its key down this long.
    cooldown_s: float = Field(10, gt=0, le=3600)
    # 401/402/403 and quota errors take a key out of rotation this long, then one request
    # re-probes it; each failed re-probe doubles the time, up to max_disable_s.
    disable_s: float = Field(300, gt=0, le=86400)
    max_disable_s: float = Field(3600, gt=0, le=7 * 86400)
    # Consecutive 429s without retry-after on one key that mean a spend cap, not a rate limit.
    spend_cap_429s: int = Field(3, ge=1, le=100)
    # The provider's own budget (e.g. an organisation's quota), shared by every caller and,
    # with Redis, by every instance. Over it, a model falls back to its next deployment.
    limits: ProviderLimits | None = None

    @field_validator("forward_headers")
    @classmethod
    def _header_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for name in value:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a header name (or a name prefix ending in *)")
            lowered = name.lower()
            if lowered.rstrip("*") in _RESERVED_HEADERS or (
                lowered.endswith("*") and any(r.startswith(lowered[:-1]) for r in _RESERVED_HEADERS)
            ):
                raise ValueError(f"{name!r} would forward a header the gateway owns")
            out.append(lowered)
        return tuple(out)

    @field_validator("headers")
    @classmethod
    def _static_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _HEADER_NAME.match(name) or name.endswith("*"):
                raise ValueError(f"{name!r} is not a header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by the gateway itself")
        return {k.lower(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _unique_keys(self) -> ProviderConfig:
        ids = [k.id for k in self.keys]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate key id(s) {', '.join(dupes)}")
        return self


class TimeoutsConfig(_Strict):
    connect_s: float = Field(5, gt=0, le=600)
    first_byte_s: float = Field(30, gt=0, le=3600)
    chunk_s: float = Field(30, gt=0, le=3600)
    total_s: float = Field(900, gt=0, le=86400)


class TimeoutsOverride(_Strict):
    connect_s: float | None = Field(None, gt=0, le=600)
    first_byte_s: float | None = Field(None, gt=0, le=3600)
    chunk_s: float | None = Field(None, gt=0, le=3600)
    total_s: float | None = Field(None, gt=0, le=86400)


class RetryConfig(_Strict):
    # Attempts in all (the first included), across keys and deployments, before the first
    # byte reaches the client. After it nothing is retried.
    max_attempts: int = Field(3, ge=1, le=20)
    base_delay_ms: float = Field(200, ge=0, le=60_000)
    max_delay_ms: float = Field(8000, ge=0, le=600_000)
    # Honour an upstream's retry-after up to this; a longer wait fails over instead.
    max_retry_after_s: float = Field(60, ge=0, le=3600)
    # No new attempt starts (and no backoff sleeps) past this time since the request began.
    deadline_s: float = Field(120, gt=0, le=86400)

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.max_delay_ms < self.base_delay_ms:
            raise ValueError("max_delay_ms must be >= base_delay_ms")
        return self


class RetryOverride(_Strict):
    max_attempts: int | None = Field(None, ge=1, le=20)
    base_delay_ms: float | None = Field(None, ge=0, le=60_000)
    max_delay_ms: float | None = Field(None, ge=0, le=600_000)
    max_retry_after_s: float | None = Field(None, ge=0, le=3600)
    deadline_s: float | None = Field(None, gt=0, le=86400)


class QueueConfig(_Strict):
    """Requests wait (in priority order) for shared upstream capacity instead of failing."""

    max_wait_s: float = Field(0, ge=0, le=3600)  # 0 = no queue
    max_length: int = Field(1000, ge=1, le=1_000_000)  # waiting requests; beyond: 503 at once


class HedgeConfig(_Strict):
    """A second attempt in parallel when the first has no valid first event in time."""

    after_ms: float | Literal["p95"] = 400  # p95: the route's observed time to first event
    max_hedges: int = Field(1, ge=1, le=3)

    @field_validator("after_ms")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not 1 <= value <= 600_000:
            raise ValueError("must be 1 to 600000 (ms) or p95")
        return value


class PolicyConfig(_Strict):
    timeouts: TimeoutsConfig = TimeoutsConfig()
    retry: RetryConfig = RetryConfig()
    max_tokens_cap: int | None = Field(None, ge=1, le=10_000_000)
    queue: QueueConfig = QueueConfig()
    hedge: HedgeConfig | None = None  # every model's, unless it has its own


class PolicyOverride(_Strict):
    """A model's own policy: every field left out inherits the global `policy`."""

    timeouts: TimeoutsOverride = TimeoutsOverride()
    retry: RetryOverride = RetryOverride()
    max_tokens_cap: int | None = Field(None, ge=1, le=10_000_000)
    hedge: HedgeConfig | None = None


class PricingConfig(_Strict):
    """What a deployment's tokens cost, in one currency (the one the cost budgets use)."""

    input_per_mtok: float = Field(ge=0, le=100_000)  # per million prompt tokens
    output_per_mtok: float = Field(ge=0, le=100_000)  # per million output tokens

    @field_validator("input_per_mtok", "output_per_mtok")
    @classmethod
    def _representable(cls, value: float) -> float:
        # Prices are kept in nano-units per million tokens: anything smaller would be free.
        if 0 < value < 1e-9:
            raise ValueError("must be 0 or at least 0.000000001 (prices are kept in nano-units)")
        return value


class DeploymentConfig(_Strict):
    provider: Identifier
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    pricing: PricingConfig | None = None  # needed by every model a cost budget covers


class ModelConfig(_Strict):
    deployments: tuple[DeploymentConfig, ...] = Field(min_length=1)
    policy: PolicyOverride = PolicyOverride()

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, value: Any) -> Any:
        # `name: [deployments]` is the everyday form; `name: {deployments: [...], policy: ...}`
        # is the form with overrides.
        if isinstance(value, list):
            return {"deployments": value}
        return value


class TelemetryConfig(_Strict):
    service_name: str = "llm-gateway"
    # OTLP/HTTP endpoint of a collector (e.g. http://otel-collector:4318); empty = no export.
    otlp_endpoint: str = ""
    sample_ratio: float = Field(1.0, ge=0, le=1)  # of traces not sampled by the caller already
    prometheus: bool = True  # GET /metrics
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # Prompt text on spans (gen_ai.input.messages). Off: no prompt or completion text is ever
    # recorded in spans or logs.
    capture_content: bool = False

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^\s]+$", value):
            raise ValueError("must be an http(s) URL or empty")
        return value


class BudgetConfig(_Strict):
    """Spend per UTC calendar day and month; each omitted budget is unlimited. Costs are in
    the currency of the deployments' `pricing`."""

    tokens_per_day: int | None = Field(None, ge=1, le=1_000_000_000_000_000)
    tokens_per_month: int | None = Field(None, ge=1, le=1_000_000_000_000_000)
    # At most a million units: nano-unit sums stay exact in Redis' Lua (doubles).
    cost_per_day: float | None = Field(None, ge=1e-9, le=1_000_000)  # nano-units at least
    cost_per_month: float | None = Field(None, ge=1e-9, le=1_000_000)

    @model_validator(mode="after")
    def _something(self) -> BudgetConfig:
        if (
            self.tokens_per_day is None
            and self.tokens_per_month is None
            and self.cost_per_day is None
            and self.cost_per_month is None
        ):
            raise ValueError(
                "set at least one of tokens_per_day, tokens_per_month, cost_per_day, "
                "cost_per_month (or leave the budget out)"
            )
        return self


class TierConfig(_Strict):
    """Per-caller limits; each omitted limit is unlimited."""

    requests_per_minute: int | None = Field(None, ge=1, le=10_000_000)
    tokens_per_minute: int | None = Field(None, ge=1, le=10_000_000_000)
    concurrent_streams: int | None = Field(None, ge=1, le=1_000_000)
    # Every in-flight request of the caller, streamed or not (a stream takes one of each).
    concurrent_requests: int | None = Field(None, ge=1, le=1_000_000)
    models: tuple[str, ...] | None = None  # None = every model
    priority: int = Field(0, ge=-1000, le=1000)  # in the upstream-capacity queue: higher first
    budget: BudgetConfig | None = None


class StateConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_redis_error: Literal["fail_open", "fail_closed"] = "fail_open"
    # Instances sharing the limits: with Redis down, each enforces limit / instances locally.
    instances: int = Field(1, ge=1, le=10_000)
    # Bounds every Redis call: no request waits on Redis longer than this.
    socket_timeout_s: float = Field(0.25, gt=0, le=10)
    # After a Redis error, go straight to the fallback this long before trying Redis again.
    retry_redis_after_s: float = Field(1.0, ge=0, le=300)
    key_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9:_.-]{1,64}$")] = "llmgw"


class AdminConfig(_Strict):
    """The admin listener: /metrics, /healthz, /readyz, /admin/*, /status. Not reloadable."""

    host: str = "127.0.0.1"  # loopback only unless said otherwise
    port: int = Field(ge=0, le=65535)
    # Required for /admin/* and /status (and accepted on /metrics); at least 16 characters.
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _token_long_enough(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value()
        if len(token) < 16 or len(token) > 4096 or not token.isprintable() or " " in token:
            raise ValueError("must be 16 to 4096 printable characters without spaces")
        return value


class ResumeConfig(_Strict):
    """Resumable streams: a dropped client reattaches with GET /v1/streams/{id}?offset=N."""

    enabled: bool = False
    store: Literal["memory", "redis"] = "memory"  # redis: state.redis_url, any instance serves
    ttl_s: float = Field(600, gt=0, le=7 * 86400)  # reattachable this long after the end
    max_stream_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1024**3)  # longer: 410
    memory_bytes: int = Field(256 * 1024 * 1024, ge=65536, le=64 * 1024**3)  # memory store
    inject_ids: bool = False  # `id: <offset>` in each event, for EventSource clients
    # Reattaches open at once on this instance: per stream, and per caller (beyond: 429).
    max_readers_per_stream: int = Field(8, ge=1, le=1000)
    max_readers_per_caller: int = Field(64, ge=1, le=100_000)


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    admin: AdminConfig | None = None  # absent: no admin listener
    state: StateConfig = StateConfig()
    auth: AuthConfig = AuthConfig()
    tiers: dict[Identifier, TierConfig] = Field(default_factory=dict)
    providers: dict[Identifier, ProviderConfig] = Field(min_length=1)
    models: dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], ModelConfig] = (
        Field(min_length=1)
    )
    policy: PolicyConfig = PolicyConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    resume: ResumeConfig = ResumeConfig()
