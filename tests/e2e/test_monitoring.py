"""The shipped monitoring (envoy/monitoring/) works out of the box: every metric the alerting
rules and the Grafana dashboard select exists, with the labels they select on, in a real Envoy's
`/stats/prometheus` after a short flow through the filter (issuance, a hit, a refusal, a
revocation, with keys fetched and etcd configured) and the shipped scrape config's relabelling
(which gives the native build's counters the Wasm build's names); the rules pass promtool's
checks and their unit tests."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

import stack

MONITORING = stack.ROOT / "envoy" / "monitoring"
RULES = MONITORING / "split-token.rules.yaml"
RULES_TESTS = MONITORING / "split-token.rules.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
SCRAPE = MONITORING / "prometheus-scrape.yaml"
PROMTOOL = stack.DEPS / "prometheus" / "usr" / "bin" / "promtool"

# The names the shipped files may select: the filter's counters and Envoy's own stats.
METRIC = r"(?:split_token|envoy)_[a-zA-Z0-9_]*"
# Label lists of aggregations and vector matching hold label names, not metrics.
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
SELECTOR = re.compile(rf"(?<![\w:])({METRIC})\s*(\{{[^}}]*\}})?")
# A selector by name pattern, for stats whose names embed the plugin's name (Istio's differs).
NAME_PATTERN = re.compile(r'\{[^}]*__name__\s*=~\s*"((?:[^"\\]|\\.)*)"[^}]*\}')
MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"')
# The Wasm VM's own stats (`envoy_wasm_...`): the native build has no VM, so none of them, and
# the rules and panels on them stay quiet.
WASM_VM_STAT = re.compile(r"(re:)?envoy_wasm_")


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
            for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))  # collapsed rows hold their panels
    return [(f"panel {panel.get('title')!r}", target["expr"])
            for panel in panels(dashboard["panels"]) for target in panel.get("targets", [])
            if "expr" in target]


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: value} of its `=` matchers) for every metric selector in `expr`; a
    `{__name__=~"re"}` selector gives ("re:<re>", {...})."""
    expr = LABEL_LIST.sub("", expr)
    found = []
    for pattern in NAME_PATTERN.findall(expr):
        found.append((f"re:{pattern}", {}))
    expr = NAME_PATTERN.sub("", expr)
    for name, braces in SELECTOR.findall(expr):
        equal = {label: value for label, op, value in MATCHER.findall(braces or "") if op == "="}
        found.append((name, equal))
    return found


def exposition(text: str) -> dict[str, list[dict[str, str]]]:
    """metric name -> the label sets of its series, from Prometheus text exposition."""
    series: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s", line)
        assert m, f"unparseable exposition line: {line!r}"
        labels = {k: v for k, _, v in MATCHER.findall(m.group(2) or "")}
        series.setdefault(m.group(1), []).append(labels)
    return series


def relabel(series: dict[str, list[dict[str, str]]], configs: list[dict]) -> dict:
    """`series` after Prometheus' `metric_relabel_configs` on the metric name: the `replace`
    action (the default) with `__name__` as source and target, as the shipped scrape config
    uses it (an anchored regex; `$1` in the replacement)."""
    for c in configs:
        assert c.get("action", "replace") == "replace" and c["source_labels"] == ["__name__"] \
            and c["target_label"] == "__name__", f"relabel rule this test cannot apply: {c}"
    renamed: dict[str, list[dict[str, str]]] = {}
    for name, label_sets in series.items():
        for c in configs:
            m = re.fullmatch(c["regex"], name)
            if m:
                name = m.expand(re.sub(r"\$\{?(\d+)\}?", r"\\\1", c.get("replacement", "$1")))
        renamed.setdefault(name, []).extend(label_sets)
    return renamed


def scrape_relabelling() -> list[dict]:
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    return job["metric_relabel_configs"]


def test_the_relabelling_gives_the_native_counters_the_wasm_names():
    series = {"envoy_dynamicmodulescustom_split_token_lookup_hit": [{}],
              "split_token_tokens_split": [{}], "envoy_cluster_upstream_rq_total": [{"a": "b"}]}
    assert relabel(series, scrape_relabelling()) == {
        "split_token_lookup_hit": [{}], "split_token_tokens_split": [{}],
        "envoy_cluster_upstream_rq_total": [{"a": "b"}]}


def test_the_scrape_config_passes_promtool_check():
    result = promtool("check", "config", SCRAPE.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_selector_parser_reads_what_the_files_write():
    """The check below is only as good as this parser: names in label lists and strings are
    not metrics, and `=` matchers are read with their values."""
    expr = ('sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="idp",'
            'envoy_response_code_class=~"5"}[5m])) / on(envoy_cluster_name) '
            'clamp_min(sum(rate(split_token_lookup_hit[5m])), 1) + '
            'sum(increase({__name__=~"envoy_wasm_(.+_)?split_token_vm_reload"}[1h]))')
    assert selectors(expr) == [("re:envoy_wasm_(.+_)?split_token_vm_reload", {}),
                               ("envoy_cluster_upstream_rq_xx", {"envoy_cluster_name": "idp"}),
                               ("split_token_lookup_hit", {})]


@pytest.fixture(scope="module")
def prometheus_series(start_gateway, start_etcd, idp) -> dict[str, list[dict[str, str]]]:
    """A gateway with the demo's filter settings (verification, claims, lifecycle) plus etcd,
    after a short flow through every kind of request the dashboards show."""
    etcd = start_etcd()
    demo = stack.filter_settings(stack.load_demo_config())
    gw = start_gateway({**demo, "etcd": {"cluster": "etcd"}}, name="envoy-monitoring",
                       extra_clusters=[stack.etcd_cluster(etcd.port)])
    stack.wait_for("keys fetched", lambda: gw.counter("keys.fetched") > 0)
    token = gw.token(sub="monitored")
    assert gw.call(f"Bearer {token}").status_code == 200
    assert gw.call("Bearer unknown").status_code == 401
    revoke = requests.post(gw.url + "/auth/revoke", data={"token": token}, auth=("demo", "secret"),
                           timeout=10)
    assert revoke.status_code == 200, revoke.text
    text = requests.get(f"http://127.0.0.1:{gw.envoy.admin_port}/stats/prometheus", timeout=10).text
    return relabel(exposition(text), scrape_relabelling())


def test_every_metric_the_rules_and_dashboard_select_exists_in_envoy(prometheus_series):
    expressions = rule_expressions() + dashboard_expressions()
    assert len(rule_expressions()) >= 5 and len(dashboard_expressions()) >= 10, "files look empty"
    missing = []
    for where, expr in expressions:
        found = selectors(expr)
        if not found:
            missing.append(f"{where}: selects no split_token_ or envoy_ metric: {expr}")
        if stack.HOST == "native":
            found = [(name, labels) for name, labels in found if not WASM_VM_STAT.match(name)]
        for name, labels in found:
            if name.startswith("re:"):
                pattern = re.compile(name[3:].encode().decode("unicode_escape"))
                if not any(pattern.fullmatch(n) for n in prometheus_series):
                    missing.append(f"{where}: no metric matches {name[3:]!r}")
                continue
            series = prometheus_series.get(name)
            if series is None:
                missing.append(f"{where}: no metric {name}")
            elif not any(labels.items() <= s.items() for s in series):
                missing.append(f"{where}: no series {name}{labels} (have {series[:4]})")
    assert not missing, "\n".join(missing)


def test_every_filter_counter_is_exported_under_its_prometheus_name(prometheus_series):
    """The filter's counters are where the files expect them: `split_token_<name>`, no prefix."""
    stats_rs = (stack.ROOT / "filter" / "core" / "src" / "stats.rs").read_text()
    names = re.findall(r'=> "(split_token\.[a-z_.]+)"', stats_rs)
    assert len(names) == int(re.search(r"ALL: \[Counter; (\d+)\]", stats_rs).group(1))
    expected = {name.replace(".", "_") for name in names}
    exported = {n for n in prometheus_series if n.startswith("split_token_")}
    assert exported == expected, (sorted(expected - exported), sorted(exported - expected))


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, cwd=MONITORING)


def test_the_rules_pass_promtool_check():
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_the_rules_pass_their_unit_tests():
    result = promtool("test", "rules", RULES_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_links_its_runbook_in_the_operations_guide():
    operations = (stack.ROOT / "docs" / "operations.md").read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.lstrip("#").strip()).lower().replace(" ", "-")
               for h in operations.splitlines() if h.startswith("#")}
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            runbook = rule["annotations"]["runbook"]
            doc, _, anchor = runbook.partition("#")
            assert doc.endswith("docs/operations.md"), f"{rule['alert']}: runbook {runbook}"
            assert anchor in anchors, f"{rule['alert']}: no heading #{anchor} in docs/operations.md"
            assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
