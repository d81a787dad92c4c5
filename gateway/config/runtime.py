"""The compiled, immutable runtime: everything a request needs, built once per config load.

A request reads `app[RUNTIME]` once and uses that snapshot to the end, so a reload (a whole new
Runtime swapped in) never changes a request half-way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from gateway.config.loader import ConfigError
from gateway.config.schema import (
    BudgetConfig,
    GatewayConfig,
    HedgeConfig,
    RetryConfig,
    RetryOverride,
    ServerConfig,
    TelemetryConfig,
    TimeoutsConfig,
    TimeoutsOverride,
)
from gateway.keypool import InFlight, KeyHealth, KeyPool, UpstreamKey, fingerprint
from gateway.limits.base import LimitSpec
from gateway.limits.budget import BudgetSpec, Pricing, to_nano
from gateway.providers import WIRE_APIS
from gateway.providers.base import ApiFamily
from gateway.state import HealthStore, MemoryHealthStore

if TYPE_CHECKING:
    from gateway.jwtauth import JwtVerifier


@dataclass(frozen=True, slots=True)
class Caller:
    id: str
    models: frozenset[str] | None  # None = every model
    tier: str | None = None
    limits: LimitSpec | None = None  # None = unlimited
    priority: int = 0  # in the upstream-capacity queue (the tier's)
    budget: BudgetSpec | None = None  # the tier's spend budgets (None = none)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    limits: LimitSpec | None
    models: frozenset[str] | None
    priority: int = 0
    budget: BudgetSpec | None = None


def make_caller(caller_id: str, tier: Tier | None, models: Iterable[str] | None) -> Caller:
    """A caller whose model list is its own list within its tier's (both, when both are set)."""
    allowed = frozenset(models) if models is not None else None
    if tier is not None and tier.models is not None:
        allowed = tier.models if allowed is None else allowed & tier.models
    return Caller(
        id=caller_id,
        models=allowed,
        tier=tier.name if tier else None,
        limits=tier.limits if tier else None,
        priority=tier.priority if tier else 0,
        budget=tier.budget if tier else None,
    )


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    chunk_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base_delay_s: float
    max_delay_s: float
    max_retry_after_s: float
    deadline_s: float


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    name: str
    api: ApiFamily
    base_url: str  # without a trailing slash
    keys: tuple[UpstreamKey, ...] = field(repr=False)
    forward_exact: frozenset[str]
    forward_prefixes: tuple[str, ...]
    headers: Mapping[str, str] = field(repr=False)  # may carry a token from ${ENV}
    chat_max_tokens_field: str
    anthropic_version: str
    cooldown_s: float
    disable_s: float
    max_disable_s: float
    spend_cap_429s: int
    limits: LimitSpec | None = None  # the provider's own budget
    # The upstream URL of each gateway path its wire API serves (parsed once per runtime).
    urls: Mapping[str, URL] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class Deployment:
    provider: ProviderSpec
    model: str  # the upstream's model name
    pool: KeyPool = field(repr=False)
    pricing: Pricing | None = None

    @property
    def server_address(self) -> str | None:
        return urlsplit(self.provider.base_url).hostname

    @property
    def server_port(self) -> int | None:
        url = urlsplit(self.provider.base_url)
        return url.port or (443 if url.scheme == "https" else 80)


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the model name callers send
    family: ApiFamily
    deployments: tuple[Deployment, ...]
    timeouts: Timeouts
    retry: RetryPolicy
    max_tokens_cap: int | None
    hedge: HedgeConfig | None = None
    # The HTTP client's timeouts of every attempt (built once: the first-byte, chunk and total
    # deadlines are the gateway's own).
    client_timeout: aiohttp.ClientTimeout = field(
        default=aiohttp.ClientTimeout(total=None), compare=False, repr=False
    )


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig = field(repr=False)
    server: ServerConfig
    telemetry: TelemetryConfig
    callers: Mapping[str, Caller]  # sha256 hex digest of the caller key -> caller
    tiers: Mapping[str, Tier]
    default_tier: str | None
    digests: Mapping[str, str] = field(repr=False)  # caller id -> sha256 of its key
    routes: Mapping[str, Route]
    providers: Mapping[str, ProviderSpec]
    pools: Mapping[str, KeyPool] = field(repr=False)
    # Key and provider health: passed from runtime to runtime on reload, so a reload does not
    # bring a disabled key back.
    health: HealthStore = field(repr=False)
    # Keys in flight, by fingerprint: passed from runtime to runtime on reload too, so caps and
    # least-in-flight count the streams the previous runtime still serves.
    in_flight: InFlight = field(repr=False)
    # Every upstream secret, longest first: scrubbed from any upstream body passed to a caller.
    secrets: tuple[bytes, ...] = field(repr=False)
    # The JWT verifier of `config.auth.jwt` (None without JWT), put in by the application
    # before this runtime serves: a reload swaps it together with everything else.
    jwt: JwtVerifier | None = field(default=None, repr=False, compare=False)

    def models_for(self, caller: Caller) -> list[Route]:
        return [r for name, r in self.routes.items() if caller.may_use(name)]


def _merged(model: str, section: str, base: BaseModel, override: BaseModel) -> dict[str, Any]:
    values = base.model_dump()
    values.update(override.model_dump(exclude_none=True))
    try:
        return type(base).model_validate(values).model_dump()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or section}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"models.{model}.policy.{section}: {problems}") from None


def _timeouts(model: str, base: TimeoutsConfig, override: TimeoutsOverride) -> Timeouts:
    return Timeouts(**_merged(model, "timeouts", base, override))


def _retry(model: str, base: RetryConfig, override: RetryOverride) -> RetryPolicy:
    values = _merged(model, "retry", base, override)
    return RetryPolicy(
        max_attempts=values["max_attempts"],
        base_delay_s=values["base_delay_ms"] / 1000,
        max_delay_s=values["max_delay_ms"] / 1000,
        max_retry_after_s=values["max_retry_after_s"],
        deadline_s=values["deadline_s"],
    )


def _budget(
    tier: str, budget: BudgetConfig | None, models: tuple[str, ...] | None, routes: dict[str, Route]
) -> BudgetSpec | None:
    """A tier's budgets. A cost budget needs a price for every deployment it may reach: an
    unpriced one would be spent for free."""
    if budget is None:
        return None
    spec = BudgetSpec(
        tier,
        budget.tokens_per_day,
        budget.tokens_per_month,
        to_nano(budget.cost_per_day),
        to_nano(budget.cost_per_month),
    )
    if spec.has_cost:
        for name in models if models is not None else sorted(routes):
            for i, d in enumerate(routes[name].deployments):
                if d.pricing is None:
                    raise ConfigError(
                        f"tiers.{tier}.budget has a cost budget, but models.{name}[{i}] "
                        f"({d.provider.name}/{d.model}) has no pricing (give it "
                        "pricing: {input_per_mtok, output_per_mtok}; 0 for a free one)"
                    )
    return spec


def build_runtime(
    config: GatewayConfig,
    health: HealthStore | None = None,
    in_flight: InFlight | None = None,
) -> Runtime:
    """Compile a validated config. Raises ConfigError naming the entry that does not hang
    together (an unknown provider, mixed wire APIs in one model, ...). A reload passes the
    running runtime's `health` and `in_flight`."""
    if health is None:
        health = MemoryHealthStore()
    if in_flight is None:
        in_flight = InFlight()
    providers: dict[str, ProviderSpec] = {}
    pools: dict[str, KeyPool] = {}
    secrets: set[bytes] = set()
    for name, p in config.providers.items():
        keys = tuple(
            UpstreamKey(
                id=k.id,
                secret=k.secret.get_secret_value(),
                weight=k.weight,
                fingerprint=fingerprint(k.secret.get_secret_value()),
            )
            for k in p.keys
        )
        secrets.update(k.secret.encode() for k in keys)
        api = ApiFamily(p.api)
        base_url = p.base_url.rstrip("/")
        spec = ProviderSpec(
            name=name,
            api=api,
            base_url=base_url,
            urls=MappingProxyType(
                {e.path: URL(base_url + e.upstream_path) for e in WIRE_APIS[api].endpoints}
            ),
            keys=keys,
            forward_exact=frozenset(h for h in p.forward_headers if not h.endswith("*")),
            forward_prefixes=tuple(h[:-1] for h in p.forward_headers if h.endswith("*")),
            headers=MappingProxyType(dict(p.headers)),
            chat_max_tokens_field=p.chat_max_tokens_field,
            anthropic_version=p.anthropic_version,
            cooldown_s=p.cooldown_s,
            disable_s=p.disable_s,
            max_disable_s=p.max_disable_s,
            spend_cap_429s=p.spend_cap_429s,
            limits=(
                LimitSpec(
                    tier=f"provider {name}",
                    requests_per_minute=p.limits.requests_per_minute,
                    tokens_per_minute=p.limits.tokens_per_minute,
                )
                if p.limits is not None
                and (p.limits.requests_per_minute or p.limits.tokens_per_minute)
                else None
            ),
        )
        providers[name] = spec
        pools[name] = KeyPool(
            name,
            keys,
            p.key_strategy,
            p.max_concurrent_per_key,
            health=health,
            in_flight=in_flight,
            policy=KeyHealth(
                cooldown_s=p.cooldown_s,
                disable_s=p.disable_s,
                max_disable_s=p.max_disable_s,
                spend_cap_429s=p.spend_cap_429s,
                backoff_base_s=config.policy.retry.base_delay_ms / 1000 or 0.1,
                backoff_max_s=max(config.policy.retry.max_delay_ms / 1000, 0.1),
            ),
        )

    if config.admin is not None:
        # Never expected upstream, but if an upstream ever echoed it, no caller would see it.
        secrets.add(config.admin.token.get_secret_value().encode())
    routes: dict[str, Route] = {}
    for model_name, m in config.models.items():
        deployments = []
        for i, d in enumerate(m.deployments):
            if d.provider not in providers:
                raise ConfigError(
                    f"models.{model_name}[{i}]: provider {d.provider!r} is not defined "
                    f"(known: {', '.join(sorted(providers))})"
                )
            pricing = (
                Pricing.of(d.pricing.input_per_mtok, d.pricing.output_per_mtok)
                if d.pricing is not None
                else None
            )
            deployments.append(
                Deployment(providers[d.provider], d.model, pools[d.provider], pricing)
            )
        families = {d.provider.api for d in deployments}
        if len(families) > 1:
            raise ConfigError(
                f"models.{model_name}: deployments mix wire APIs "
                f"({', '.join(sorted(f.value for f in families))}); fallback needs one API"
            )
        cap = m.policy.max_tokens_cap or config.policy.max_tokens_cap
        timeouts = _timeouts(model_name, config.policy.timeouts, m.policy.timeouts)
        routes[model_name] = Route(
            name=model_name,
            family=deployments[0].provider.api,
            deployments=tuple(deployments),
            timeouts=timeouts,
            retry=_retry(model_name, config.policy.retry, m.policy.retry),
            max_tokens_cap=cap,
            hedge=m.policy.hedge or config.policy.hedge,
            client_timeout=aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s
            ),
        )

    tiers: dict[str, Tier] = {}
    for name, t in config.tiers.items():
        unknown = sorted(set(t.models or ()) - set(routes))
        if unknown:
            raise ConfigError(f"tiers.{name}.models: unknown model(s) {', '.join(unknown)}")
        limit_spec = LimitSpec(
            tier=name,
            requests_per_minute=t.requests_per_minute,
            tokens_per_minute=t.tokens_per_minute,
            concurrent_streams=t.concurrent_streams,
            concurrent_requests=t.concurrent_requests,
        )
        tiers[name] = Tier(
            name=name,
            limits=None if limit_spec.empty else limit_spec,
            models=frozenset(t.models) if t.models is not None else None,
            priority=t.priority,
            budget=_budget(name, t.budget, t.models, routes),
        )
    default_tier = config.auth.default_tier
    if default_tier is not None and default_tier not in tiers:
        raise ConfigError(f"auth.default_tier: tier {default_tier!r} is not defined")
    callers = {}
    for k in config.auth.api_keys:
        unknown = sorted(set(k.models or ()) - set(routes))
        if unknown:
            raise ConfigError(
                f"auth.api_keys[{k.id}].models: unknown model(s) {', '.join(unknown)}"
            )
        tier_name = k.tier or default_tier
        if tier_name is not None and tier_name not in tiers:
            raise ConfigError(f"auth.api_keys[{k.id}].tier: tier {tier_name!r} is not defined")
        callers[k.sha256] = make_caller(k.id, tiers.get(tier_name) if tier_name else None, k.models)
    return Runtime(
        config=config,
        server=config.server,
        telemetry=config.telemetry,
        callers=MappingProxyType(callers),
        tiers=MappingProxyType(tiers),
        default_tier=default_tier,
        digests=MappingProxyType({c.id: d for d, c in callers.items()}),
        routes=MappingProxyType(routes),
        providers=MappingProxyType(providers),
        pools=MappingProxyType(pools),
        health=health,
        in_flight=in_flight,
        secrets=tuple(sorted(secrets, key=len, reverse=True)),
    )
