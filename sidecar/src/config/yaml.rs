//! A YAML tree that remembers where every node came from, so validation can name the line and
//! column of each problem. saphyr parses; this module only flattens its annotated nodes into a
//! small tree the decoder can walk without knowing saphyr's generic types.

use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};

/// Where a node starts: 1-based line and column. Line 0 means "not from the file" (environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in file order. Keys are plain strings: a non-string key is reported when decoding.
    Map(Vec<(String, Pos, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
    /// Set for nodes that came from an environment variable (named here) rather than the file.
    pub from_env: Option<String>,
}

impl Node {
    pub fn new(pos: Pos, value: Value) -> Self {
        Self {
            pos,
            value,
            from_env: None,
        }
    }

    pub fn empty_map() -> Self {
        Self::new(Pos::default(), Value::Map(Vec::new()))
    }

    /// A short name of the node's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Sets `path` (dotted keys) to `value`, creating mappings on the way.
    pub fn set_path(&mut self, path: &[&str], value: Node) {
        let Some((first, rest)) = path.split_first() else {
            *self = value;
            return;
        };
        if !matches!(self.value, Value::Map(_)) {
            self.value = Value::Map(Vec::new());
        }
        let Value::Map(entries) = &mut self.value else {
            return;
        };
        if let Some((_, _, child)) = entries.iter_mut().find(|(k, _, _)| k == first) {
            child.set_path(rest, value);
        } else {
            let mut child = Node::empty_map();
            child.pos = value.pos;
            child.from_env.clone_from(&value.from_env);
            child.set_path(rest, value);
            entries.push(((*first).to_string(), Pos::default(), child));
        }
    }

    /// Deep merge: keys of `over` replace or (for mappings) merge into `self`.
    pub fn merged_with(&self, over: &Node) -> Node {
        match (&self.value, &over.value) {
            (Value::Map(base), Value::Map(top)) => {
                let mut entries = base.clone();
                for (key, key_pos, node) in top {
                    if let Some(slot) = entries.iter_mut().find(|(k, _, _)| k == key) {
                        slot.2 = slot.2.merged_with(node);
                        slot.1 = *key_pos;
                    } else {
                        entries.push((key.clone(), *key_pos, node.clone()));
                    }
                }
                Node {
                    pos: over.pos,
                    value: Value::Map(entries),
                    from_env: over.from_env.clone(),
                }
            }
            _ => over.clone(),
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses one YAML document (an empty input is an empty mapping).
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let docs = MarkedYamlOwned::load_from_str(text).map_err(|e| SyntaxError {
        pos: Pos {
            line: e.marker().line(),
            col: e.marker().col() + 1,
        },
        message: e.info().to_string(),
    })?;
    match docs.len() {
        0 => Ok(Node::empty_map()),
        1 => convert(&docs[0]),
        _ => Err(SyntaxError {
            pos: span_pos(&docs[1]),
            message: "only one YAML document is allowed in a config file".into(),
        }),
    }
}

fn span_pos(node: &MarkedYamlOwned) -> Pos {
    Pos {
        line: node.span.start.line(),
        col: node.span.start.col() + 1,
    }
}

fn convert(node: &MarkedYamlOwned) -> Result<Node, SyntaxError> {
    let pos = span_pos(node);
    let value = match &node.data {
        YamlDataOwned::Value(scalar) => match scalar {
            ScalarOwned::Null => Value::Null,
            ScalarOwned::Boolean(b) => Value::Bool(*b),
            ScalarOwned::Integer(i) => Value::Int(*i),
            ScalarOwned::FloatingPoint(f) => Value::Float(f.0),
            ScalarOwned::String(s) => Value::Str(s.clone()),
        },
        YamlDataOwned::Representation(s, _, _) => Value::Str(s.clone()),
        YamlDataOwned::Sequence(items) => {
            Value::Seq(items.iter().map(convert).collect::<Result<_, _>>()?)
        }
        YamlDataOwned::Mapping(map) => {
            let mut entries = Vec::with_capacity(map.len());
            for (key, value) in map {
                let key_pos = span_pos(key);
                let key_text = match &key.data {
                    YamlDataOwned::Value(ScalarOwned::String(s)) => s.clone(),
                    YamlDataOwned::Value(ScalarOwned::Integer(i)) => i.to_string(),
                    YamlDataOwned::Value(ScalarOwned::Boolean(b)) => b.to_string(),
                    YamlDataOwned::Value(ScalarOwned::Null) => "null".to_string(),
                    _ => {
                        return Err(SyntaxError {
                            pos: key_pos,
                            message: "mapping keys must be plain strings".into(),
                        });
                    }
                };
                entries.push((key_text, key_pos, convert(value)?));
            }
            Value::Map(entries)
        }
        YamlDataOwned::Tagged(_, inner) => return convert(inner),
        YamlDataOwned::Alias(_) => {
            return Err(SyntaxError {
                pos,
                message: "YAML aliases are not supported in configs".into(),
            });
        }
        YamlDataOwned::BadValue => {
            return Err(SyntaxError {
                pos,
                message: "invalid YAML value".into(),
            });
        }
    };
    Ok(Node::new(pos, value))
}
