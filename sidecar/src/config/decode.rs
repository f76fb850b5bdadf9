//! Small typed readers over the spanned YAML tree. Each reader reports its own problems (with
//! position and dotted path) into a shared [`Problems`] list and returns `None` on failure, so one
//! pass over a file finds every problem instead of stopping at the first as serde would.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::yaml::{Node, Pos, Value};

/// One problem found in a config: where, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub pos: Pos,
    pub path: String,
    pub message: String,
    /// The environment variable the value came from, if not from the file.
    pub env: Option<String>,
}

impl Problem {
    /// `FILE:LINE:COL: field.path: message`, the format `outrider check` prints.
    pub fn render(&self, file: &str) -> String {
        match &self.env {
            Some(var) => format!(
                "{file}:{}:{}: {}: {} (from environment variable {var})",
                self.pos.line, self.pos.col, self.path, self.message
            ),
            None => format!(
                "{file}:{}:{}: {}: {}",
                self.pos.line, self.pos.col, self.path, self.message
            ),
        }
    }
}

/// Collects problems (fatal) and warnings while decoding.
#[derive(Default)]
pub struct Problems {
    errors: RefCell<Vec<Problem>>,
    warnings: RefCell<Vec<Problem>>,
}

impl Problems {
    pub fn error(&self, node: &Node, path: &str, message: impl Into<String>) {
        self.errors.borrow_mut().push(Problem {
            pos: node.pos,
            path: path.to_string(),
            message: message.into(),
            env: node.from_env.clone(),
        });
    }

    pub fn error_at(&self, pos: Pos, path: &str, message: impl Into<String>) {
        self.errors.borrow_mut().push(Problem {
            pos,
            path: path.to_string(),
            message: message.into(),
            env: None,
        });
    }

    pub fn warn(&self, node: &Node, path: &str, message: impl Into<String>) {
        self.warnings.borrow_mut().push(Problem {
            pos: node.pos,
            path: path.to_string(),
            message: message.into(),
            env: node.from_env.clone(),
        });
    }

    /// Errors sorted by position, duplicates removed (merged policy trees can repeat one).
    pub fn into_parts(self) -> (Vec<Problem>, Vec<Problem>) {
        let mut errors = self.errors.into_inner();
        errors.sort();
        errors.dedup();
        let mut warnings = self.warnings.into_inner();
        warnings.sort();
        warnings.dedup();
        (errors, warnings)
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A mapping whose keys were checked against the allowed set.
pub struct Fields<'a> {
    pub node: &'a Node,
    pub path: String,
    entries: &'a [(String, Pos, Node)],
}

impl<'a> Fields<'a> {
    /// Reads `node` as a mapping with only `allowed` keys; reports unknown keys and non-mappings.
    /// A null node (an empty `key:`) is read as an empty mapping.
    pub fn new(p: &Problems, node: &'a Node, path: &str, allowed: &[&str]) -> Option<Self> {
        match &node.value {
            Value::Map(entries) => {
                for (key, key_pos, _) in entries {
                    if !allowed.contains(&key.as_str()) {
                        let mut message = format!("unknown key `{key}`");
                        if let Some(close) = closest(key, allowed) {
                            message.push_str(&format!(" (did you mean `{close}`?)"));
                        }
                        p.error_at(*key_pos, &join(path, key), message);
                    }
                }
                Some(Self {
                    node,
                    path: path.to_string(),
                    entries,
                })
            }
            Value::Null => Some(Self {
                node,
                path: path.to_string(),
                entries: &[],
            }),
            _ => {
                p.error(
                    node,
                    path_or_root(path),
                    format!("expected a mapping, found {}", node.type_name()),
                );
                None
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<(&'a Node, String)> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, v)| (v, join(&self.path, key)))
    }

    /// Like `get`, but a missing key is reported as required.
    pub fn require(&self, p: &Problems, key: &str) -> Option<(&'a Node, String)> {
        let found = self.get(key);
        if found.is_none() {
            p.error(self.node, &join(&self.path, key), "required key is missing");
        }
        found
    }
}

fn path_or_root(path: &str) -> &str {
    if path.is_empty() { "(root)" } else { path }
}

/// The allowed key nearest to a misspelt one, if it is close enough to be a likely typo.
fn closest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    allowed
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

pub fn string(p: &Problems, node: &Node, path: &str) -> Option<String> {
    match &node.value {
        Value::Str(s) if !s.is_empty() => Some(s.clone()),
        Value::Str(_) => {
            p.error(node, path, "must not be empty");
            None
        }
        Value::Int(i) => Some(i.to_string()),
        _ => {
            p.error(
                node,
                path,
                format!("expected a string, found {}", node.type_name()),
            );
            None
        }
    }
}

pub fn boolean(p: &Problems, node: &Node, path: &str) -> Option<bool> {
    match &node.value {
        Value::Bool(b) => Some(*b),
        Value::Str(s) if s == "true" => Some(true),
        Value::Str(s) if s == "false" => Some(false),
        _ => {
            p.error(
                node,
                path,
                format!("expected true or false, found {}", node.type_name()),
            );
            None
        }
    }
}

pub fn integer(p: &Problems, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
    let value = match &node.value {
        Value::Int(i) => Some(*i),
        Value::Str(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match value {
        Some(v) if (min..=max).contains(&v) => Some(v),
        Some(v) => {
            p.error(node, path, format!("{v} is out of range {min}..={max}"));
            None
        }
        None => {
            p.error(
                node,
                path,
                format!("expected an integer, found {}", node.type_name()),
            );
            None
        }
    }
}

pub fn number(p: &Problems, node: &Node, path: &str, min: f64, max: f64) -> Option<f64> {
    let value = match &node.value {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        Value::Str(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match value {
        Some(v) if v.is_finite() && v >= min && v <= max => Some(v),
        Some(v) => {
            p.error(node, path, format!("{v} is out of range {min}..={max}"));
            None
        }
        None => {
            p.error(
                node,
                path,
                format!("expected a number, found {}", node.type_name()),
            );
            None
        }
    }
}

/// `250ms`, `2s`, `1m`, `1h`, or compounds such as `1m30s`. A bare number is refused: units
/// are where misconfigurations hide.
pub fn duration(p: &Problems, node: &Node, path: &str) -> Option<Duration> {
    let text = match &node.value {
        Value::Str(s) => s.trim().to_string(),
        Value::Int(0) => return Some(Duration::ZERO),
        Value::Int(i) => {
            p.error(
                node,
                path,
                format!("a duration needs a unit, e.g. `{i}s` or `{i}ms`"),
            );
            return None;
        }
        _ => {
            p.error(
                node,
                path,
                format!(
                    "expected a duration such as `250ms`, `2s` or `1m`, found {}",
                    node.type_name()
                ),
            );
            return None;
        }
    };
    match parse_duration(&text) {
        Some(d) => Some(d),
        None => {
            p.error(
                node,
                path,
                format!("invalid duration `{text}`: use a number and a unit (ms, s, m, h), e.g. `250ms`, `2s`, `1m`"),
            );
            None
        }
    }
}

/// Parses `250ms`, `2s`, `1.5s`, `1m30s`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let seconds = match unit {
            "ns" => number / 1e9,
            "us" | "µs" => number / 1e6,
            "ms" => number / 1e3,
            "s" | "sec" => number,
            "m" | "min" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86400.0,
            _ => return None,
        };
        if !seconds.is_finite() || seconds > 10.0 * 365.0 * 86400.0 {
            return None;
        }
        total += Duration::from_secs_f64(seconds);
    }
    Some(total)
}

/// `64KiB`, `1MiB`, `512`, `1KB` (decimal), `2GiB`.
pub fn size(p: &Problems, node: &Node, path: &str) -> Option<u64> {
    let parsed = match &node.value {
        Value::Int(i) if *i >= 0 => Some(*i as u64),
        Value::Str(s) => parse_size(s),
        _ => None,
    };
    if parsed.is_none() {
        p.error(
            node,
            path,
            "invalid size: use a number of bytes or a unit (B, KiB, MiB, GiB, KB, MB, GB), e.g. `64KiB`",
        );
    }
    parsed
}

pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if split == 0 {
        return None;
    }
    let number: u64 = text[..split].parse().ok()?;
    let factor: u64 = match text[split..].trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "KB" | "kB" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// `IP:PORT`, `[v6]:PORT`, or `localhost:PORT` (read as 127.0.0.1).
pub fn socket_addr(p: &Problems, node: &Node, path: &str) -> Option<SocketAddr> {
    let text = string(p, node, path)?;
    match parse_socket_addr(&text) {
        Some(addr) => Some(addr),
        None => {
            p.error(
                node,
                path,
                format!("invalid address `{text}`: expected IP:PORT, e.g. `127.0.0.1:8080`"),
            );
            None
        }
    }
}

pub fn parse_socket_addr(text: &str) -> Option<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr);
    }
    let port = text.strip_prefix("localhost:")?.parse::<u16>().ok()?;
    Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
}

/// Reads a list, applying `item` to each element with an indexed path.
pub fn list<T>(
    p: &Problems,
    node: &Node,
    path: &str,
    mut item: impl FnMut(&Node, &str) -> Option<T>,
) -> Option<Vec<T>> {
    match &node.value {
        Value::Seq(items) => {
            let mut out = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, child) in items.iter().enumerate() {
                match item(child, &format!("{path}[{i}]")) {
                    Some(v) => out.push(v),
                    None => ok = false,
                }
            }
            ok.then_some(out)
        }
        Value::Null => Some(Vec::new()),
        _ => {
            p.error(
                node,
                path,
                format!("expected a list, found {}", node.type_name()),
            );
            None
        }
    }
}

/// A Kubernetes-style DNS label: lowercase letters, digits and `-`, at most 63 characters.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Event and queue names: letters, digits, `.`, `_`, `-`.
pub fn is_amqp_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("2 parsecs"), None);
        assert_eq!(parse_duration("99999999999h"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1KB"), Some(1000));
        assert_eq!(parse_size("KiB"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999999GiB"), None);
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("timout", &["timeout", "retry"]), Some("timeout"));
        assert_eq!(closest("zzzz", &["timeout", "retry"]), None);
    }
}
