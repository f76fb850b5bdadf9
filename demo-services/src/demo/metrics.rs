//! Reading the sidecars' `/metrics` (Prometheus text format) for the demo's summary.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
}

/// Parses the text format; comments and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)),
        None => (head, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    labels
}

/// `current` with `earlier`'s values added (for counters of a process that restarted in between).
pub fn merge(mut current: Vec<Sample>, earlier: &[Sample]) -> Vec<Sample> {
    for old in earlier {
        match current
            .iter_mut()
            .find(|s| s.name == old.name && s.labels == old.labels)
        {
            Some(s) => s.value += old.value,
            None => current.push(old.clone()),
        }
    }
    current
}

/// The sum of `name`'s samples whose labels include every pair of `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && filter.iter().all(|(k, v)| s.label(k) == *v))
        .map(|s| s.value)
        .sum()
}

/// The `q` quantile (0..1) of a histogram, from its cumulative `_bucket` samples matching
/// `filter`, interpolated linearly inside the bucket as Prometheus' `histogram_quantile` does.
pub fn quantile(
    samples: &[Sample],
    histogram: &str,
    filter: &[(&str, &str)],
    q: f64,
) -> Option<f64> {
    let bucket_name = format!("{histogram}_bucket");
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new(); // le bits -> (le, count)
    for s in samples
        .iter()
        .filter(|s| s.name == bucket_name && filter.iter().all(|(k, v)| s.label(k) == *v))
    {
        let le: f64 = match s.label("le") {
            "+Inf" => f64::INFINITY,
            other => other.parse().ok()?,
        };
        buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
    }
    let mut buckets: Vec<(f64, f64)> = buckets.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            let fraction = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * fraction);
        }
        prev = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP outrider_requests_total Requests.
outrider_requests_total{code="200",direction="outbound",service="user-service"} 7
outrider_requests_total{code="503",direction="outbound",service="user-service"} 2
outrider_requests_total{code="200",direction="inbound",service="gateway"} 4
d_bucket{service="a",le="0.01"} 50
d_bucket{service="a",le="0.1"} 90
d_bucket{service="a",le="1"} 100
d_bucket{service="a",le="+Inf"} 100
"#;

    #[test]
    fn sums_by_labels() {
        let s = parse(TEXT);
        assert_eq!(
            sum(&s, "outrider_requests_total", &[("direction", "outbound")]),
            9.0
        );
        assert_eq!(
            sum(
                &s,
                "outrider_requests_total",
                &[("service", "user-service"), ("code", "503")]
            ),
            2.0
        );
    }

    #[test]
    fn merge_adds_counters() {
        let a = parse("x{a=\"1\"} 2\ny 1\n");
        let b = parse("x{a=\"1\"} 3\nz 4\n");
        let m = merge(a, &b);
        assert_eq!(sum(&m, "x", &[("a", "1")]), 5.0);
        assert_eq!(sum(&m, "z", &[]), 4.0);
        assert_eq!(sum(&m, "y", &[]), 1.0);
    }

    #[test]
    fn quantiles_interpolate() {
        let s = parse(TEXT);
        let p50 = quantile(&s, "d", &[("service", "a")], 0.5).unwrap_or(-1.0);
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p99 = quantile(&s, "d", &[("service", "a")], 0.99).unwrap_or(-1.0);
        assert!((p99 - 0.91).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&s, "d", &[("service", "b")], 0.5), None);
    }
}
