"""deploy/prometheus: promtool accepts the scrape config and the alerting rules, the rules' unit
tests pass and cover every alert, and every metric and label the rules (and their tests) use
is one that gateway.metrics exports (or that Prometheus records itself for each scrape, such
as `up`), so that renaming a metric, a label or the scrape job breaks this test rather than
silently muting an alert."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.metrics import ERROR_OUTCOMES, Metrics
from tests.support import require_binary

ROOT = Path(__file__).parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"

# Labels Prometheus attaches to every scraped series (the target's).
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus itself records for every scrape of a target, with the target's labels only.
SCRAPE_SERIES = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)
# Series each metric type exposes (prometheus_client adds `_total` to counters' names).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def promtool(*args: str) -> None:
    binary = require_binary("promtool")
    # From the repository root with relative paths, as the comments in the files say to run
    # it: promtool resolves rule_files against the referring file, not the working directory.
    proc = subprocess.run(
        [binary, *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, (
        f"promtool {' '.join(args)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )


@pytest.mark.server
def test_promtool_accepts_the_scrape_config() -> None:
    # Also checks the rule files it names; static targets need not resolve.
    promtool("check", "config", "--lint=all", "--lint-fatal", str(CONFIG.relative_to(ROOT)))


@pytest.mark.server
def test_promtool_accepts_the_alerting_rules() -> None:
    promtool("check", "rules", "--lint=all", "--lint-fatal", str(ALERTS.relative_to(ROOT)))


@pytest.mark.server
def test_alerting_rules_unit_tests_pass() -> None:
    promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))


# --- the metrics the rules use ---------------------------------------------------------------


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Every series name a fresh Metrics() exposes -> the label names it carries once scraped."""
    metrics = Metrics()
    # prometheus_client has no public accessor for a family's label names.
    labels = {
        family.name: frozenset(wrapper._labelnames)
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
        for family in wrapper.describe()
    }
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        for suffix in SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = labels.get(family.name, frozenset()) | extra
    return series


def queryable_series() -> dict[str, frozenset[str]]:
    """What a query of the gateway's job can select: its exported series and the scrape's own
    (whose labels are the target labels every series has anyway)."""
    return exported_series() | dict.fromkeys(SCRAPE_SERIES, frozenset[str]())


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


@dataclass(frozen=True)
class Query:
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]  # labels in by / without / on / ignoring / group_* clauses


_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<string>"(?:\\.|[^"\\])*")
    | (?P<matchers>\{[^}]*\})
    | (?P<range>\[[^\]]*\])
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<paren>[(),])
    | (?P<operator>[-+*/%^<>=!]+)
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"\s*,?')
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
# `sum by (x) (...)`: an aggregation is followed by its grouping clause, not its parenthesis.
_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile"}
)


def parse_query(expr: str) -> Query:
    """The selectors and grouping labels of a PromQL expression: enough of PromQL for these
    rules. Text it cannot tokenise (an @ modifier, say) fails the test rather than being
    skipped."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        assert match is not None, f"cannot read {expr[pos : pos + 20]!r} in {expr!r}"
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        pos = match.end()

    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in _GROUPING:
            if following == ("paren", "("):
                i += 2
                while tokens[i] != ("paren", ")"):
                    if tokens[i][0] == "ident":
                        grouping.add(tokens[i][1])
                    i += 1
        elif (
            kind == "ident"
            and text.lower() not in _KEYWORDS
            and following != ("paren", "(")
            and not (text in _AGGREGATIONS and following[1] in _GROUPING)
        ):
            matchers: tuple[tuple[str, str, str], ...] = ()
            if following[0] == "matchers":
                matchers = parse_matchers(following[1])
                i += 1
            selectors.append(Selector(text, matchers))
        else:
            assert kind != "matchers", f"a selector without a metric name in {expr!r}"
        i += 1
    return Query(tuple(selectors), frozenset(grouping))


def parse_matchers(block: str) -> tuple[tuple[str, str, str], ...]:
    inner = block[1:-1]
    found = list(_MATCHER.finditer(inner))
    rebuilt = "".join(m.group() for m in found)
    assert rebuilt.strip() == inner.strip(), f"cannot read the matchers {block!r}"
    return tuple((m[1], m[2], m[3]) for m in found)


def alerting_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_the_query_reader_finds_metrics_and_labels() -> None:
    query = parse_query(
        'sum by (a, b) (rate(m_total{x="1", y=~"p|q"}[5m])) / on (a) group_left '
        "max without (c) (g) > 0.5 and other offset 5m"
    )
    assert query.selectors == (
        Selector("m_total", (("x", "=", "1"), ("y", "=~", "p|q"))),
        Selector("g", ()),
        Selector("other", ()),
    )
    assert query.grouping == {"a", "b", "c"}


def test_every_metric_the_rules_use_is_exported() -> None:
    exported = queryable_series()
    for name, rule in alerting_rules().items():
        query = parse_query(rule["expr"])
        assert query.selectors, f"{name}: no metric found in its expr"
        unknown = {s.metric for s in query.selectors} - exported.keys()
        assert not unknown, f"{name} uses {sorted(unknown)}, which gateway.metrics does not export"


def test_every_label_the_rules_use_is_exported() -> None:
    exported = queryable_series()
    for name, rule in alerting_rules().items():
        query = parse_query(rule["expr"])
        available: set[str] = set(TARGET_LABELS)
        for selector in query.selectors:
            assert selector.metric in exported, f"{name}: no metric {selector.metric}"
            labels = exported[selector.metric] | TARGET_LABELS
            available |= labels
            used = {label for label, _, _ in selector.matchers}
            assert used <= labels, f"{name}: {selector.metric} has no label {sorted(used - labels)}"
        assert query.grouping <= available, f"{name} groups by {sorted(query.grouping - available)}"
        # What the annotations print must survive the aggregation.
        printed = set(re.findall(r"\$labels\.(\w+)", str(rule.get("annotations", {}))))
        kept = query.grouping or available
        assert printed <= kept, f"{name} prints {sorted(printed - kept)}, which its expr drops"


def test_the_unit_tests_feed_series_the_gateway_exports() -> None:
    exported = queryable_series()
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    series = [s["series"] for test in tests for s in test["input_series"]]
    assert series
    for text in series:
        (selector,) = parse_query(text).selectors
        assert selector.metric in exported, f"{text}: no such metric in gateway.metrics"
        labels = {label for label, _, _ in selector.matchers}
        extra = labels - exported[selector.metric] - TARGET_LABELS
        assert not extra, f"{text}: gateway.metrics has no label {sorted(extra)}"


def test_error_rate_alert_counts_exactly_the_error_outcomes() -> None:
    query = parse_query(alerting_rules()["LLMGatewayHighErrorRate"]["expr"])
    regexes = [
        value
        for selector in query.selectors
        for label, op, value in selector.matchers
        if label == "outcome" and op == "=~"
    ]
    assert len(regexes) == 1, regexes
    assert sorted(regexes[0].split("|")) == sorted(ERROR_OUTCOMES), "not ERROR_OUTCOMES"


def test_every_alert_says_how_urgent_it_is_and_what_to_do() -> None:
    rules = alerting_rules()
    assert {
        "GatewayDown",
        "LLMGatewayHighTTFT",
        "LLMGatewayHighErrorRate",
        "LLMGatewayUpstreamKeyDisabled",
        "LLMGatewayLimiterWithoutRedis",
    } <= rules.keys()
    for name, rule in rules.items():
        assert rule.get("for"), f"{name} has no `for:`"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", ())}
    untested = alerting_rules().keys() - tested
    assert not untested, f"alerts_test.yml never evaluates {sorted(untested)}"
    # And each is shown firing at least once, not only staying quiet.
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", ())
        if case.get("exp_alerts")
    }
    assert not alerting_rules().keys() - firing, sorted(alerting_rules().keys() - firing)


def test_the_rules_select_the_job_prometheus_scrapes() -> None:
    # A `job` matcher naming a job the scrape config does not have matches nothing, ever:
    # GatewayDown (`up{job=...} == 0`) would stay silent while every gateway is down.
    jobs = {job["job_name"] for job in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}
    for name, rule in alerting_rules().items():
        for selector in parse_query(rule["expr"]).selectors:
            for label, op, value in selector.matchers:
                if label == "job":
                    assert (op, value) in {("=", job) for job in jobs}, f"{name}: job {value!r}"
    gateway_down = parse_query(alerting_rules()["GatewayDown"]["expr"])
    assert [s.metric for s in gateway_down.selectors] == ["up"]
    assert ("job", "=", "llm-gateway") in gateway_down.selectors[0].matchers
