//! The part of OmegaConf that the reference's `main.py` and sampling scripts use, on a
//! `serde_json::Value` tree:
//!
//! - `OmegaConf.load`: YAML with the loader OmegaConf installs on top of PyYAML's `SafeLoader`
//!   (YAML 1.1 booleans such as `yes`/`off`, and floats like `4.5e-6` or `1e-8` that plain YAML 1.1
//!   would read as strings), anchors, aliases and `<<` merge keys;
//! - `OmegaConf.merge(*configs)`: later files win, mappings merge recursively, anything else is
//!   replaced (`main.py -b a.yaml -b b.yaml`);
//! - `OmegaConf.from_dotlist`: command-line overrides `model.params.n_embed=32`, the value read as a
//!   YAML scalar, list or mapping; missing keys are created, `ch_mult.0=2` sets a list element;
//! - interpolation: `${a.b.c}` from the root, `${.x}`/`${..x}` relative to the node's container,
//!   inside strings (`"${a}_x"`), chained and nested (`${a.${b}}`), `\${` as an escape, and the
//!   `env`/`oc.env` resolvers. A missing target or a cycle is an error naming the key;
//! - `OmegaConf.save`: block-style YAML of a tree ([`to_yaml`]).
//!
//! Every error names its origin (the file, or the override) and the key path.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Event;

use crate::{Error, Result};

/// A key path into a config tree (`model.params.ddconfig.ch_mult.0`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct KeyPath(pub Vec<String>);

impl KeyPath {
    /// The root.
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    /// Parses a dotted key (`a.b.0`, also `a.b[0]`).
    pub fn parse(dotted: &str) -> Self {
        KeyPath(split_key(dotted))
    }

    /// This path extended by one key.
    pub fn child(&self, key: impl Into<String>) -> Self {
        let mut v = self.0.clone();
        v.push(key.into());
        KeyPath(v)
    }

    /// This path extended by several keys.
    pub fn join(&self, keys: &[String]) -> Self {
        let mut v = self.0.clone();
        v.extend(keys.iter().cloned());
        KeyPath(v)
    }

    /// The segments.
    pub fn segments(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("<root>")
        } else {
            f.write_str(&self.0.join("."))
        }
    }
}

/// Splits `a.b[0].c` into `["a", "b", "0", "c"]` (empty segments dropped).
fn split_key(key: &str) -> Vec<String> {
    key.replace('[', ".")
        .replace(']', "")
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// YAML loading
// ---------------------------------------------------------------------------------------------

/// Parses YAML text (one document; an empty text is an empty mapping) into a value tree.
/// `origin` names the text in errors (usually the file path).
pub fn load_yaml_str(yaml: &str, origin: &str) -> Result<Value> {
    let mut docs = load_documents(yaml, origin)?;
    match docs.len() {
        0 => Ok(Value::Object(Map::new())),
        1 => Ok(docs.pop().unwrap_or(Value::Null)),
        n => Err(config_err(
            origin,
            format!("expected a single YAML document, found {n}"),
        )),
    }
}

/// Reads and parses a YAML file.
pub fn load_yaml_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    load_yaml_str(&text, &path.display().to_string())
}

fn config_err(origin: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        origin: origin.to_string(),
        msg: msg.into(),
    }
}

fn load_documents(yaml: &str, origin: &str) -> Result<Vec<Value>> {
    let mut loader = Loader::default();
    let mut parser = Parser::new(yaml.chars());
    parser.load(&mut loader, true).map_err(|e| {
        config_err(
            origin,
            format!(
                "malformed YAML: {} (line {}, column {})",
                e.info(),
                e.marker().line(),
                e.marker().col() + 1
            ),
        )
    })?;
    if let Some(msg) = loader.error {
        return Err(config_err(origin, msg));
    }
    Ok(loader.docs)
}

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
    },
    Map {
        map: Map<String, Value>,
        anchor: usize,
        /// The key read and waiting for its value; `Some(None)` is a `<<` merge key.
        key: Option<Option<String>>,
        /// Mappings named by `<<` keys, merged in at the end (explicit keys win).
        merges: Vec<Map<String, Value>>,
    },
}

#[derive(Default)]
struct Loader {
    stack: Vec<Frame>,
    docs: Vec<Value>,
    anchors: HashMap<usize, Value>,
    error: Option<String>,
}

/// A scalar read from the event stream, before it is known whether it is a key.
struct Scalar {
    value: Value,
    /// A plain `<<`.
    merge_key: bool,
}

impl MarkedEventReceiver for Loader {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        if let Err(msg) = self.handle(ev, mark) {
            self.error = Some(format!(
                "{msg} (line {}, column {})",
                mark.line(),
                mark.col() + 1
            ));
        }
    }
}

impl Loader {
    fn handle(&mut self, ev: Event, _mark: Marker) -> std::result::Result<(), String> {
        match ev {
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => Ok(()),
            Event::Alias(id) => {
                let value = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| "alias to an unknown anchor".to_string())?;
                self.insert(
                    Scalar {
                        value,
                        merge_key: false,
                    },
                    0,
                )
            }
            Event::Scalar(text, style, anchor, tag) => {
                let merge_key = style == TScalarStyle::Plain && tag.is_none() && text == "<<";
                let value = resolve_scalar(&text, style, tag.as_ref())?;
                self.insert(Scalar { value, merge_key }, anchor)
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq")?;
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    anchor,
                });
                Ok(())
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map")?;
                self.stack.push(Frame::Map {
                    map: Map::new(),
                    anchor,
                    key: None,
                    merges: Vec::new(),
                });
                Ok(())
            }
            Event::SequenceEnd => match self.stack.pop() {
                Some(Frame::Seq { items, anchor }) => self.insert(
                    Scalar {
                        value: Value::Array(items),
                        merge_key: false,
                    },
                    anchor,
                ),
                _ => Err("unbalanced sequence".to_string()),
            },
            Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Map {
                    mut map,
                    anchor,
                    merges,
                    ..
                }) => {
                    for merged in merges {
                        for (k, v) in merged {
                            if !map.contains_key(&k) {
                                map.insert(k, v);
                            }
                        }
                    }
                    self.insert(
                        Scalar {
                            value: Value::Object(map),
                            merge_key: false,
                        },
                        anchor,
                    )
                }
                _ => Err("unbalanced mapping".to_string()),
            },
        }
    }

    fn insert(&mut self, node: Scalar, anchor: usize) -> std::result::Result<(), String> {
        if anchor > 0 {
            self.anchors.insert(anchor, node.value.clone());
        }
        match self.stack.last_mut() {
            None => {
                self.docs.push(node.value);
                Ok(())
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node.value);
                Ok(())
            }
            Some(Frame::Map {
                map, key, merges, ..
            }) => match key.take() {
                None => {
                    *key = Some(if node.merge_key {
                        None
                    } else {
                        Some(key_string(&node.value)?)
                    });
                    Ok(())
                }
                Some(None) => {
                    match node.value {
                        Value::Object(m) => merges.push(m),
                        Value::Array(list) => {
                            for item in list {
                                match item {
                                    Value::Object(m) => merges.push(m),
                                    _ => {
                                        return Err(
                                            "a `<<` merge key takes mappings only".to_string()
                                        )
                                    }
                                }
                            }
                        }
                        _ => return Err("a `<<` merge key takes mappings only".to_string()),
                    }
                    Ok(())
                }
                Some(Some(k)) => {
                    if map.contains_key(&k) {
                        return Err(format!("duplicate key `{k}`"));
                    }
                    map.insert(k, node.value);
                    Ok(())
                }
            },
        }
    }
}

fn key_string(key: &Value) -> std::result::Result<String, String> {
    match key {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok("null".to_string()),
        Value::Array(_) | Value::Object(_) => {
            Err("a mapping key must be a scalar, not a list or mapping".to_string())
        }
    }
}

const YAML_TAG: &str = "tag:yaml.org,2002:";

fn check_collection_tag(tag: Option<&Tag>, expected: &str) -> std::result::Result<(), String> {
    match tag {
        None => Ok(()),
        Some(t) if t.handle == YAML_TAG && t.suffix == expected => Ok(()),
        Some(t) => Err(format!("unsupported YAML tag `{}{}`", t.handle, t.suffix)),
    }
}

fn resolve_scalar(
    text: &str,
    style: TScalarStyle,
    tag: Option<&Tag>,
) -> std::result::Result<Value, String> {
    if let Some(tag) = tag {
        if tag.handle != YAML_TAG {
            // `!foo` local tags and the like: PyYAML's SafeLoader rejects them too.
            return Err(format!(
                "unsupported YAML tag `{}{}`",
                tag.handle, tag.suffix
            ));
        }
        let parsed = match tag.suffix.as_str() {
            "str" => Some(Value::String(text.to_string())),
            "int" => parse_int(text).map(Value::Number),
            "float" => parse_float(text)
                .or_else(|| parse_int(text).and_then(|n| n.as_f64()))
                .map(float_value),
            "bool" => parse_bool(text).map(Value::Bool),
            "null" => is_null(text).then_some(Value::Null),
            other => return Err(format!("unsupported YAML tag `!!{other}`")),
        };
        return parsed.ok_or_else(|| format!("`{text}` is not a valid !!{}", tag.suffix));
    }
    if style != TScalarStyle::Plain {
        return Ok(Value::String(text.to_string()));
    }
    Ok(resolve_plain(text))
}

/// What a plain (unquoted, untagged) scalar means under OmegaConf's YAML loader.
pub fn resolve_plain(text: &str) -> Value {
    if is_null(text) {
        Value::Null
    } else if let Some(b) = parse_bool(text) {
        Value::Bool(b)
    } else if let Some(n) = parse_int(text) {
        Value::Number(n)
    } else if let Some(f) = parse_float(text) {
        float_value(f)
    } else {
        Value::String(text.to_string())
    }
}

/// JSON has no infinities or NaN: such floats stay strings (`.inf`) in the tree.
fn float_value(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None => Value::String(if f.is_nan() {
            ".nan".to_string()
        } else if f > 0.0 {
            ".inf".to_string()
        } else {
            "-.inf".to_string()
        }),
    }
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// YAML 1.1 booleans, as PyYAML's `SafeLoader` (which OmegaConf builds on) reads them.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// YAML 1.1 integers: decimal, `0x`, `0o`, `0b`, legacy `0777` octal, `_` separators.
fn parse_int(text: &str) -> Option<Number> {
    let (negative, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if body.is_empty() || body.starts_with('_') {
        return None;
    }
    let (radix, digits) = if let Some(d) = body.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = body.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = body.strip_prefix("0b") {
        (2, d)
    } else if body.len() > 1 && body.starts_with('0') {
        (8, &body[1..])
    } else {
        (10, body)
    };
    let digits: String = digits.chars().filter(|c| *c != '_').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = u128::from_str_radix(&digits, radix).ok()?;
    if negative {
        let v = i64::try_from(magnitude)
            .ok()
            .map(|v| -v)
            .or_else(|| (magnitude == 1u128 << 63).then_some(i64::MIN))?;
        Some(Number::from(v))
    } else {
        u64::try_from(magnitude).ok().map(Number::from)
    }
}

/// Floats as OmegaConf's loader resolves them: `1.5`, `1.`, `.5`, `4.5e-6`, `1e-8`, `1.0e+3`,
/// `.inf`, `-.inf`, `.nan` (`_` separators allowed in the digits).
fn parse_float(text: &str) -> Option<f64> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int_part, frac_part) = match mantissa.find('.') {
        Some(i) => (&mantissa[..i], Some(&mantissa[i + 1..])),
        None => (mantissa, None),
    };
    let digits_ok = |s: &str| s.chars().all(|c| c.is_ascii_digit() || c == '_');
    let int_ok = int_part.is_empty()
        || (int_part.starts_with(|c: char| c.is_ascii_digit()) && digits_ok(int_part));
    let frac_ok = frac_part.is_none_or(|f| digits_ok(f) && !f.starts_with('_'));
    let has_digit = int_part.chars().any(|c| c.is_ascii_digit())
        || frac_part.is_some_and(|f| f.chars().any(|c| c.is_ascii_digit()));
    let exp_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    // A float needs a '.' or an exponent (else it is an integer or a string).
    if !(int_ok && frac_ok && has_digit && exp_ok && (frac_part.is_some() || exponent.is_some())) {
        return None;
    }
    let cleaned: String = text.chars().filter(|c| *c != '_').collect();
    cleaned.parse::<f64>().ok()
}

// ---------------------------------------------------------------------------------------------
// Merging and overrides
// ---------------------------------------------------------------------------------------------

/// `OmegaConf.merge(dst, src)`: mappings merge key by key (recursively), anything else in `src`
/// replaces what `dst` has.
pub fn merge(dst: &mut Value, src: Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                match d.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        d.insert(k, v);
                    }
                }
            }
        }
        (d, s) => *d = s,
    }
}

/// The value of `node` at `path`, without interpolation.
pub fn get<'a>(node: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = node;
    for seg in path {
        cur = child(cur, seg)?;
    }
    Some(cur)
}

fn child<'a>(node: &'a Value, seg: &str) -> Option<&'a Value> {
    match node {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    }
}

/// Where a layer of the merged tree came from.
#[derive(Debug, Clone)]
enum Source {
    /// A file or YAML text, with its (unresolved) tree.
    Tree { origin: String, tree: Value },
    /// A dot-list override, with the key it set.
    Override {
        origin: String,
        path: Vec<String>,
        value: Value,
    },
}

/// A config built from layers, as `main.py` builds it: files merged left to right, then the
/// command-line overrides. Remembers which layer set which key, so that errors can name it.
#[derive(Debug, Clone)]
pub struct ConfigTree {
    tree: Value,
    sources: Vec<Source>,
}

impl Default for ConfigTree {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigTree {
    /// An empty config (an empty mapping).
    pub fn new() -> Self {
        ConfigTree {
            tree: Value::Object(Map::new()),
            sources: Vec::new(),
        }
    }

    /// Merges a YAML file on top (`-b file.yaml`).
    pub fn merge_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        self.merge_yaml_str(&text, &path.display().to_string())
    }

    /// Merges YAML text on top; `origin` names it in errors.
    pub fn merge_yaml_str(&mut self, yaml: &str, origin: &str) -> Result<()> {
        let tree = load_yaml_str(yaml, origin)?;
        let tree = match tree {
            Value::Null => Value::Object(Map::new()),
            Value::Object(_) => tree,
            other => {
                return Err(config_err(
                    origin,
                    format!(
                        "the top level of a config must be a mapping, found {}",
                        kind_name(&other)
                    ),
                ))
            }
        };
        merge(&mut self.tree, tree.clone());
        self.sources.push(Source::Tree {
            origin: origin.to_string(),
            tree,
        });
        Ok(())
    }

    /// Applies one dot-list override `key.sub=value` (`value` read as YAML: `1`, `1.5e-6`,
    /// `true`, `null`, `[1,2]`, `{a: 1}`, `foo`). Missing keys are created; a numeric key selects
    /// an element of an existing list; a mapping value merges into an existing mapping.
    pub fn apply_override(&mut self, dotted: &str) -> Result<()> {
        let origin = format!("override `{dotted}`");
        let (key, text) = dotted.split_once('=').ok_or_else(|| {
            config_err(
                &origin,
                "expected `key=value` (e.g. `model.params.n_embed=32`)",
            )
        })?;
        let path = split_key(key.trim());
        if path.is_empty() {
            return Err(config_err(&origin, "the key is empty"));
        }
        let value = load_yaml_str(text, &origin)?;
        // `key=` sets null, as `yaml.load("")` does; `load_yaml_str` reads "" as an empty map.
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            value
        };
        let override_value = value.clone();
        let mut cur = &mut self.tree;
        for (depth, seg) in path.iter().enumerate() {
            let here = KeyPath(path[..depth].to_vec());
            cur = match cur {
                Value::Array(list) => {
                    let len = list.len();
                    let index = seg.parse::<usize>().map_err(|_| {
                        config_err(
                            &origin,
                            format!("{here} is a list: `{seg}` is not an index"),
                        )
                    })?;
                    list.get_mut(index).ok_or_else(|| {
                        config_err(
                            &origin,
                            format!("{here}: index {index} is out of range (the list has {len} elements)"),
                        )
                    })?
                }
                other => {
                    if !other.is_object() {
                        *other = Value::Object(Map::new());
                    }
                    match other {
                        Value::Object(m) => m.entry(seg.clone()).or_insert(Value::Null),
                        _ => return Err(config_err(&origin, "internal error: not a mapping")),
                    }
                }
            };
        }
        merge(cur, value);
        self.sources.push(Source::Override {
            origin,
            path,
            value: override_value,
        });
        Ok(())
    }

    /// The merged tree, interpolations not yet resolved.
    pub fn tree(&self) -> &Value {
        &self.tree
    }

    /// The layer that last set `path` (or the closest ancestor of it that some layer sets):
    /// a file path, `override `k=v``, or `<config>` when none does.
    pub fn origin_of(&self, path: &[String]) -> String {
        for len in (0..=path.len()).rev() {
            let prefix = &path[..len];
            // A layer that has the key itself...
            for source in self.sources.iter().rev() {
                match source {
                    Source::Tree { origin, tree } => {
                        if get(tree, prefix).is_some() {
                            return origin.clone();
                        }
                    }
                    Source::Override {
                        origin,
                        path: set,
                        value,
                    } => {
                        if prefix.starts_with(set) && get(value, &prefix[set.len()..]).is_some() {
                            return origin.clone();
                        }
                    }
                }
            }
            // ...else an override that created it on the way to its own key.
            for source in self.sources.iter().rev() {
                if let Source::Override {
                    origin, path: set, ..
                } = source
                {
                    if set.starts_with(prefix) {
                        return origin.clone();
                    }
                }
            }
        }
        "<config>".to_string()
    }

    /// An error at `path`, attributed to the layer that set it.
    pub fn error_at(&self, path: &KeyPath, msg: impl fmt::Display) -> Error {
        Error::Config {
            origin: self.origin_of(&path.0),
            msg: format!("{path}: {msg}"),
        }
    }

    /// The tree with every interpolation resolved.
    pub fn resolve(&self) -> Result<Value> {
        let mut r = Resolver {
            config: self,
            memo: HashMap::new(),
            in_progress: Vec::new(),
            in_progress_set: HashSet::new(),
        };
        r.resolve_at(&KeyPath::root())
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

// ---------------------------------------------------------------------------------------------
// Interpolation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    /// `${...}`; the inside may itself contain interpolations.
    Interp(Vec<Piece>),
}

/// Whether a string has anything for the resolver to do (`${` or the escape `\${`).
fn has_interpolation(s: &str) -> bool {
    s.contains("${")
}

/// Splits a string into literal text and `${...}` interpolations.
fn parse_pieces(s: &str) -> std::result::Result<Vec<Piece>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut pos = 0;
    let pieces = parse_seq(&chars, &mut pos, false)?;
    Ok(pieces)
}

fn parse_seq(
    chars: &[char],
    pos: &mut usize,
    inside: bool,
) -> std::result::Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    while *pos < chars.len() {
        let c = chars[*pos];
        if c == '\\' && chars.get(*pos + 1) == Some(&'$') && chars.get(*pos + 2) == Some(&'{') {
            lit.push_str("${");
            *pos += 3;
        } else if c == '$' && chars.get(*pos + 1) == Some(&'{') {
            *pos += 2;
            if !lit.is_empty() {
                pieces.push(Piece::Lit(std::mem::take(&mut lit)));
            }
            let inner = parse_seq(chars, pos, true)?;
            pieces.push(Piece::Interp(inner));
        } else if inside && c == '}' {
            *pos += 1;
            if !lit.is_empty() {
                pieces.push(Piece::Lit(lit));
            }
            return Ok(pieces);
        } else {
            lit.push(c);
            *pos += 1;
        }
    }
    if inside {
        return Err("unterminated interpolation: `${` without a closing `}`".to_string());
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

struct Resolver<'a> {
    config: &'a ConfigTree,
    memo: HashMap<KeyPath, Value>,
    in_progress: Vec<KeyPath>,
    in_progress_set: HashSet<KeyPath>,
}

impl Resolver<'_> {
    fn err(&self, path: &KeyPath, msg: impl fmt::Display) -> Error {
        self.config.error_at(path, msg)
    }

    /// The resolved value of the node at `path` (which exists in the merged tree).
    fn resolve_at(&mut self, path: &KeyPath) -> Result<Value> {
        let node = get(&self.config.tree, &path.0).ok_or_else(|| self.err(path, "no such key"))?;
        match node {
            Value::Object(m) => {
                let keys: Vec<String> = m.keys().cloned().collect();
                let mut out = Map::new();
                for k in keys {
                    let v = self.resolve_at(&path.child(k.clone()))?;
                    out.insert(k, v);
                }
                Ok(Value::Object(out))
            }
            Value::Array(a) => {
                let n = a.len();
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    out.push(self.resolve_at(&path.child(i.to_string()))?);
                }
                Ok(Value::Array(out))
            }
            Value::String(s) if has_interpolation(s) => {
                if let Some(v) = self.memo.get(path) {
                    return Ok(v.clone());
                }
                if self.in_progress_set.contains(path) {
                    let start = self.in_progress.iter().position(|p| p == path).unwrap_or(0);
                    let mut chain: Vec<String> = self.in_progress[start..]
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    chain.push(path.to_string());
                    return Err(
                        self.err(path, format!("interpolation cycle: {}", chain.join(" -> ")))
                    );
                }
                let s = s.clone();
                self.in_progress.push(path.clone());
                self.in_progress_set.insert(path.clone());
                let result = self.eval_string(&s, path);
                self.in_progress.pop();
                self.in_progress_set.remove(path);
                let v = result?;
                self.memo.insert(path.clone(), v.clone());
                Ok(v)
            }
            other => Ok(other.clone()),
        }
    }

    fn eval_string(&mut self, s: &str, path: &KeyPath) -> Result<Value> {
        let pieces = parse_pieces(s).map_err(|m| self.err(path, format!("`{s}`: {m}")))?;
        if let [Piece::Interp(inner)] = pieces.as_slice() {
            return self.eval_interp(inner, path);
        }
        self.eval_to_string(&pieces, path).map(Value::String)
    }

    fn eval_to_string(&mut self, pieces: &[Piece], path: &KeyPath) -> Result<String> {
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Lit(l) => out.push_str(l),
                Piece::Interp(inner) => {
                    let v = self.eval_interp(inner, path)?;
                    match v {
                        Value::String(s) => out.push_str(&s),
                        Value::Number(n) => out.push_str(&n.to_string()),
                        // As Python's str() writes them.
                        Value::Bool(true) => out.push_str("True"),
                        Value::Bool(false) => out.push_str("False"),
                        Value::Null => out.push_str("None"),
                        Value::Array(_) | Value::Object(_) => {
                            return Err(self.err(
                                path,
                                format!(
                                "interpolation `${{{}}}` is {}, which cannot be part of a string",
                                pieces_text(inner),
                                kind_name(&v)
                            ),
                            ))
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn eval_interp(&mut self, inner: &[Piece], path: &KeyPath) -> Result<Value> {
        let expr = self.eval_to_string(inner, path)?;
        let expr = expr.trim();
        if let Some((name, args)) = expr.split_once(':') {
            return self.eval_resolver(name.trim(), args, path);
        }
        self.lookup(expr, path)
    }

    fn eval_resolver(&mut self, name: &str, args: &str, path: &KeyPath) -> Result<Value> {
        match name {
            "env" | "oc.env" => {
                let (var, default) = match args.split_once(',') {
                    Some((v, d)) => (v.trim(), Some(d.trim())),
                    None => (args.trim(), None),
                };
                match (std::env::var(var), default) {
                    (Ok(v), _) => Ok(Value::String(v)),
                    (Err(_), Some(d)) => {
                        let d = d.trim_matches(|c| c == '\'' || c == '"');
                        if d == "null" {
                            Ok(Value::Null)
                        } else {
                            Ok(Value::String(d.to_string()))
                        }
                    }
                    (Err(_), None) => Err(self.err(
                        path,
                        format!("`${{{name}:{args}}}`: environment variable `{var}` is not set"),
                    )),
                }
            }
            _ => Err(self.err(
                path,
                format!(
                    "`${{{name}:{args}}}`: unsupported resolver `{name}` (supported: env, oc.env)"
                ),
            )),
        }
    }

    /// Finds the value a key expression (`a.b`, `.x`, `..x`, `a[0]`) refers to, relative to the
    /// node at `path`.
    fn lookup(&mut self, expr: &str, path: &KeyPath) -> Result<Value> {
        if expr.is_empty() {
            return Err(self.err(path, "empty interpolation `${}`"));
        }
        let dots = expr.chars().take_while(|c| *c == '.').count();
        let mut target = if dots == 0 {
            KeyPath::root()
        } else {
            // `.x` is a sibling: the container of the node; each further dot goes one level up.
            let mut base = path.0.clone();
            for _ in 0..dots {
                if base.pop().is_none() {
                    return Err(self.err(
                        path,
                        format!("interpolation `${{{expr}}}` goes above the root"),
                    ));
                }
            }
            KeyPath(base)
        };
        let rest = split_key(&expr[dots..]);
        let mut resolved: Option<Value> = None;
        for seg in &rest {
            if let Some(v) = resolved.take() {
                // Inside a value that came from an interpolation: already resolved.
                let next = child(&v, seg).cloned();
                resolved = Some(next.ok_or_else(|| self.missing(expr, path))?);
                continue;
            }
            let next = target.child(seg.clone());
            match get(&self.config.tree, &next.0) {
                Some(Value::String(s)) if has_interpolation(s) => {
                    resolved = Some(self.resolve_at(&next)?);
                }
                Some(_) => {}
                None => return Err(self.missing(expr, path)),
            }
            target = next;
        }
        match resolved {
            Some(v) => Ok(v),
            None => self.resolve_at(&target),
        }
    }

    fn missing(&self, expr: &str, path: &KeyPath) -> Error {
        self.err(
            path,
            format!("interpolation `${{{expr}}}` refers to a key that does not exist"),
        )
    }
}

fn pieces_text(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Lit(l) => l.clone(),
            Piece::Interp(inner) => format!("${{{}}}", pieces_text(inner)),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Writing YAML
// ---------------------------------------------------------------------------------------------

/// Block-style YAML of a tree, in the layout `OmegaConf.save` writes (sequences at their key's
/// indentation). Reading it back gives the same tree; strings that would read as something else
/// (`yes`, `1.0`, `null`, `${x}`, dates, ...) are quoted.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if !m.is_empty() => write_map(&mut out, m, 0, false),
        Value::Array(a) if !a.is_empty() => write_seq(&mut out, a, 0, false),
        other => {
            out.push_str(&scalar_text(other));
            out.push('\n');
        }
    }
    out
}

fn write_map(out: &mut String, map: &Map<String, Value>, indent: usize, skip_first: bool) {
    for (i, (k, v)) in map.iter().enumerate() {
        if !(skip_first && i == 0) {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&string_text(k));
        out.push(':');
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push('\n');
                write_map(out, m, indent + 2, false);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                write_seq(out, a, indent, false);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar_text(other));
                out.push('\n');
            }
        }
    }
}

fn write_seq(out: &mut String, seq: &[Value], indent: usize, skip_first: bool) {
    for (i, v) in seq.iter().enumerate() {
        if !(skip_first && i == 0) {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str("- ");
        match v {
            Value::Object(m) if !m.is_empty() => write_map(out, m, indent + 2, true),
            Value::Array(a) if !a.is_empty() => write_seq(out, a, indent + 2, true),
            other => {
                out.push_str(&scalar_text(other));
                out.push('\n');
            }
        }
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number_text(n),
        Value::String(s) => string_text(s),
        Value::Array(_) => "[]".to_string(),
        Value::Object(_) => "{}".to_string(),
    }
}

/// Integers as they are; floats always with a `.` and a signed exponent (`1.0e-08` style reads
/// as a float under YAML 1.1 too).
fn number_text(n: &Number) -> String {
    if n.is_f64() {
        let f = n.as_f64().unwrap_or(0.0);
        let s = format!("{f:?}");
        match s.split_once('e') {
            Some((mantissa, exp)) => {
                let mantissa = if mantissa.contains('.') {
                    mantissa.to_string()
                } else {
                    format!("{mantissa}.0")
                };
                let exp = if exp.starts_with('-') {
                    exp.to_string()
                } else {
                    format!("+{exp}")
                };
                format!("{mantissa}e{exp}")
            }
            None => s,
        }
    } else {
        n.to_string()
    }
}

fn string_text(s: &str) -> String {
    let plain_ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-' | '+'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '/')
        && !looks_like_date(s)
        && resolve_plain(s) == Value::String(s.to_string());
    if plain_ok {
        return s.to_string();
    }
    // A JSON string is a valid double-quoted YAML scalar; `${` is escaped so that it stays text.
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
    quoted.replace("${", "\\\\${")
}

/// `2020-11-09...`: PyYAML would read a date.
fn looks_like_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 8 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolved(yaml: &str) -> Result<Value> {
        let mut t = ConfigTree::new();
        t.merge_yaml_str(yaml, "test.yaml")?;
        t.resolve()
    }

    #[test]
    fn scalars_follow_omegaconf() {
        let v = load_yaml_str(
            "a: 4.5e-06\nb: 1.0e-08\nc: 1e-8\nd: 4.5e-6\ne: 12\nf: yes\ng: Off\nh: ~\ni: \ni2: null\nj: '1.0'\nk: foo\nl: 0x10\nm: .5\nn: 1_000\no: -3\np: .inf\nq: 1.\nr: \"yes\"\ns: 2020-11-09\n",
            "t",
        )
        .unwrap();
        assert_eq!(v["a"], json!(4.5e-6));
        assert_eq!(v["b"], json!(1e-8));
        assert_eq!(v["c"], json!(1e-8));
        assert_eq!(v["d"], json!(4.5e-6));
        assert_eq!(v["e"], json!(12));
        assert_eq!(v["f"], json!(true));
        assert_eq!(v["g"], json!(false));
        assert_eq!(v["h"], Value::Null);
        assert_eq!(v["i"], Value::Null);
        assert_eq!(v["i2"], Value::Null);
        assert_eq!(v["j"], json!("1.0"));
        assert_eq!(v["k"], json!("foo"));
        assert_eq!(v["l"], json!(16));
        assert_eq!(v["m"], json!(0.5));
        assert_eq!(v["n"], json!(1000));
        assert_eq!(v["o"], json!(-3));
        assert_eq!(v["p"], json!(".inf"));
        assert_eq!(v["q"], json!(1.0));
        assert_eq!(v["r"], json!("yes"));
        assert_eq!(v["s"], json!("2020-11-09"));
        for s in ["1e", "e5", "1.2.3", "abc1", "-", ".", "_1", "1e+"] {
            assert_eq!(resolve_plain(s), json!(s), "{s}");
        }
    }

    #[test]
    fn tags_anchors_and_merge_keys() {
        let v = load_yaml_str(
            "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\ns: !!str 12\nf: !!float 3\nl: *b\n",
            "t",
        )
        .unwrap();
        assert_eq!(v["d"], json!({"y": 3, "x": 1}));
        assert_eq!(v["s"], json!("12"));
        assert_eq!(v["f"], json!(3.0));
        assert_eq!(v["l"], json!({"x": 1, "y": 2}));
        assert!(load_yaml_str("a: !!python/object:foo {}\n", "t").is_err());
    }

    #[test]
    fn errors_name_origin_and_line() {
        let e = load_yaml_str("a: [1, 2\nb: 3\n", "bad.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.yaml") && e.contains("malformed YAML"),
            "{e}"
        );
        let e = load_yaml_str("a: 1\na: 2\n", "dup.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dup.yaml") && e.contains("duplicate key `a`") && e.contains("line 2"),
            "{e}"
        );
        let e = load_yaml_str("a: 1\n---\nb: 2\n", "two.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("single YAML document"), "{e}");
        assert_eq!(load_yaml_str("", "empty").unwrap(), json!({}));
    }

    #[test]
    fn interpolation() {
        let v = resolved(
            "a: {b: {c: 7}}\nx: ${a.b.c}\ny: ${x}\ns: \"${a.b.c}_run\"\nd: ${a.b}\nrel:\n  p: 1\n  q: ${.p}\n  r: ${..x}\nesc: \\${a}\nk: c\nnested: ${a.b.${k}}\nlist: [10, 20]\ne: ${list[1]}\nf: ${list.0}\ng: ${d.c}\nh: \"${t}-${a.b.c}\"\nt: true\n",
        )
        .unwrap();
        assert_eq!(v["x"], json!(7));
        assert_eq!(v["y"], json!(7));
        assert_eq!(v["s"], json!("7_run"));
        assert_eq!(v["d"], json!({"c": 7}));
        assert_eq!(v["rel"], json!({"p": 1, "q": 1, "r": 7}));
        assert_eq!(v["esc"], json!("${a}"));
        assert_eq!(v["nested"], json!(7));
        assert_eq!(v["e"], json!(20));
        assert_eq!(v["f"], json!(10));
        assert_eq!(v["g"], json!(7));
        assert_eq!(v["h"], json!("True-7"));
    }

    #[test]
    fn interpolation_errors() {
        let e = resolved("a: ${b.c}\nb: {}\n").unwrap_err().to_string();
        assert!(
            e.contains("test.yaml") && e.contains("a:") && e.contains("${b.c}"),
            "{e}"
        );
        let e = resolved("a: ${b}\nb: ${c}\nc: ${a}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cycle") && e.contains("a -> b -> c -> a"), "{e}");
        let e = resolved("a:\n  b: ${a}\n").unwrap_err().to_string();
        assert!(e.contains("cycle"), "{e}");
        let e = resolved("a: ${b\n").unwrap_err().to_string();
        assert!(e.contains("unterminated"), "{e}");
        let e = resolved("a: ${foo:bar}\n").unwrap_err().to_string();
        assert!(e.contains("unsupported resolver `foo`"), "{e}");
        let e = resolved("a: x${b}\nb: [1]\n").unwrap_err().to_string();
        assert!(e.contains("cannot be part of a string"), "{e}");
    }

    #[test]
    fn merge_and_overrides() {
        let mut t = ConfigTree::new();
        t.merge_yaml_str("m: {p: {a: 1, b: [1, 2]}, q: 2}\n", "one.yaml")
            .unwrap();
        t.merge_yaml_str("m: {p: {b: [3], c: 4}}\n", "two.yaml")
            .unwrap();
        t.apply_override("m.p.a=1.5e-6").unwrap();
        t.apply_override("m.new.deep=[1,2]").unwrap();
        t.apply_override("m.p.b.0=9").unwrap();
        t.apply_override("m.s=foo").unwrap();
        t.apply_override("m.n=").unwrap();
        t.apply_override("m.p={d: 5}").unwrap();
        let v = t.resolve().unwrap();
        assert_eq!(
            v,
            json!({"m": {"p": {"a": 1.5e-6, "b": [9], "c": 4, "d": 5}, "q": 2,
                         "new": {"deep": [1, 2]}, "s": "foo", "n": null}})
        );
        assert_eq!(t.origin_of(&KeyPath::parse("m.q").0), "one.yaml");
        assert_eq!(t.origin_of(&KeyPath::parse("m.p.c").0), "two.yaml");
        assert_eq!(t.origin_of(&KeyPath::parse("m.s").0), "override `m.s=foo`");
        assert!(t
            .apply_override("m.p.b.5=1")
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert!(t.apply_override("novalue").is_err());
    }

    #[test]
    fn yaml_round_trip() {
        let v = json!({
            "model": {"lr": 4.5e-6, "tiny": 1e-8, "big": 1e20, "one": 1.0, "n": 3, "neg": -2,
                      "s": ["yes", "1.0", "", "a b", "null", "${x}", "2020-11-09T13-33", "-x",
                            "logs/run/checkpoints/last.ckpt", "taming.models.vqgan.VQModel",
                            "line\nbreak", "#c", "a: b", "\"q\""],
                      "e": [], "m": {}, "nil": null, "t": true,
                      "nested": [[1, 2], {"a": 1, "b": [3]}, []]},
            "1": "numeric key"
        });
        let text = to_yaml(&v);
        assert!(
            text.contains("lr: 4.5e-06") || text.contains("lr: 4.5e-6"),
            "{text}"
        );
        let back = load_yaml_str(&text, "rt").unwrap();
        let mut t = ConfigTree::new();
        t.merge_yaml_str(&text, "rt").unwrap();
        let resolved = t.resolve().unwrap();
        assert_eq!(back["model"]["s"][5], json!("\\${x}"));
        assert_eq!(resolved, v, "{text}");
    }
}
