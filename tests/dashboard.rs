//! The Grafana dashboard (config/grafana/palisade.json), the alert rules (config/alerts.yml) and
//! the scrape example (config/prometheus.yml) against what a real Palisade exports: every
//! metric, label and literal label value their queries name is on a live /metrics page, every
//! panel reads the `${datasource}` variable and filters by the dashboard's variables, and every
//! rule is complete. With `promtool` on the PATH the files also pass `promtool check` and the
//! rules' unit tests (tests/alerts_test.yml).

mod common;
use common::*;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("config/grafana/palisade.json")).expect("dashboard is JSON")
}

fn alerts() -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read("config/alerts.yml")).expect("alerts.yml is YAML")
}

// ---- The exposition page ----

/// One metric family of a /metrics page: its type and every label value seen per label.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// The families of a Prometheus text page, by name (histogram series under their base name).
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has a kind");
            fams.entry(name.to_owned()).or_default().kind = kind.to_owned();
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _value) = line.rsplit_once(' ').expect("sample line has a value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').expect("labels end with }")),
            None => (series, ""),
        };
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| fams.get(*b).is_some_and(|f| f.kind == "histogram"))
            })
            .unwrap_or(name);
        let fam = fams
            .get_mut(base)
            .unwrap_or_else(|| panic!("sample {name} has no # TYPE line"));
        for (k, v) in parse_label_pairs(labels) {
            fam.labels.entry(k).or_default().insert(v);
        }
    }
    fams
}

/// `k="v",k2="v2"` (values with `\"` and `\\` escapes).
fn parse_label_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('='), "label {key} has no value in {s}");
        assert_eq!(
            chars.next(),
            Some('"'),
            "label {key} value is not quoted in {s}"
        );
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next().expect("escape")),
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key, value));
    }
}

// ---- A small PromQL tokenizer ----

/// A label matcher in a selector: `label op "value"`.
#[derive(Debug, Clone)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// A series selector: the name as written and its family name (without `_bucket` etc.).
#[derive(Debug, Clone)]
struct Selector {
    written: String,
    family: String,
    matchers: Vec<Matcher>,
}

/// What a PromQL expression refers to: Palisade selectors, other metric names, and the label
/// lists of `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`.
#[derive(Debug, Default)]
struct Refs {
    selectors: Vec<Selector>,
    other_metrics: Vec<String>,
    grouping: Vec<Vec<String>>,
    /// The `by` lists among `grouping`.
    by: Vec<Vec<String>>,
}

const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "rate",
    "increase",
    "histogram_quantile",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "max_over_time",
    "min_over_time",
    "label_values",
    "humanizePercentage",
];

const GROUPING_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Splits `expr` into the selectors and label lists it uses.
fn tokenize(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let read_string = |i: usize| -> (String, usize) {
        let quote = chars[i];
        let mut j = i + 1;
        let mut s = String::new();
        while j < chars.len() && chars[j] != quote {
            if chars[j] == '\\' && quote != '`' {
                j += 1;
            }
            s.push(chars[j]);
            j += 1;
        }
        assert!(j < chars.len(), "unterminated string in {expr}");
        (s, j + 1)
    };
    let read_ident = |mut i: usize| -> (String, usize) {
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        (chars[start..i].iter().collect(), i)
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = read_string(i).1;
        } else if c == '$' {
            i = read_ident(i + 1).1;
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let (word, j) = read_ident(i);
            let k = skip_ws(j);
            let next = chars.get(k).copied();
            if GROUPING_WORDS.contains(&word.as_str()) {
                if next == Some('(') {
                    let end = k + chars[k..].iter().position(|c| *c == ')').expect("group )");
                    let list: String = chars[k + 1..end].iter().collect();
                    let labels: Vec<String> = list
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty())
                        .collect();
                    if word == "by" {
                        refs.by.push(labels.clone());
                    }
                    refs.grouping.push(labels);
                    i = end + 1;
                } else {
                    i = j;
                }
                continue;
            }
            let mut matchers = Vec::new();
            let mut end = j;
            if next == Some('{') {
                let mut m = k + 1;
                loop {
                    m = skip_ws(m);
                    match chars.get(m) {
                        Some('}') => break,
                        Some(',') => m += 1,
                        Some(c) if is_ident_start(*c) => {
                            let (label, after) = read_ident(m);
                            let op_start = skip_ws(after);
                            let op_len = chars[op_start..]
                                .iter()
                                .take_while(|c| matches!(c, '=' | '!' | '~'))
                                .count();
                            let op: String = chars[op_start..op_start + op_len].iter().collect();
                            assert!(
                                ["=", "!=", "=~", "!~"].contains(&op.as_str()),
                                "bad matcher operator {op:?} in {expr}"
                            );
                            let (value, after) = read_string(skip_ws(op_start + op_len));
                            matchers.push(Matcher { label, op, value });
                            m = after;
                        }
                        other => panic!("unexpected {other:?} in a selector of {expr}"),
                    }
                }
                end = m + 1;
            }
            let is_call = next == Some('(');
            if word.starts_with("palisade_") {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(&word)
                    .to_owned();
                refs.selectors.push(Selector {
                    written: word,
                    family,
                    matchers,
                });
            } else if !is_call && !PROMQL_WORDS.contains(&word.as_str()) {
                refs.other_metrics.push(word);
            }
            i = end;
        } else {
            i += 1;
        }
    }
    refs
}

/// A query or expression and where it came from, for messages.
struct Query {
    origin: String,
    expr: String,
    /// For `label_values(selector, label)`: the label.
    label_of_values: Option<String>,
}

/// Every query of the dashboard: panel targets and template variables.
fn dashboard_queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                origin: format!("panel {:?} target {}", p["title"], t["refId"]),
                expr: t["expr"].as_str().expect("target has an expr").to_owned(),
                label_of_values: None,
            });
        }
    }
    for v in variables(d) {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .expect("query variable has a query");
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {} is not label_values(...): {q}", v["name"]));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        out.push(Query {
            origin: format!("variable {}", v["name"]),
            expr: selector.trim().to_owned(),
            label_of_values: Some(label.trim().to_owned()),
        });
    }
    out
}

/// Every alert rule's expression.
fn alert_queries(a: &serde_yaml_ng::Value) -> Vec<Query> {
    rules(a)
        .iter()
        .map(|r| Query {
            origin: format!("alert {}", r["alert"].as_str().unwrap_or("?")),
            expr: r["expr"].as_str().expect("rule has an expr").to_owned(),
            label_of_values: None,
        })
        .collect()
}

fn rules(a: &serde_yaml_ng::Value) -> Vec<serde_yaml_ng::Value> {
    a["groups"]
        .as_sequence()
        .expect("alerts.yml has groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("group has rules").clone())
        .collect()
}

/// Every panel, rows' nested panels included.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("dashboard has panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn variables(d: &Value) -> &Vec<Value> {
    d["templating"]["list"]
        .as_array()
        .expect("dashboard has templating.list")
}

/// Checks `q` against the scraped families and returns the labels its result carries: those
/// every `by` list keeps, or without one the referenced families' labels and the target labels.
fn check_query(q: &Query, fams: &BTreeMap<String, Family>) -> BTreeSet<String> {
    let refs = tokenize(&q.expr);
    let o = &q.origin;
    assert!(
        !refs.selectors.is_empty() || !refs.other_metrics.is_empty(),
        "{o}: no metric in {:?}",
        q.expr
    );
    let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    for s in &refs.selectors {
        let fam = fams.get(&s.family).unwrap_or_else(|| {
            panic!(
                "{o}: {} is not exported (no `# TYPE {}` on /metrics)",
                s.written, s.family
            )
        });
        if s.written != s.family {
            assert_eq!(
                fam.kind, "histogram",
                "{o}: {} of a {}",
                s.written, fam.kind
            );
        }
        for m in &s.matchers {
            if TARGET_LABELS.contains(&m.label.as_str()) {
                continue;
            }
            let values = fam
                .labels
                .get(&m.label)
                .unwrap_or_else(|| panic!("{o}: {} has no label {}", s.family, m.label));
            if m.op == "=" && !m.value.contains('$') {
                assert!(
                    values.contains(&m.value),
                    "{o}: no {}{{{}=\"{}\"}} series; seen {values:?}",
                    s.family,
                    m.label,
                    m.value
                );
            }
        }
        labels.extend(fam.labels.keys().cloned());
    }
    for m in &refs.other_metrics {
        assert_eq!(m, "up", "{o}: unknown metric {m}");
    }
    for list in &refs.grouping {
        for l in list {
            assert!(
                labels.contains(l),
                "{o}: groups by {l}, which none of its metrics has ({labels:?})"
            );
        }
    }
    if let Some(l) = &q.label_of_values {
        let s = refs
            .selectors
            .first()
            .expect("label_values of a Palisade metric");
        assert!(
            TARGET_LABELS.contains(&l.as_str()) || fams[&s.family].labels.contains_key(l),
            "{o}: {} has no label {l}",
            s.family
        );
    }
    let mut by = refs.by.iter().map(|l| l.iter().cloned().collect());
    match by.next() {
        Some(first) => by.fold(first, |acc: BTreeSet<String>, l: BTreeSet<String>| {
            acc.intersection(&l).cloned().collect()
        }),
        None => labels,
    }
}

fn live_config(replicas: &[String], dead_redis: &str) -> String {
    let list: Vec<String> = replicas.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "{}[cache]\nredis = {{ url = \"redis://{dead_redis}/0\", timeout = \"50ms\" }}\n\n\
         [rate_limit]\nredis = {{ url = \"redis://{dead_redis}/0\", timeout = \"20ms\", on_error = \"local\" }}\n\n\
         [upstreams.legacy]\nreplicas = [{}]\nretry = {{ attempts = 1, on = [\"connect\", \"503\"], budget = \"20%\" }}\n\n\
         [upstreams.legacy.health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\n\n\
         [upstreams.legacy.circuit_breaker]\nconsecutive_failures = 5\n\n\
         [[routes]]\nname = \"products\"\nmatch = {{ path_prefix = \"/products\" }}\nupstream = \"legacy\"\n\
         cache = {{ ttl = \"60s\" }}\nrate_limit = {{ per = \"client_ip\", limit = \"3/min\", burst = 3 }}\n\n\
         [[routes]]\nname = \"default\"\nupstream = \"legacy\"\n",
        base_config(""),
        list.join(", ")
    )
}

/// Every query of the dashboard and the alert rules names only metrics, labels and label
/// values a running Palisade exports once it has served, cached, limited, retried, failed to
/// reach Redis and rejected a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    bounded(60, async {
        let a = Upstream::start("a");
        let b = Upstream::start("b");
        let dead = dead_addr();
        let config = live_config(&[a.url(), b.url()], &dead.to_string());
        let p = Palisade::start(&config).await;
        let c = http1();
        let mut codes = Vec::new();
        for _ in 0..4 {
            codes.push(get(&c, &p.url("/products/1"), &[]).await.status.as_u16());
        }
        assert_eq!(codes, [200, 200, 200, 429], "miss, hit, hit, limited");
        let r = get(&c, &p.url("/other?status=503"), &[]).await;
        assert_eq!(r.status, 503);
        let rejected = p.reload("not toml [").await;
        assert_eq!(
            rejected["message"],
            "config reload rejected; keeping the running config"
        );

        let text = p.metrics().await;
        for (name, labels) in [
            (
                "palisade_cache_lookups_total",
                &[("route", "products"), ("result", "hit")][..],
            ),
            (
                "palisade_cache_lookups_total",
                &[("route", "products"), ("result", "miss")],
            ),
            (
                "palisade_ratelimit_decisions_total",
                &[("route", "products"), ("decision", "limited")],
            ),
            ("palisade_retries_total", &[("upstream", "legacy")]),
            ("palisade_redis_errors_total", &[("use", "cache")]),
            ("palisade_redis_errors_total", &[("use", "ratelimit")]),
            ("palisade_config_reloads_total", &[("result", "error")]),
            (
                "palisade_requests_total",
                &[("route", "default"), ("code", "503")],
            ),
        ] {
            let v = metric_value(&text, name, labels).unwrap_or(0.0);
            assert!(v >= 1.0, "{name}{labels:?} is {v}\n{text}");
        }
        let fams = families(&text);

        let d = dashboard();
        let queries = dashboard_queries(&d);
        assert!(
            queries.len() > 20,
            "only {} dashboard queries",
            queries.len()
        );
        let mut used = HashSet::new();
        for q in &queries {
            check_query(q, &fams);
            for s in tokenize(&q.expr).selectors {
                used.insert(s.family.clone());
                let has = |label: &str, var: &str| {
                    s.matchers
                        .iter()
                        .any(|m| m.label == label && m.op == "=~" && m.value == var)
                };
                if q.label_of_values.is_none() {
                    assert!(
                        has("instance", "$instance"),
                        "{}: {} not filtered by $instance",
                        q.origin,
                        s.written
                    );
                }
                for (label, var) in [("route", "$route"), ("upstream", "$upstream")] {
                    let own = q.label_of_values.as_deref() == Some(label);
                    if fams[&s.family].labels.contains_key(label) && !own {
                        assert!(
                            has(label, var),
                            "{}: {} not filtered by {var}",
                            q.origin,
                            s.written
                        );
                    }
                }
            }
        }
        let unshown: Vec<&String> = fams.keys().filter(|f| !used.contains(*f)).collect();
        assert!(unshown.is_empty(), "no panel shows {unshown:?}");

        let a = alerts();
        for q in alert_queries(&a) {
            let out = check_query(&q, &fams);
            let rule = rules(&a)
                .into_iter()
                .find(|r| format!("alert {}", r["alert"].as_str().unwrap()) == q.origin)
                .unwrap();
            for (_, text) in rule["annotations"].as_mapping().expect("annotations") {
                let text = text.as_str().expect("annotation is a string");
                for part in text.split("$labels.").skip(1) {
                    let label: String = part.chars().take_while(|c| is_ident(*c)).collect();
                    assert!(
                        out.contains(&label),
                        "{}: annotation uses $labels.{label}, not in its result {out:?}",
                        q.origin
                    );
                }
            }
        }
    })
    .await;
}

/// The dashboard's shape: Grafana 10/11 schema, the variables, one data source variable used
/// by every panel, target and variable query, unique panel ids, a description on every panel,
/// and rows grouping the panels in a 24-column grid.
#[test]
fn dashboard_structure() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["uid"].is_string() && d["title"] == "Palisade");
    assert!(d["id"].is_null(), "an importable dashboard has no id");

    let vars = variables(&d);
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for (name, metric) in [
        ("route", "palisade_requests_total"),
        ("upstream", "palisade_upstream_requests_total"),
        ("instance", "palisade_build_info"),
    ] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["multi"], true, "{name} is multi-value");
        assert_eq!(v["includeAll"], true, "{name} has All");
        let q = v["query"]["query"].as_str().expect("query");
        assert!(
            q.starts_with(&format!("label_values({metric}")) && q.ends_with(&format!(", {name})")),
            "{name}: {q}"
        );
    }
    let uses_ds = |x: &Value| x["datasource"]["uid"] == "${datasource}";
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(
            uses_ds(v),
            "variable {} datasource {}",
            v["name"],
            v["datasource"]
        );
    }

    let panels = all_panels(&d);
    let mut ids = HashSet::new();
    let mut rows = Vec::new();
    for p in &panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap() > 0,
            "{}: {g}",
            p["title"]
        );
        if p["type"] == "row" {
            rows.push(p["title"].as_str().unwrap().to_owned());
            continue;
        }
        let title = &p["title"];
        assert!(
            ["timeseries", "stat", "state-timeline"].contains(&p["type"].as_str().unwrap()),
            "{title}: type {}",
            p["type"]
        );
        assert!(uses_ds(p), "{title}: datasource {}", p["datasource"]);
        let desc = p["description"].as_str().unwrap_or("");
        assert!(desc.len() > 60, "{title}: description {desc:?}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert!(
                uses_ds(t),
                "{title} {}: datasource {}",
                t["refId"],
                t["datasource"]
            );
        }
    }
    assert_eq!(
        rows,
        [
            "Traffic",
            "Latency",
            "Cache",
            "Rate limits",
            "Upstreams",
            "Redis & config"
        ]
    );
    let circuit = panels
        .iter()
        .find(|p| p["title"] == "Circuit state")
        .expect("circuit panel");
    let mapped: BTreeMap<String, String> = circuit["fieldConfig"]["defaults"]["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["options"].as_object().unwrap().clone())
        .map(|(k, v)| (k, v["text"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        mapped,
        BTreeMap::from([
            ("0".into(), "closed".into()),
            ("1".into(), "half-open".into()),
            ("2".into(), "open".into())
        ])
    );

    let readme = read("README.md");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap();
        assert!(
            readme.contains(&format!("**{title}**")),
            "README does not describe panel {title:?}"
        );
    }
}

/// Each alert rule is complete (name, expression, `for`, severity, summary and description),
/// named in the README and exercised by tests/alerts_test.yml; the scrape example scrapes the
/// admin listener's /metrics as the job the rules name and loads alerts.yml. With promtool on
/// the PATH: `promtool check config`, `check rules` (also on every dashboard query, as
/// recording rules) and `test rules` pass.
#[test]
fn alert_rules_and_scrape_config() {
    let a = alerts();
    let readme = read("README.md");
    let unit_tests = read("tests/alerts_test.yml");
    let mut names = HashSet::new();
    let all = rules(&a);
    assert!(all.len() >= 6, "{} rules", all.len());
    for r in &all {
        let name = r["alert"].as_str().expect("every rule is an alert");
        assert!(names.insert(name.to_owned()), "{name} twice");
        assert!(name.starts_with("Palisade"), "{name}");
        assert!(
            r["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "{name}: expr"
        );
        let f = r["for"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no for"));
        let digits = f.trim_end_matches(['s', 'm', 'h']);
        assert!(
            !digits.is_empty() && digits.len() < f.len() && digits.parse::<u32>().is_ok(),
            "{name}: for {f:?}"
        );
        let sev = r["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["critical", "warning", "info"].contains(&sev),
            "{name}: severity {sev:?}"
        );
        for key in ["summary", "description"] {
            let t = r["annotations"][key].as_str().unwrap_or("");
            assert!(
                t.contains("{{ $labels."),
                "{name}: {key} names no label: {t:?}"
            );
        }
        assert!(
            readme.contains(&format!("`{name}`")),
            "README does not describe {name}"
        );
        assert!(
            unit_tests.contains(&format!("alertname: {name}")),
            "tests/alerts_test.yml does not test {name}"
        );
    }
    for q in alert_queries(&a) {
        let refs = tokenize(&q.expr);
        for m in refs.other_metrics {
            assert_eq!(m, "up", "{}: {m}", q.origin);
        }
    }

    let prom: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("config/prometheus.yml")).expect("prometheus.yml is YAML");
    let files: Vec<&str> = prom["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(files, ["alerts.yml"]);
    let job = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"] == "palisade")
        .expect("a palisade job");
    assert_eq!(job["metrics_path"], "/metrics");
    let targets = job["static_configs"][0]["targets"].as_sequence().unwrap();
    assert!(targets.iter().any(|t| t == "127.0.0.1:9901"), "{targets:?}");
    assert!(read("config/alerts.yml").contains("up{job=\"palisade\"}"));

    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("promtool is not on the PATH: checked the files' structure only");
        return;
    }
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    promtool(&["check", "config", "config/prometheus.yml"]);
    promtool(&["check", "rules", "config/alerts.yml"]);
    promtool(&["test", "rules", "tests/alerts_test.yml"]);

    let dir = tempfile::tempdir().unwrap();
    let mut recording = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, q) in dashboard_queries(&dashboard()).iter().enumerate() {
        let expr = q
            .expr
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("$route", ".*")
            .replace("$upstream", ".*");
        recording.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let path = dir.path().join("dashboard_rules.yml");
    std::fs::write(&path, recording).unwrap();
    promtool(&["check", "rules", path.to_str().unwrap()]);
}

#[test]
fn tokenizer_finds_selectors_matchers_and_groupings() {
    let r = tokenize(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(palisade_request_duration_seconds_bucket{instance=~"$instance", route=~"a,b}"}[$__rate_interval]))) / on (route) group_left up"#,
    );
    assert_eq!(r.selectors.len(), 1);
    let s = &r.selectors[0];
    assert_eq!(s.written, "palisade_request_duration_seconds_bucket");
    assert_eq!(s.family, "palisade_request_duration_seconds");
    let m: Vec<(&str, &str, &str)> = s
        .matchers
        .iter()
        .map(|m| (m.label.as_str(), m.op.as_str(), m.value.as_str()))
        .collect();
    assert_eq!(
        m,
        [("instance", "=~", "$instance"), ("route", "=~", "a,b}")]
    );
    assert_eq!(r.grouping, [vec!["le", "route"], vec!["route"]]);
    assert_eq!(r.by, [vec!["le", "route"]]);
    assert_eq!(r.other_metrics, ["up"]);

    let fams = families(
        "# TYPE palisade_x_seconds histogram\npalisade_x_seconds_bucket{r=\"a\\\"b\",le=\"0.1\"} 1\npalisade_x_seconds_sum{r=\"c\"} 1\n",
    );
    let f = &fams["palisade_x_seconds"];
    assert_eq!(f.kind, "histogram");
    assert_eq!(
        f.labels["r"],
        BTreeSet::from(["a\"b".to_owned(), "c".to_owned()])
    );
    assert!(f.labels["le"].contains("0.1"));
}
