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
from gateway.config.loader import (
    ConfigWarning,
    LoadedConfig,
    load_config_checked,
    load_config_text_checked,
)
from gateway.config.runtime import Timeouts
from gateway.providers.base import ApiFamily

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


LEAK = "sk-inline-leak-7f3a9c2e"  # on the broken line of each syntax error below


def block_key(lines: str) -> str:
    """MINIMAL with its upstream key written as a block mapping of `lines`."""
    return MINIMAL.replace(f"      - {{id: oa-1, secret: {SECRET_ONE}}}\n", lines)


def test_yaml_syntax_error_names_line_column_and_key_path_never_the_line() -> None:
    text = block_key(f'      - id: oa-1\n        secret: "{LEAK}\n')  # the quote is never closed
    assert error_of(text) == (
        f"test.yaml: invalid YAML: line {len(text.splitlines()) + 1}, column 1, "
        "in providers.oa.keys[0].secret: found unexpected end of stream "
        f"(while scanning a quoted scalar at line {line_of(text, LEAK)}, column 17)"
    )


def test_yaml_syntax_error_in_a_flow_mapping() -> None:
    text = with_secret(f'"{LEAK}')
    assert error_of(text) == (
        f"test.yaml: invalid YAML: line {len(text.splitlines()) + 1}, column 1, "
        "in providers.oa.keys[0]: found unexpected end of stream "
        f"(while scanning a quoted scalar at line {line_of(text, LEAK)}, column 28)"
    )


def test_yaml_syntax_error_in_a_block_mapping() -> None:
    text = block_key(f"      - id: oa-1\n        secret {LEAK}\n        weight: 1\n")
    assert error_of(text) == (
        f"test.yaml: invalid YAML: line {line_of(text, 'weight')}, column 9, "
        "in providers.oa.keys[0]: could not find expected ':' "
        f"(while scanning a simple key at line {line_of(text, LEAK)}, column 9)"
    )


@pytest.mark.parametrize(
    "broken",
    [
        f'secret: "{LEAK}',  # unclosed quote
        f"secret {LEAK}",  # no colon (flow mapping)
        f"secret: {LEAK}: x",  # a second colon
        f"secret: {LEAK}, [",  # unclosed sequence
        f"secret: {LEAK}\t\x01",  # a control character
        f"secret: !!binary {LEAK}",  # not base64
        f"secret: !nope {LEAK}",  # unknown tag
    ],
)
def test_yaml_errors_never_quote_the_offending_line(broken: str) -> None:
    text = MINIMAL.replace(f"secret: {SECRET_ONE}", broken)
    message = error_of(text)
    assert "test.yaml:" in message
    assert LEAK not in message
    assert "^" not in message  # PyYAML's snippet marker
    assert LEAK[3:12] not in message


@pytest.mark.parametrize("entry", [f"id: oa-1, {LEAK}", f"id: oa-1, secret {LEAK}"])
def test_a_value_that_lost_its_key_is_not_named_as_an_unknown_key(entry: str) -> None:
    # In a flow mapping `{id: k, sk-...}` parses: the secret becomes a key without a value.
    text = MINIMAL.replace(f"id: oa-1, secret: {SECRET_ONE}", entry)
    message = error_of(text)
    assert (
        f"test.yaml:{line_of(text, LEAK)}: unknown key in providers.oa.keys[0] "
        "(name not shown: it looks like a value written without its key)"
    ) in message
    assert "providers.oa.keys[0].secret: required key is missing" in message
    assert LEAK not in message


def test_value_its_tag_cannot_read_names_key_and_line_not_the_value() -> None:
    text = MINIMAL + f"server:\n  port: !!int {LEAK}\n"
    assert error_of(text) == (
        f"test.yaml:{line_of(text, 'port:')}: server.port: "
        "cannot read this value as tag:yaml.org,2002:int"
    )


def test_control_character_names_line_and_column() -> None:
    text = MINIMAL + "server:\n  host: a\x00b\n"
    assert error_of(text) == (
        f"test.yaml: invalid YAML: line {line_of(text, 'host:')}, column 10: "
        "unacceptable character #x0000"
    )


def test_undefined_alias_names_its_key() -> None:
    text = MINIMAL + "server:\n  host: *nowhere\n"
    assert error_of(text) == (
        f"test.yaml: invalid YAML: line {line_of(text, 'host:')}, column 9, in server.host: "
        "found undefined alias 'nowhere'"
    )


# --- nesting depth -------------------------------------------------------------------------

DEEP = 5000


@pytest.mark.parametrize(
    "value",
    ["[" * DEEP + "]" * DEEP, "{a: " * DEEP + "1" + "}" * DEEP, "\n  " + "- " * DEEP + "x"],
    ids=["flow-sequences", "flow-mappings", "block-sequences"],
)
def test_deep_nesting_is_a_config_error(value: str) -> None:
    text = MINIMAL + f"deep: {value}\n"
    line = line_of(text, "deep:") + (1 if value.startswith("\n") else 0)
    assert error_of(text) == f"test.yaml:{line}: nested too deeply (more than 64 levels)"


def test_deep_block_mappings_name_the_line_past_the_limit() -> None:
    text = "".join("  " * i + f"k{i}:\n" for i in range(100))
    # The top mapping is level 1 and the key k<i> level i + 2: k63 is level 65.
    assert error_of(text) == (
        f"test.yaml:{line_of(text, 'k63:')}: nested too deeply (more than 64 levels)"
    )


def test_nesting_within_the_limit_reaches_validation() -> None:
    text = MINIMAL + "deep: " + "[" * 60 + "]" * 60 + "\n"
    assert f"test.yaml:{line_of(text, 'deep:')}: unknown key deep" in error_of(text)


def test_alias_of_an_enclosing_node_is_an_error() -> None:
    text = MINIMAL + "deep: &loop [*loop]\n"
    assert error_of(text) == (
        f"test.yaml:{line_of(text, 'deep:')}: deep[0]: "
        "alias *loop refers to a node that contains it"
    )


def test_aliases_cannot_multiply_into_millions_of_values() -> None:
    # "Billion laughs": ten levels of ten aliases each would be 10**10 values to validate.
    text = MINIMAL + "bomb:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        text += f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n"
    message = error_of(text)
    assert message == (
        f"test.yaml:{line_of(text, 'l5:')}: more than 1000000 values (aliases expanded)"
    )


def test_anchors_and_aliases_are_followed() -> None:
    text = with_secret('&key "${OA_KEY}"') + dedent(
        """\
          other: &deployments
            - {provider: oa, model: other-upstream}
          same: *deployments
        auth:
          jwt:
            issuer: https://idp.test/
            audience: gw
            algorithms: [HS256]
            secret: *key
        """
    )
    loaded = load_config_text_checked(text, source="test.yaml", env={"OA_KEY": "k" * 32})
    config = loaded.config
    assert config.models["same"] == config.models["other"]
    assert config.auth.jwt is not None
    assert config.auth.jwt.secret is not None
    assert config.auth.jwt.secret.get_secret_value() == "k" * 32
    assert loaded.warnings == ()  # the aliased secret comes from the environment too


def test_an_aliased_inline_secret_is_warned_about_where_it_is_written() -> None:
    secret = "shared-inline-secret-of-at-least-32-bytes-0"
    text = with_secret(f"&shared {secret}") + dedent(
        """\
        auth:
          jwt:
            issuer: https://idp.test/
            audience: gw
            algorithms: [HS256]
            secret: *shared
        """
    )
    found = warnings_of(text)
    assert [(w.key_path, w.line) for w in found] == [
        ("providers.oa.keys[0].secret", line_of(text, secret)),
        ("auth.jwt.secret", line_of(text, secret)),
    ]


def test_more_than_one_document_is_an_error() -> None:
    text = MINIMAL + "---\nserver: {port: 1}\n"
    assert error_of(text) == (
        f"test.yaml: invalid YAML: line {line_of(text, '---')}, column 1: "
        "expected a single document in the stream, found another"
    )


def test_deep_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("deep: " + "[" * DEEP + "]" * DEEP + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}:1: nested too deeply (more than 64 levels)"


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
    "GATEWAY_ADMIN_TOKEN": "example-admin-token-0123456789",
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
    line = line_of(path.read_text(encoding="utf-8"), "${GATEWAY_ADMIN_TOKEN}")
    assert str(info.value) == (
        f"{path}:{line}: environment variable GATEWAY_ADMIN_TOKEN is not set (and has no default)"
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


# --- warnings: upstream secrets written inline --------------------------------------------


def warnings_of(text: str, env: dict[str, str] | None = None) -> tuple[ConfigWarning, ...]:
    loaded = load_config_text_checked(text, source="test.yaml", env=env or {})
    assert isinstance(loaded, LoadedConfig)
    return loaded.warnings


def test_inline_upstream_secret_is_a_warning_naming_line_and_key_path() -> None:
    (warning,) = warnings_of(MINIMAL)
    assert warning == ConfigWarning(
        source="test.yaml",
        line=line_of(MINIMAL, SECRET_ONE),
        key_path="providers.oa.keys[0].secret",
        message="secret written inline (use ${ENV_VAR})",
    )
    assert str(warning) == (
        f"test.yaml:{line_of(MINIMAL, SECRET_ONE)}: providers.oa.keys[0].secret: "
        "secret written inline (use ${ENV_VAR})"
    )


@pytest.mark.parametrize(
    "secret", ['"${OA_KEY}"', '"${OA_KEY:-sk-default-key}"', '"sk-${SUFFIX:-}tail"']
)
def test_secret_from_the_environment_is_not_inline(secret: str) -> None:
    assert warnings_of(with_secret(secret), {"OA_KEY": "sk-from-env"}) == ()


def test_every_key_of_every_provider_is_checked() -> None:
    text = TWO_PROVIDERS.replace(
        "      - {id: oa-1, secret: sk-openai-aaaaaaaa}\n",
        '      - {id: oa-1, secret: "${OA_1}"}\n      - {id: oa-2, secret: sk-openai-inline}\n',
    ) + ("models:\n  m:\n    - {provider: oa, model: x}\n")
    found = warnings_of(text, {"OA_1": "sk-env"})
    assert [(w.line, w.key_path) for w in found] == [
        (line_of(text, "oa-2"), "providers.oa.keys[1].secret"),
        (line_of(text, "oa2-1"), "providers.oa2.keys[0].secret"),
        (line_of(text, "an-1"), "providers.an.keys[0].secret"),
    ]


def test_static_header_values_written_inline_are_warned_about() -> None:
    text = with_secret('"${OA_KEY}"').replace(
        "    keys:",
        '    headers:\n      OpenAI-Organization: org-inline-1\n      X-Token: "Bearer ${TOK}"\n'
        "    keys:",
    )
    (warning,) = warnings_of(text, {"OA_KEY": "k", "TOK": "t"})
    assert str(warning) == (
        f"test.yaml:{line_of(text, 'OpenAI-Organization')}: "
        "providers.oa.headers.OpenAI-Organization: "
        "header value written inline (use ${ENV_VAR} if it is a secret)"
    )


JWT_INLINE = "jwt-inline-secret-of-at-least-32-bytes-000"


@pytest.mark.parametrize(("secret", "inline"), [(JWT_INLINE, True), ('"${JWT_SECRET}"', False)])
def test_inline_jwt_secret_is_a_warning(secret: str, inline: bool) -> None:
    text = with_secret('"${OA_KEY}"') + dedent(
        f"""\
        auth:
          jwt:
            issuer: https://idp.test/
            audience: gw
            algorithms: [HS256]
            secret: {secret}
        """
    )
    found = warnings_of(text, {"OA_KEY": "k", "JWT_SECRET": JWT_INLINE})
    expected = [(line_of(text, "secret: " + secret), "auth.jwt.secret")] if inline else []
    assert [(w.line, w.key_path) for w in found] == expected


@pytest.mark.parametrize(
    ("url", "inline"),
    [
        ("redis://:hunter2-inline@redis:6379/0", True),
        ("rediss://user:hunter2-inline@redis:6379/0", True),
        # The host comes from the environment; the password does not.
        ("redis://:hunter2-inline@${REDIS_HOST}:6379/0", True),
        ("redis://redis:6379/0", False),
        ("redis://user@redis:6379/0", False),
        ("redis://:${REDIS_PASSWORD}@redis:6379/0", False),
        ("redis://:${REDIS_PASSWORD:-hunter2-default}@redis:6379/0", False),
        ("${REDIS_URL}", False),
    ],
)
def test_password_in_the_redis_url(url: str, inline: bool) -> None:
    text = with_secret('"${OA_KEY}"') + f'state:\n  redis_url: "{url}"\n'
    env = {
        "OA_KEY": "k",
        "REDIS_HOST": "redis",
        "REDIS_PASSWORD": "hunter2-env",
        "REDIS_URL": "redis://:hunter2-env@redis:6379/0",
    }
    found = warnings_of(text, env)
    expected = (
        [
            f"test.yaml:{line_of(text, 'redis_url')}: state.redis_url: "
            "password written inline in the URL (use ${ENV_VAR})"
        ]
        if inline
        else []
    )
    assert [str(w) for w in found] == expected


def test_warnings_never_hold_the_value() -> None:
    text = MINIMAL.replace("    keys:", "    headers: {X-Org: org-secretish-1}\n    keys:") + (
        'state:\n  redis_url: "redis://:hunter2-inline@redis/0"\n'
    )
    found = warnings_of(text)
    assert len(found) == 3
    for warning in found:
        for shown in (str(warning), repr(warning)):
            assert SECRET_ONE not in shown
            assert "org-secretish-1" not in shown
            assert "hunter2" not in shown


def test_load_config_checked_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL)
    loaded = load_config_checked(path, env={})
    assert list(loaded.config.models) == ["gpt"]
    assert [str(w) for w in loaded.warnings] == [
        f"{path}:{line_of(MINIMAL, SECRET_ONE)}: providers.oa.keys[0].secret: "
        "secret written inline (use ${ENV_VAR})"
    ]


def test_resume_is_off_by_default_and_its_values_are_bounded() -> None:
    resume = load(MINIMAL).resume
    assert (resume.enabled, resume.store, resume.ttl_s, resume.inject_ids) == (
        False,
        "memory",
        600,
        False,
    )
    assert resume.max_stream_bytes == 4 * 1024 * 1024
    for bad in (
        "ttl_s: 0",
        "max_stream_bytes: 100",
        "memory_bytes: 1000",
        "store: disk",
        "enabled: maybe",
        "replay: true",
    ):
        message = error_of(MINIMAL + f"resume:\n  {bad}\n")
        assert "test.yaml:11: " in message and "resume." in message, message


def test_admin_needs_a_token_of_16_characters() -> None:
    assert "admin.token" in error_of(MINIMAL + "admin: {port: 9090, token: short}\n")
    assert "admin.token" in error_of(MINIMAL + "admin: {port: 9090}\n")
    assert "admin.token" in error_of(
        MINIMAL + 'admin: {port: 9090, token: "has a space in it, sadly"}\n'
    )
    config = load(MINIMAL + 'admin: {port: 9090, token: "${TOKEN}"}\n', {"TOKEN": "t" * 16})
    assert config.admin is not None and config.admin.host == "127.0.0.1"
    assert load(MINIMAL).admin is None


# --- spend budgets and pricing ---------------------------------------------------------------

PRICED = MINIMAL.replace(
    "- {provider: oa, model: gpt-upstream}",
    "- {provider: oa, model: gpt-upstream, pricing: {input_per_mtok: 0.15, output_per_mtok: 0.6}}",
)


def test_a_budget_and_pricing_compile_to_integer_nano_units() -> None:
    text = PRICED + dedent(
        """\
        tiers:
          std:
            budget: {tokens_per_day: 2000000, cost_per_day: 5.0, cost_per_month: 100}
        auth: {default_tier: std}
        """
    )
    runtime = runtime_of(text)
    budget = runtime.tiers["std"].budget
    assert budget is not None
    assert (budget.tokens_per_day, budget.tokens_per_month) == (2_000_000, None)
    assert (budget.cost_per_day, budget.cost_per_month) == (5 * 10**9, 100 * 10**9)
    (deployment,) = runtime.routes["gpt"].deployments
    assert deployment.pricing is not None
    assert deployment.pricing.input_per_mtok == 150_000_000  # 0.15 per Mtok, in nano-units
    assert deployment.pricing.output_per_mtok == 600_000_000
    assert deployment.pricing.cost(1_000_000, 1_000_000) == 750_000_000


def test_a_tier_without_a_budget_has_none_and_a_budget_only_tier_has_no_limits() -> None:
    runtime = runtime_of(
        MINIMAL + "tiers:\n  plain: {requests_per_minute: 5}\n"
        "  metered: {budget: {tokens_per_month: 10}}\n"
    )
    assert runtime.tiers["plain"].budget is None
    assert runtime.tiers["metered"].limits is None
    assert runtime.tiers["metered"].budget is not None


def test_an_empty_budget_is_refused() -> None:
    message = error_of(MINIMAL + "tiers:\n  t: {budget: {}}\n")
    assert "tiers.t.budget" in message and "at least one of" in message


@pytest.mark.parametrize(
    "budget",
    ["{tokens_per_day: 0}", "{cost_per_day: 0}", "{cost_per_month: -1}", "{cost_per_day: 2000000}"],
)
def test_budget_values_out_of_range_are_refused(budget: str) -> None:
    assert "tiers.t.budget" in error_of(MINIMAL + f"tiers:\n  t: {{budget: {budget}}}\n")


def test_negative_prices_are_refused() -> None:
    text = MINIMAL.replace(
        "- {provider: oa, model: gpt-upstream}",
        "- {provider: oa, model: gpt-upstream, pricing: {input_per_mtok: -1, output_per_mtok: 1}}",
    )
    assert "pricing.input_per_mtok" in error_of(text)


def test_a_cost_budget_needs_a_price_on_every_deployment_it_reaches() -> None:
    text = MINIMAL + "tiers:\n  t: {budget: {cost_per_day: 1}}\n"
    message = runtime_error_of(text)
    assert "tiers.t.budget" in message and "models.gpt[0]" in message
    assert "oa/gpt-upstream" in message and "pricing" in message
    # A token budget needs no prices; a cost budget limited to priced models is fine.
    runtime_of(MINIMAL + "tiers:\n  t: {budget: {tokens_per_day: 1}}\n")
    both = PRICED + dedent(
        """\
          cheap:
            - {provider: oa, model: other}
        tiers:
          t: {budget: {cost_per_day: 1}, models: [gpt]}
        """
    )
    runtime_of(both)
    assert "models.cheap[0]" in runtime_error_of(both.replace(", models: [gpt]", ""))
