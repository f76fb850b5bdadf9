//! Avro schemas of published events and queues: `schemas/<name>.avsc`, read once at start.
//!
//! A payload sent to a name that has a schema must be JSON that resolves against the schema
//! (apache-avro's reader rules: missing fields need a default, types must match, unknown fields
//! are ignored). Names without a schema file are not checked.

use std::collections::HashMap;
use std::path::Path;

use apache_avro::Schema;
use apache_avro::types::Value;

pub(crate) struct Schemas {
    /// name → the parsed schema, or why its file could not be used.
    by_name: HashMap<String, Result<Schema, String>>,
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SchemaError {
    /// The payload does not match: 422.
    #[error("{0}")]
    Mismatch(String),
    /// The schema file exists but is unusable: a sidecar problem, 500.
    #[error("{0}")]
    Broken(String),
}

impl Schemas {
    pub(crate) fn load<'a>(dir: Option<&Path>, names: impl Iterator<Item = &'a String>) -> Self {
        let mut by_name = HashMap::new();
        let Some(dir) = dir else {
            return Self { by_name };
        };
        for name in names {
            let path = super::schema_path(dir, name);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let why = format!("cannot read schema {}: {e}", path.display());
                    tracing::error!(target_name = %name, "{why}");
                    by_name.insert(name.clone(), Err(why));
                    continue;
                }
            };
            let entry = Schema::parse_str(&text).map_err(|e| {
                let why = format!("invalid Avro schema {}: {e}", path.display());
                tracing::error!(target_name = %name, "{why}");
                why
            });
            if entry.is_ok() {
                tracing::debug!(target_name = %name, path = %path.display(), "loaded Avro schema");
            }
            by_name.insert(name.clone(), entry);
        }
        Self { by_name }
    }

    /// Checks `payload` against the schema of `name`, if there is one.
    pub(crate) fn check(&self, name: &str, payload: &[u8]) -> Result<(), SchemaError> {
        let Some(entry) = self.by_name.get(name) else {
            return Ok(());
        };
        let schema = entry.as_ref().map_err(|e| SchemaError::Broken(e.clone()))?;
        let json: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
            SchemaError::Mismatch(format!(
                "payload of `{name}` must be JSON matching its Avro schema: {e}"
            ))
        })?;
        let value = Value::try_from(json).map_err(|e| {
            SchemaError::Mismatch(format!("payload of `{name}` cannot be read as Avro: {e}"))
        })?;
        value.resolve(schema).map(|_| ()).map_err(|e| {
            SchemaError::Mismatch(format!(
                "payload of `{name}` does not match its Avro schema: {e}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas(text: &str) -> Schemas {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("lab.created.avsc"), text).expect("write");
        let names = ["lab.created".to_string(), "other".to_string()];
        Schemas::load(Some(dir.path()), names.iter())
    }

    const LAB: &str = r#"{"type":"record","name":"LabCreated","fields":[
        {"name":"id","type":"long"},
        {"name":"title","type":"string"},
        {"name":"tags","type":{"type":"array","items":"string"},"default":[]},
        {"name":"note","type":["null","string"],"default":null}]}"#;

    #[test]
    fn matching_and_mismatching_payloads() {
        let s = schemas(LAB);
        assert!(s.check("lab.created", br#"{"id":1,"title":"t"}"#).is_ok());
        assert!(
            s.check(
                "lab.created",
                br#"{"id":1,"title":"t","tags":["a"],"note":"n"}"#
            )
            .is_ok()
        );
        for bad in [
            &br#"{"id":"x","title":"t"}"#[..],
            br#"{"title":"t"}"#,
            br#"[1,2]"#,
            b"not json",
        ] {
            assert!(matches!(
                s.check("lab.created", bad),
                Err(SchemaError::Mismatch(_))
            ));
        }
        assert!(s.check("other", b"anything").is_ok());
    }

    #[test]
    fn broken_schema_is_reported() {
        let s = schemas("{not a schema");
        assert!(matches!(
            s.check("lab.created", b"{}"),
            Err(SchemaError::Broken(_))
        ));
    }
}
