//! Property-based fuzzing of the parsers that face input (run on stable Rust; cargo-fuzz needs
//! nightly). Every target must return an answer — an error is fine — and never panic or hang.
//! Cases per target: `PROPTEST_CASES` (default below), so CI runs each a bounded time. Seeds
//! live in `tests/corpus/`; a crash found here becomes a named regression test at the bottom.

use std::path::Path;
use std::time::{Duration, Instant};

use http::HeaderValue;
use outrider::config;
use outrider::proxy::http::parse_grpc_timeout;
use outrider::proxy::route::{is_local, parse_authority};
use outrider::tls::SpiffeId;
use proptest::prelude::*;

const HANG_GUARD: Duration = Duration::from_secs(5);

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn corpus() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/config");
    let mut seeds: Vec<String> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    seeds.sort();
    seeds
}

fn load(text: &str) -> Result<config::Loaded, config::LoadError> {
    let started = Instant::now();
    let result = config::load_str(text, "fuzz.yaml", Path::new("/tmp"), Vec::new());
    assert!(
        started.elapsed() < HANG_GUARD,
        "config took {:?}",
        started.elapsed()
    );
    result
}

/// A mutation of a seed: replace, insert or delete characters at chosen places.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, char),
    Insert(usize, String),
    Delete(usize, usize),
}

fn apply(seed: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = seed.chars().collect();
    for edit in edits {
        let len = chars.len().max(1);
        match edit {
            Edit::Replace(at, c) => {
                let at = at % len;
                if at < chars.len() {
                    chars[at] = *c;
                }
            }
            Edit::Insert(at, s) => {
                let at = at % (chars.len() + 1);
                for (i, c) in s.chars().enumerate() {
                    chars.insert(at + i, c);
                }
            }
            Edit::Delete(at, n) => {
                let at = at % len;
                let end = (at + n).min(chars.len());
                if at < end {
                    chars.drain(at..end);
                }
            }
        }
    }
    chars.into_iter().collect()
}

fn yaml_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(": ".to_string()),
        Just("\n  ".to_string()),
        Just("- ".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("!!binary ".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("---\n".to_string()),
        Just("99999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("1e999".to_string()),
        Just("~".to_string()),
        Just("\t".to_string()),
        "[a-z_]{1,12}".prop_map(|s| s),
        any::<char>().prop_map(|c| c.to_string()),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<char>()).prop_map(|(a, c)| Edit::Replace(a, c)),
        (any::<usize>(), yaml_fragment()).prop_map(|(a, s)| Edit::Insert(a, s)),
        (any::<usize>(), 1usize..40).prop_map(|(a, n)| Edit::Delete(a, n)),
    ]
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn config_loader_answers_any_text(text in any::<String>()) {
        let _ = load(&text);
    }

    #[test]
    fn config_loader_answers_mutated_seeds(seed in 0usize..3, edits in prop::collection::vec(edit(), 1..8)) {
        let seeds = corpus();
        let text = apply(&seeds[seed % seeds.len()], &edits);
        if let Err(config::LoadError::Invalid { problems, .. }) = load(&text) {
            prop_assert!(!problems.is_empty(), "an invalid config names at least one problem");
            for p in &problems {
                prop_assert!(!p.message.is_empty());
            }
        }
    }

    #[test]
    fn authority_parser_answers_anything(authority in any::<String>()) {
        if let Some(name) = parse_authority(&authority) {
            prop_assert!(!name.service.is_empty());
            prop_assert!(name.service.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
        let _ = is_local(&authority, "127.0.0.1:7140".parse().expect("addr"));
    }

    #[test]
    fn authority_parser_finds_generated_services(
        service in "[a-z][a-z0-9-]{0,20}[a-z0-9]",
        namespace in proptest::option::of("[a-z]([a-z0-9-]{0,9}[a-z0-9])?"),
        suffix in prop_oneof![Just(""), Just(".svc"), Just(".svc.cluster.local")],
        port in proptest::option::of(1u16..),
    ) {
        let mut authority = service.clone();
        if let Some(ns) = &namespace {
            authority.push('.');
            authority.push_str(ns);
            authority.push_str(suffix);
        }
        if let Some(port) = port {
            authority.push_str(&format!(":{port}"));
        }
        let name = parse_authority(&authority).expect("a valid authority parses");
        prop_assert_eq!(name.service.as_ref(), service.as_str());
        prop_assert_eq!(name.namespace.as_deref(), namespace.as_deref());
    }

    #[test]
    fn spiffe_ids_parse_or_refuse(text in any::<String>()) {
        let _ = SpiffeId::parse(&text);
    }

    #[test]
    fn spiffe_ids_round_trip(
        td in "[a-z0-9][a-z0-9.-]{0,20}",
        ns in "[a-z0-9][a-z0-9-]{0,20}",
        sa in "[a-z0-9][a-z0-9-]{0,20}",
    ) {
        let id = config::spiffe_id(&td, &ns, &sa);
        let parsed = SpiffeId::parse(&id).expect("round trip");
        prop_assert_eq!(parsed.trust_domain, td);
        prop_assert_eq!(parsed.namespace, ns);
        prop_assert_eq!(parsed.service, sa);
    }

    #[test]
    fn grpc_timeouts_parse_or_refuse(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            let _ = parse_grpc_timeout(&value);
        }
    }

    #[test]
    fn durations_and_sizes_parse_or_refuse(text in any::<String>()) {
        let _ = config::parse_duration(&text);
        let _ = config::parse_size(&text);
    }
}

#[test]
fn seeds_behave_as_labelled() {
    for seed in corpus() {
        let _ = load(&seed);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/config");
    let example = std::fs::read_to_string(dir.join("contract-example.yaml")).expect("seed");
    assert!(
        load(&example).is_ok(),
        "the contract's example config is valid"
    );
    let bad = std::fs::read_to_string(dir.join("many-errors.yaml")).expect("seed");
    match load(&bad) {
        Err(config::LoadError::Invalid { problems, .. }) => {
            assert!(
                problems.len() >= 15,
                "{} problems: {problems:#?}",
                problems.len()
            )
        }
        other => panic!("expected problems, got {other:?}"),
    }
}

/// Regression: deeply nested flow collections must not overflow the stack.
#[test]
fn deeply_nested_yaml_is_refused_not_crashed() {
    let deep = format!("service: {}{}", "[".repeat(5000), "]".repeat(5000));
    let _ = load(&deep);
}
