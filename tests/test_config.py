"""Tests for gateway.config: the loader (${ENV} expansion, YAML errors with key and line), the
strict schema, and build_runtime (cross-references, merged policies, secrets kept out of
reprs)."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from gateway.config import (
    ConfigError,
    GatewayConfig,
    Runtime,
    build_runtime,
    load_config,
    load_config_text,
)
from gateway.config.runtime import Timeouts
from gateway.errors import ApiFamily

CONFIG_DIR = Path(__file__).parent.parent / "config"

SECRET_ONE = "sk-openai-secret-one-111111"

MINIMAL = dedent(
    f"""\
    providers:
      oa:
        api: openai
        base_url: http://127.0.0.1:9/v1
        keys:
          - {{id: oa-1, secret: {SECRET_ONE}}}
    models:
      gpt:
        - {{provider: oa, model: gpt-upstream}}
    """
)


def load(text: str, env: dict[str, str] | None = None) -> GatewayConfig:
    return load_config_text(text, source="test.yaml", env=env or {})


def runtime_of(text: str, env: dict[str, str] | None = None) -> Runtime:
    return build_runtime(load_config_text(text, source="test.yaml", env=env or {}))


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source="test.yaml", env=env or {})
    return str(info.value)


def runtime_error_of(text: str, env: dict[str, str] | None = None) -> str:
    config = load_config_text(text, source="test.yaml", env=env or {})
    with pytest.raises(ConfigError) as info:
        build_runtime(config)
    return str(info.value)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the nth line containing `needle` (computed from the text)."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(f"{needle!r} not found {nth} time(s)")


def secret_of(text: str, env: dict[str, str]) -> str:
    config = load_config_text(text, source="test.yaml", env=env)
    return config.providers["oa"].keys[0].secret.get_secret_value()


def with_secret(secret_yaml: str) -> str:
    return MINIMAL.replace(SECRET_ONE, secret_yaml)


# --- ${VAR} expansion ----------------------------------------------------------------------


def test_minimal_config_loads() -> None:
    runtime = runtime_of(MINIMAL)
    assert list(runtime.routes) == ["gpt"]
    assert runtime.routes["gpt"].deployments[0].model == "gpt-upstream"
    assert runtime.providers["oa"].keys[0].secret == SECRET_ONE


def test_env_var_is_expanded() -> None:
    assert secret_of(with_secret('"${OA_KEY}"'), {"OA_KEY": "sk-from-env"}) == "sk-from-env"


def test_env_default_used_when_unset() -> None:
    assert secret_of(with_secret('"${OA_KEY:-sk-default}"'), {}) == "sk-default"


def test_env_value_wins_over_default() -> None:
    env = {"OA_KEY": "sk-from-env"}
    assert secret_of(with_secret('"${OA_KEY:-sk-default}"'), env) == "sk-from-env"


def test_empty_default_expands_to_nothing() -> None:
    assert secret_of(with_secret('"sk-${SUFFIX:-}tail"'), {}) == "sk-tail"


def test_several_refs_in_one_string() -> None:
    text = with_secret('"${A}-${B:-bee}-${C:-}-${D}"')
    assert secret_of(text, {"A": "aa", "D": "dd"}) == "aa-bee--dd"


def test_expansion_is_single_pass() -> None:
    # A value that itself looks like a reference is data, not another reference.
    assert secret_of(with_secret('"${A}"'), {"A": "${B}", "B": "no"}) == "${B}"


def test_expanded_value_is_validated_as_the_field_type() -> None:
    text = MINIMAL + "server:\n  port: ${PORT:-8080}\n"
    assert load(text).server.port == 8080
    assert load(text, {"PORT": "9191"}).server.port == 9191
    message = error_of(text, {"PORT": "not-a-port"})
    assert f"test.yaml:{line_of(text, 'port:')}: server.port:" in message


def test_missing_env_var_names_the_variable_and_line() -> None:
    text = with_secret('"${OA_SECRET_KEY}"')
    message = error_of(text)
    assert message == (
        f"test.yaml:{line_of(text, 'OA_SECRET_KEY')}: environment variable OA_SECRET_KEY "
        "is not set (and has no default)"
    )


def test_env_default_used_when_set_but_empty() -> None:
    assert secret_of(with_secret('"${OA_KEY:-sk-default}"'), {"OA_KEY": ""}) == "sk-default"


def test_set_but_empty_without_default_is_empty_not_missing() -> None:
    # `${VAR}` with VAR="" is set: no "not set" error; the empty secret is then rejected.
    message = error_of(with_secret('"${OA_KEY}"'), {"OA_KEY": ""})
    assert "not set" not in message
    assert "providers.oa.keys[0].secret" in message


# --- YAML-level errors ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    assert error_of(text) == "test.yaml: the file is empty"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert error_of(text) == "test.yaml:1: the top level must be a mapping"


def test_invalid_yaml_is_a_config_error() -> None:
    message = error_of("providers: [unclosed\n")
    assert message.startswith("test.yaml: invalid YAML:")


def test_duplicate_top_level_key_names_key_and_line() -> None:
    text = MINIMAL + "models:\n  other:\n    - {provider: oa, model: x}\n"
    assert error_of(text) == f"test.yaml:{line_of(text, 'models:', 2)}: duplicate key models"


def test_duplicate_nested_key_names_dotted_path_and_line() -> None:
    text = MINIMAL + "server:\n  port: 1\n  host: h\n  port: 2\n"
    assert error_of(text) == (f"test.yaml:{line_of(text, 'port: 2')}: duplicate key server.port")


# --- unknown keys (strict schema), with dotted path and line ----------------------------------


def test_unknown_top_level_key() -> None:
    text = MINIMAL + "bogus: 1\n"
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'bogus')}: unknown key bogus" in message


def test_unknown_key_depth_two() -> None:
    text = MINIMAL + "server:\n  port: 8000\n  colour: red\n"
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'colour')}: unknown key server.colour" in message


def test_unknown_key_depth_three() -> None:
    text = MINIMAL + "policy:\n  timeouts:\n    connect_s: 3\n    idle_s: 4\n"
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'idle_s')}: unknown key policy.timeouts.idle_s" in message


def test_unknown_key_inside_a_list_item() -> None:
    text = MINIMAL.replace("secret: " + SECRET_ONE, f"secret: {SECRET_ONE}, colour: red")
    message = error_of(text)
    assert (
        f"test.yaml:{line_of(text, 'colour')}: unknown key providers.oa.keys[0].colour" in message
    )
    assert SECRET_ONE not in message


def test_unknown_key_in_block_list_item_of_long_form_model() -> None:
    text = MINIMAL + (
        "  o3:\n"
        "    deployments:\n"
        "      - {provider: oa, model: o3}\n"
        "      - provider: oa\n"
        "        model: o3-mini\n"
        "        region: eu\n"
    )
    message = error_of(text)
    assert (
        f"test.yaml:{line_of(text, 'region')}: unknown key models.o3.deployments[1].region"
        in message
    )


def test_only_the_errors_are_reported_not_the_values() -> None:
    text = MINIMAL + "telemetry:\n  log_format: xml\n"
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'log_format')}: telemetry.log_format:" in message
    assert message.startswith("invalid configuration:\n  ")


def test_unknown_key_with_block_value_reports_the_key_line() -> None:
    text = MINIMAL + "server:\n  port: 8000\n  extras:\n    a: 1\n"
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'extras:')}: unknown key server.extras" in message


def test_unknown_key_in_shorthand_deployment_reports_its_line() -> None:
    text = MINIMAL + (
        "  two:\n"
        "    - {provider: oa, model: first}\n"
        "    - {provider: oa, model: second, region: eu}\n"
    )
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'region')}:" in message
    assert "[1].region" in message


# --- wrong types and values name the key ---------------------------------------------------


def test_port_as_string_names_the_key() -> None:
    text = MINIMAL + "server:\n  port: abc\n"
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'port: abc')}: server.port: Input should be a valid " in (
        message
    )


def test_port_out_of_range_names_the_key() -> None:
    text = MINIMAL + "server:\n  port: 70000\n"
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'port: 70000')}: server.port:" in message
    assert "65535" in message


@pytest.mark.parametrize("name", ["connect_s", "first_byte_s", "chunk_s", "total_s"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_non_positive_timeouts_name_the_key(name: str, value: str) -> None:
    text = MINIMAL + f"policy:\n  timeouts:\n    {name}: {value}\n"
    message = error_of(text)
    assert (
        f"test.yaml:{line_of(text, name)}: policy.timeouts.{name}: Input should be greater than 0"
        in message
    )


def test_unknown_provider_api_names_the_key() -> None:
    text = MINIMAL.replace("api: openai", "api: gemini")
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'gemini')}: providers.oa.api:" in message


def test_base_url_must_be_http() -> None:
    text = MINIMAL.replace("http://127.0.0.1:9/v1", "ftp://example.com")
    assert "providers.oa.base_url:" in error_of(text)


def test_missing_required_section() -> None:
    text = MINIMAL.split("models:")[0]
    assert "models: required key is missing" in error_of(text)


# --- providers and their keys ---------------------------------------------------------------


def test_provider_with_empty_key_list() -> None:
    text = MINIMAL.replace(f"\n      - {{id: oa-1, secret: {SECRET_ONE}}}", " []")
    message = error_of(text)
    assert f"test.yaml:{line_of(text, 'keys: []')}: providers.oa.keys:" in message
    assert "at least 1 item" in message


def test_provider_without_keys_section() -> None:
    text = MINIMAL.replace(f"    keys:\n      - {{id: oa-1, secret: {SECRET_ONE}}}\n", "")
    assert "providers.oa.keys: required key is missing" in error_of(text)


def test_duplicate_key_ids_in_a_provider() -> None:
    text = MINIMAL.replace(
        f"      - {{id: oa-1, secret: {SECRET_ONE}}}\n",
        f"      - {{id: oa-1, secret: {SECRET_ONE}}}\n      - {{id: oa-1, secret: sk-two-xx}}\n",
    )
    message = error_of(text)
    assert "duplicate key id(s) oa-1" in message
    assert SECRET_ONE not in message
    assert "sk-two-xx" not in message


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_empty_secret_after_expansion_is_rejected(value: str) -> None:
    text = with_secret('"${OA_KEY}"')
    message = error_of(text, {"OA_KEY": value})
    assert (
        f"test.yaml:{line_of(text, 'OA_KEY')}: providers.oa.keys[0].secret: Value error, "
        "the secret is empty" in message
    )


def test_invalid_key_entry_never_prints_its_secret() -> None:
    text = MINIMAL.replace(f"secret: {SECRET_ONE}", f"secret: {SECRET_ONE}, weight: 0")
    message = error_of(text)
    assert "providers.oa.keys[0].weight" in message
    assert SECRET_ONE not in message


def test_secret_of_wrong_type_is_not_printed() -> None:
    text = MINIMAL.replace(f"secret: {SECRET_ONE}", f"secret: [{SECRET_ONE}]")
    message = error_of(text)
    assert "providers.oa.keys[0].secret" in message
    assert SECRET_ONE not in message


# --- forward_headers and static headers -----------------------------------------------------


def with_forward(patterns: str) -> str:
    return MINIMAL.replace("    keys:", f"    forward_headers: {patterns}\n    keys:")


@pytest.mark.parametrize(
    "name",
    [
        "authorization",
        "Authorization",
        "x-api-key",
        "X-API-KEY",
        "content-length",
        "host",
        "transfer-encoding",
        "connection",
        "content-type",
        "accept-encoding",
        "authorization*",
        "x-api*",
        "x-*",
        "auth*",
        "content-*",
        "*",
    ],
)
def test_forward_headers_reject_reserved_names_and_prefixes(name: str) -> None:
    text = with_forward(f'["{name}"]')
    message = error_of(text)
    assert (
        f"test.yaml:{line_of(text, 'forward_headers')}: providers.oa.forward_headers: "
        f"Value error, {name!r} would forward a header the gateway owns" in message
    )


@pytest.mark.parametrize("name", ["x fake", "x-fake:", "", "x/y", "caf\u00e9", "x-a\ny"])
def test_forward_headers_reject_bad_names(name: str) -> None:
    quoted = name.replace("\n", "\\n")
    message = error_of(with_forward(f'["{quoted}"]'))
    assert "providers.oa.forward_headers: Value error, " in message
    assert f"{name!r} is not a header name" in message


def test_forward_headers_are_lowercased_and_split_into_exact_and_prefix() -> None:
    runtime = runtime_of(with_forward('["X-Request-Priority", "X-Fake-*", "anthropic-beta"]'))
    spec = runtime.providers["oa"]
    assert spec.forward_exact == frozenset({"x-request-priority", "anthropic-beta"})
    assert spec.forward_prefixes == ("x-fake-",)


def test_static_headers_lowercased() -> None:
    text = MINIMAL.replace("    keys:", "    headers: {OpenAI-Organization: org-1}\n    keys:")
    assert dict(runtime_of(text).providers["oa"].headers) == {"openai-organization": "org-1"}


@pytest.mark.parametrize("name", ["Authorization", "x-api-key", "Host", "x-fake-*", "bad name"])
def test_static_headers_reject_reserved_and_bad_names(name: str) -> None:
    text = MINIMAL.replace("    keys:", f'    headers: {{"{name}": v}}\n    keys:')
    assert "providers.oa.headers: Value error, " in error_of(text)


# --- models: shorthand and long form, policy overrides -------------------------------------

TWO_PROVIDERS = dedent(
    """\
    providers:
      oa:
        api: openai
        base_url: http://127.0.0.1:9/v1/
        keys:
          - {id: oa-1, secret: sk-openai-aaaaaaaa}
      oa2:
        api: openai
        base_url: http://127.0.0.1:10/v1
        keys:
          - {id: oa2-1, secret: sk-openai-bbbbbbbbbbbb}
      an:
        api: anthropic
        base_url: http://127.0.0.1:11
        keys:
          - {id: an-1, secret: sk-ant-cccccccccccccccccccc}
    policy:
      timeouts: {connect_s: 2, first_byte_s: 10, chunk_s: 11, total_s: 120}
      max_tokens_cap: 4096
    """
)


def test_model_shorthand_and_long_form_are_equivalent() -> None:
    text = TWO_PROVIDERS + dedent(
        """\
        models:
          short:
            - {provider: oa, model: m-a}
            - {provider: oa2, model: m-b}
          long:
            deployments:
              - {provider: oa, model: m-a}
              - {provider: oa2, model: m-b}
        """
    )
    runtime = runtime_of(text)
    for name in ("short", "long"):
        route = runtime.routes[name]
        assert route.name == name
        assert route.family is ApiFamily.OPENAI
        assert [(d.provider.name, d.model) for d in route.deployments] == [
            ("oa", "m-a"),
            ("oa2", "m-b"),
        ]
        assert route.timeouts == Timeouts(connect_s=2, first_byte_s=10, chunk_s=11, total_s=120)
        assert route.max_tokens_cap == 4096
    # one pool per provider, shared by every model that uses it
    assert runtime.routes["short"].deployments[0].pool is runtime.pools["oa"]
    assert runtime.routes["long"].deployments[0].pool is runtime.pools["oa"]
    assert runtime.providers["oa"].base_url == "http://127.0.0.1:9/v1"  # trailing / dropped


def test_long_form_needs_at_least_one_deployment() -> None:
    text = TWO_PROVIDERS + "models:\n  empty:\n    deployments: []\n"
    assert "models.empty.deployments:" in error_of(text)


def test_per_model_policy_merges_with_global_policy() -> None:
    text = TWO_PROVIDERS + dedent(
        """\
        models:
          plain:
            - {provider: oa, model: m}
          o3:
            deployments:
              - {provider: oa, model: o3}
            policy:
              timeouts: {first_byte_s: 600, total_s: 3600}
              max_tokens_cap: 32768
          capped-only:
            deployments:
              - {provider: oa, model: m}
            policy: {max_tokens_cap: 10}
        """
    )
    routes = runtime_of(text).routes
    assert routes["o3"].timeouts == Timeouts(
        connect_s=2, first_byte_s=600, chunk_s=11, total_s=3600
    )
    assert routes["o3"].max_tokens_cap == 32768
    assert routes["plain"].timeouts == Timeouts(
        connect_s=2, first_byte_s=10, chunk_s=11, total_s=120
    )
    assert routes["plain"].max_tokens_cap == 4096
    assert routes["capped-only"].timeouts == routes["plain"].timeouts
    assert routes["capped-only"].max_tokens_cap == 10


def test_no_cap_anywhere_is_none() -> None:
    assert runtime_of(MINIMAL).routes["gpt"].max_tokens_cap is None


def test_unknown_timeout_name_in_override_is_rejected() -> None:
    text = TWO_PROVIDERS + dedent(
        """\
        models:
          o3:
            deployments:
              - {provider: oa, model: o3}
            policy:
              timeouts: {first_byte_s: 600, idle_s: 3}
        """
    )
    message = error_of(text)
    assert (
        f"test.yaml:{line_of(text, 'idle_s')}: unknown key models.o3.policy.timeouts.idle_s"
        in message
    )


def test_invalid_timeout_value_in_override_is_a_config_error() -> None:
    text = TWO_PROVIDERS + dedent(
        """\
        models:
          o3:
            deployments:
              - {provider: oa, model: o3}
            policy:
              timeouts: {first_byte_s: -5}
        """
    )
    with pytest.raises(ConfigError, match="first_byte_s"):
        runtime_of(text)


# --- build_runtime cross-reference errors ---------------------------------------------------


def test_deployment_naming_unknown_provider() -> None:
    text = TWO_PROVIDERS + "models:\n  gpt:\n    - {provider: nope, model: m}\n"
    assert runtime_error_of(text) == (
        "models.gpt[0]: provider 'nope' is not defined (known: an, oa, oa2)"
    )


def test_model_mixing_openai_and_anthropic() -> None:
    text = TWO_PROVIDERS + dedent(
        """\
        models:
          mixed:
            - {provider: oa, model: gpt}
            - {provider: an, model: claude}
        """
    )
    assert runtime_error_of(text) == (
        "models.mixed: deployments mix wire APIs (anthropic, openai); fallback needs one API"
    )


def test_two_openai_providers_in_one_model_is_fine() -> None:
    text = (
        TWO_PROVIDERS
        + "models:\n  m:\n    - {provider: oa, model: a}\n    - {provider: oa2, model: b}\n"
    )
    assert runtime_of(text).routes["m"].family is ApiFamily.OPENAI


def test_api_key_restricted_to_unknown_model() -> None:
    text = MINIMAL + dedent(
        """\
        auth:
          api_keys:
            - id: app
              sha256: "0000000000000000000000000000000000000000000000000000000000000001"
              models: [gpt, ghost, phantom]
        """
    )
    assert runtime_error_of(text) == "auth.api_keys[app].models: unknown model(s) ghost, phantom"


def test_api_keys_become_callers_keyed_by_lowercase_digest() -> None:
    digest = "AB" * 32
    text = MINIMAL + dedent(
        f"""\
        auth:
          api_keys:
            - {{id: app, sha256: "{digest}", models: [gpt]}}
            - {{id: all, sha256: "{"cd" * 32}"}}
        """
    )
    callers = runtime_of(text).callers
    assert set(callers) == {"ab" * 32, "cd" * 32}
    assert callers["ab" * 32].id == "app"
    assert callers["ab" * 32].models == frozenset({"gpt"})
    assert callers["cd" * 32].models is None


def test_duplicate_api_key_ids_and_digests_rejected() -> None:
    dup_id = MINIMAL + dedent(
        f"""\
        auth:
          api_keys:
            - {{id: app, sha256: "{"ab" * 32}"}}
            - {{id: app, sha256: "{"cd" * 32}"}}
        """
    )
    assert "duplicate api key id 'app'" in error_of(dup_id)
    dup_digest = MINIMAL + dedent(
        f"""\
        auth:
          api_keys:
            - {{id: one, sha256: "{"ab" * 32}"}}
            - {{id: two, sha256: "{"AB" * 32}"}}
        """
    )
    assert "api key 'two' repeats the sha256 of another key" in error_of(dup_digest)


# --- secrets ---------------------------------------------------------------------------------


def test_runtime_secrets_hold_every_upstream_secret_longest_first() -> None:
    text = (
        TWO_PROVIDERS.replace(
            "      - {id: oa-1, secret: sk-openai-aaaaaaaa}\n",
            "      - {id: oa-1, secret: sk-openai-aaaaaaaa}\n"
            "      - {id: oa-2, secret: sk-ant-cccccccccccccccccccc}\n"  # same secret twice: once
            "      - {id: oa-3, secret: s1}\n",
        )
        + "models:\n  m:\n    - {provider: oa, model: x}\n"
    )
    runtime = runtime_of(text)
    assert runtime.secrets == (
        b"sk-ant-cccccccccccccccccccc",
        b"sk-openai-bbbbbbbbbbbb",
        b"sk-openai-aaaaaaaa",
        b"s1",
    )


def test_upstream_keys_compiled_with_fingerprints() -> None:
    runtime = runtime_of(TWO_PROVIDERS + "models:\n  m:\n    - {provider: oa, model: x}\n")
    (key,) = runtime.providers["oa"].keys
    assert key.id == "oa-1"
    assert key.secret == "sk-openai-aaaaaaaa"
    assert key.weight == 1
    assert key.fingerprint.startswith("fp_")
    assert runtime.pools["oa"].keys == (key,)


def test_no_repr_contains_a_secret() -> None:
    text = TWO_PROVIDERS + dedent(
        """\
        models:
          gpt:
            - {provider: oa, model: x}
          claude:
            - {provider: an, model: y}
        """
    )
    config = load_config_text(text, env={})
    runtime = build_runtime(config)
    secrets = ["sk-openai-aaaaaaaa", "sk-openai-bbbbbbbbbbbb", "sk-ant-cccccccccccccccccccc"]
    texts = [
        repr(runtime),
        str(runtime),
        repr(config),
        str(config),
        config.model_dump_json(),
        repr(config.model_dump()),
        *(repr(spec) for spec in runtime.providers.values()),
        *(repr(key) for spec in runtime.providers.values() for key in spec.keys),
        *(repr(route) for route in runtime.routes.values()),
        *(repr(pool) for pool in runtime.pools.values()),
    ]
    for shown in texts:
        for secret in secrets:
            assert secret not in shown
    # and the objects really do hold the secrets (the check above is not vacuous)
    assert {k.secret for spec in runtime.providers.values() for k in spec.keys} == set(secrets)


# --- the shipped configuration files ---------------------------------------------------------


def test_demo_config_validates_with_empty_env() -> None:
    runtime = build_runtime(load_config(CONFIG_DIR / "demo.yaml", env={}))
    assert set(runtime.routes) == {"gpt-4o-mini", "text-embedding-3-small", "claude-sonnet"}
    assert runtime.server.port == 8080
    assert runtime.providers["fake-openai"].base_url == "http://127.0.0.1:9911/v1"
    assert runtime.routes["claude-sonnet"].family is ApiFamily.ANTHROPIC
    assert runtime.routes["gpt-4o-mini"].max_tokens_cap == 4096


EXAMPLE_ENV = {
    "OPENAI_KEY_1": "sk-example-openai-1",
    "OPENAI_KEY_2": "sk-example-openai-2",
    "ANTHROPIC_KEY_1": "sk-ant-example-1",
    "ANTHROPIC_ORG_B_KEY": "sk-ant-example-org-b",
}


def test_example_config_validates_with_its_env() -> None:
    runtime = build_runtime(load_config(CONFIG_DIR / "gateway.example.yaml", env=EXAMPLE_ENV))
    assert runtime.routes["o3"].timeouts == Timeouts(
        connect_s=5, first_byte_s=600, chunk_s=300, total_s=3600
    )
    assert runtime.routes["o3"].max_tokens_cap == 32768
    assert runtime.routes["gpt-4o-mini"].max_tokens_cap == 8192
    assert [k.weight for k in runtime.providers["openai"].keys] == [1, 2]
    assert set(EXAMPLE_ENV.values()) <= {s.decode() for s in runtime.secrets}


def test_example_config_names_the_first_missing_variable() -> None:
    path = CONFIG_DIR / "gateway.example.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    line = line_of(path.read_text(encoding="utf-8"), "${OPENAI_KEY_1}")
    assert str(info.value) == (
        f"{path}:{line}: environment variable OPENAI_KEY_1 is not set (and has no default)"
    )


def test_load_config_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(CONFIG_DIR / "does-not-exist.yaml", env={})


def test_caller_may_use_and_models_for() -> None:
    text = MINIMAL + dedent(
        f"""\
          other:
            - {{provider: oa, model: other-upstream}}
        auth:
          api_keys:
            - {{id: app, sha256: "{"ab" * 32}", models: [other]}}
            - {{id: all, sha256: "{"cd" * 32}"}}
        """
    )
    runtime = runtime_of(text)
    limited, everything = runtime.callers["ab" * 32], runtime.callers["cd" * 32]
    assert limited.may_use("other") is True
    assert limited.may_use("gpt") is False
    assert everything.may_use("gpt") is True
    assert everything.may_use("not-even-a-model") is True
    assert [r.name for r in runtime.models_for(limited)] == ["other"]
    assert [r.name for r in runtime.models_for(everything)] == ["gpt", "other"]
