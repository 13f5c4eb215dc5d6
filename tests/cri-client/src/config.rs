//! crictl's JSON config files (`runp pod-config.json`, `create POD
//! container-config.json pod-config.json`): the CRI messages with their proto field
//! names in snake_case, every field optional, enums as numbers (Go's
//! `encoding/json` over the generated structs, which is what crictl uses).
//!
//! k8s-cri derives serde for its messages, but a derived struct wants every
//! field present. [`from_value`] gives the derive a view of the JSON in which a
//! missing field reads as its proto default (empty string, 0, false, empty list or
//! map, unset message), so every CRI field crictl accepts is accepted here too,
//! without a hand-kept copy of the schema. Unlike crictl, an unknown field is an
//! error naming it and where it is: a typo must not silently drop a setting.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_cri::v1::{ContainerConfig, PodSandboxConfig};

/// What was wrong with a config, and where (a JSON path such as
/// `linux.security_context.namespace_options.network`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {message}")]
    Field { path: PathBuf, message: String },
}

/// Reads a pod sandbox config file (crictl `runp`'s argument).
pub fn load_pod_config(path: &Path) -> Result<PodSandboxConfig, ConfigError> {
    load(path)
}

/// Reads a container config file (crictl `create`'s second argument).
pub fn load_container_config(path: &Path) -> Result<ContainerConfig, ConfigError> {
    load(path)
}

fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let value: Value = serde_json::from_slice(&text).map_err(|source| ConfigError::Json { path: path.to_path_buf(), source })?;
    from_value(value).map_err(|e| ConfigError::Field { path: path.to_path_buf(), message: e.0 })
}

/// Deserializes a CRI message from crictl-style JSON: missing fields take their
/// proto defaults, unknown ones are errors.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    T::deserialize(Node { value, path: String::new() })
}

/// A deserialization error, prefixed with the JSON path it happened at.
#[derive(Debug)]
pub struct FieldError(pub String);

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FieldError {}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FieldError(msg.to_string())
    }
}

fn at(path: &str, message: impl fmt::Display) -> FieldError {
    if path.is_empty() {
        FieldError(format!("{message}"))
    } else {
        FieldError(format!("field {path}: {message}"))
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A JSON value at `path`.
struct Node {
    value: Value,
    path: String,
}

macro_rules! scalar {
    ($($method:ident)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
            let path = self.path;
            self.value.$method(visitor).map_err(|e| at(&path, e))
        })*
    };
}

impl<'de> de::Deserializer<'de> for Node {
    type Error = FieldError;

    scalar! {
        deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_f32 deserialize_f64
        deserialize_char deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
        deserialize_unit deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        if self.value.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, FieldError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.value {
            // Go's json reads null as an empty list.
            Value::Null => visitor.visit_seq(Items { items: Vec::new().into_iter(), path: self.path, index: 0 }),
            Value::Array(items) => visitor.visit_seq(Items { items: items.into_iter(), path: self.path, index: 0 }),
            other => Err(at(&self.path, format!("expected a list, found {}", kind(&other)))),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, FieldError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _name: &'static str, _len: usize, visitor: V) -> Result<V::Value, FieldError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.value {
            Value::Null => visitor.visit_map(Fields::of_object(serde_json::Map::new(), self.path)),
            Value::Object(map) => visitor.visit_map(Fields::of_object(map, self.path)),
            other => Err(at(&self.path, format!("expected an object, found {}", kind(&other)))),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        let mut map = match self.value {
            Value::Null => serde_json::Map::new(),
            Value::Object(map) => map,
            other => return Err(at(&self.path, format!("expected an object ({name}), found {}", kind(&other)))),
        };
        if let Some(unknown) = map.keys().find(|k| !fields.contains(&k.as_str())) {
            return Err(at(&child(&self.path, unknown), format!("unknown field in {name}; its fields are: {}", fields.join(", "))));
        }
        // Every field is offered, present or not: a missing one reads as its default.
        let entries: Vec<(String, Option<Value>)> = fields.iter().map(|f| (f.to_string(), map.remove(*f))).collect();
        visitor.visit_map(Fields { entries: entries.into_iter(), path: self.path, pending: None })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        let path = self.path;
        self.value.deserialize_enum(name, variants, visitor).map_err(|e| at(&path, e))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

struct Items {
    items: std::vec::IntoIter<Value>,
    path: String,
    index: usize,
}

impl<'de> SeqAccess<'de> for Items {
    type Error = FieldError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, FieldError> {
        let Some(value) = self.items.next() else { return Ok(None) };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        seed.deserialize(Node { value, path }).map(Some)
    }
}

/// A message's fields, each present or missing; or a JSON object read as a map
/// (`labels`, `annotations`, ...), whose entries are all present.
struct Fields {
    entries: std::vec::IntoIter<(String, Option<Value>)>,
    path: String,
    pending: Option<(String, Option<Value>)>,
}

impl Fields {
    /// A JSON object's entries, for a map.
    fn of_object(map: serde_json::Map<String, Value>, path: String) -> Fields {
        Fields { entries: map.into_iter().map(|(k, v)| (k, Some(v))).collect::<Vec<_>>().into_iter(), path, pending: None }
    }
}

impl<'de> MapAccess<'de> for Fields {
    type Error = FieldError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, FieldError> {
        let Some((key, value)) = self.entries.next() else { return Ok(None) };
        let k = seed.deserialize(IntoDeserializer::<FieldError>::into_deserializer(key.clone()))?;
        self.pending = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, FieldError> {
        let (key, value) = self.pending.take().ok_or_else(|| FieldError("a value asked for before its key".into()))?;
        let path = child(&self.path, &key);
        match value {
            Some(value) => seed.deserialize(Node { value, path }),
            None => seed.deserialize(Missing { path }),
        }
    }
}

/// A field the JSON leaves out: reads as the proto default of whatever type the
/// message declares for it.
struct Missing {
    path: String,
}

macro_rules! zero {
    ($($method:ident => $visit:ident($v:expr)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
            visitor.$visit($v)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Missing {
    type Error = FieldError;

    zero! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(0), deserialize_i16 => visit_i64(0), deserialize_i32 => visit_i64(0), deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u64(0), deserialize_u16 => visit_u64(0), deserialize_u32 => visit_u64(0), deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f64(0.0), deserialize_f64 => visit_f64(0.0),
        deserialize_str => visit_str(""), deserialize_string => visit_str(""),
        deserialize_bytes => visit_bytes(&[]), deserialize_byte_buf => visit_bytes(&[]),
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, FieldError> {
        Err(at(&self.path, "missing, and its type has no default"))
    }

    fn deserialize_char<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, FieldError> {
        Err(at(&self.path, "missing"))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_none()
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_seq(Items { items: Vec::new().into_iter(), path: self.path, index: 0 })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, FieldError> {
        Err(at(&self.path, "missing"))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _name: &'static str, _len: usize, _visitor: V) -> Result<V::Value, FieldError> {
        Err(at(&self.path, "missing"))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_map(Fields::of_object(serde_json::Map::new(), self.path))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        Node { value: Value::Null, path: self.path }.deserialize_struct(name, fields, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, FieldError> {
        Err(at(&self.path, "missing"))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, FieldError> {
        Err(at(&self.path, "missing"))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_unit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::NamespaceMode;

    /// crictl's own sample (docs/crictl.md), plus a host-network variant's fields.
    const POD: &str = r#"{
        "metadata": {"name": "nginx-sandbox", "namespace": "default", "attempt": 1, "uid": "hdishd83djaidwnduwk28bcsb"},
        "log_directory": "/tmp",
        "hostname": "pod-a",
        "dns_config": {"servers": ["198.19.0.1"], "searches": [], "options": null},
        "port_mappings": [{"protocol": 0, "container_port": 80, "host_port": 8080}],
        "annotations": {"io.katacontainers.config.hypervisor.default_vcpus": "1"},
        "labels": {"app": "a"},
        "linux": {"security_context": {"namespace_options": {"network": 2, "pid": 1}}}
    }"#;

    const CONTAINER: &str = r#"{
        "metadata": {"name": "busybox"},
        "image": {"image": "vfvm.test/busybox:1"},
        "command": ["sh", "-c"],
        "args": ["echo started-1; sleep 3600"],
        "envs": [{"key": "A", "value": "b"}],
        "working_dir": "/",
        "log_path": "busybox.0.log",
        "mounts": [{"container_path": "/data", "host_path": "/tmp", "readonly": true}],
        "linux": {"resources": {"memory_limit_in_bytes": 67108864}, "security_context": {"namespace_options": {"pid": 1}}}
    }"#;

    #[test]
    fn crictl_pod_configs_parse_with_defaults_for_what_they_leave_out() {
        let pod: PodSandboxConfig = from_value(serde_json::from_str(POD).unwrap()).unwrap();
        let meta = pod.metadata.as_ref().unwrap();
        assert_eq!(
            (meta.name.as_str(), meta.namespace.as_str(), meta.uid.as_str(), meta.attempt),
            ("nginx-sandbox", "default", "hdishd83djaidwnduwk28bcsb", 1)
        );
        assert_eq!(pod.log_directory, "/tmp");
        assert_eq!(pod.dns_config.as_ref().unwrap().servers, ["198.19.0.1"]);
        assert!(pod.dns_config.as_ref().unwrap().options.is_empty(), "null reads as an empty list");
        assert_eq!(pod.port_mappings[0].host_port, 8080);
        assert_eq!(pod.annotations["io.katacontainers.config.hypervisor.default_vcpus"], "1");
        let ns = pod.linux.as_ref().unwrap().security_context.as_ref().unwrap().namespace_options.as_ref().unwrap();
        assert_eq!(ns.network(), NamespaceMode::Node);
        assert_eq!(ns.pid(), NamespaceMode::Container);
        assert_eq!(ns.ipc(), NamespaceMode::Pod, "a missing enum is its zero value");
        assert!(pod.linux.as_ref().unwrap().sysctls.is_empty());
        assert!(pod.windows.is_none(), "a missing message stays unset");

        // The smallest file crictl accepts.
        let pod: PodSandboxConfig = from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
        assert_eq!(pod.metadata.unwrap().name, "p");
        assert!(pod.linux.is_none() && pod.labels.is_empty() && pod.log_directory.is_empty());
    }

    #[test]
    fn crictl_container_configs_parse() {
        let c: ContainerConfig = from_value(serde_json::from_str(CONTAINER).unwrap()).unwrap();
        assert_eq!(c.metadata.as_ref().unwrap().name, "busybox");
        assert_eq!(c.metadata.as_ref().unwrap().attempt, 0);
        assert_eq!(c.image.as_ref().unwrap().image, "vfvm.test/busybox:1");
        assert_eq!(c.command, ["sh", "-c"]);
        assert_eq!(c.args, ["echo started-1; sleep 3600"]);
        assert_eq!((c.envs[0].key.as_str(), c.envs[0].value.as_str()), ("A", "b"));
        assert_eq!(c.log_path, "busybox.0.log");
        assert!(c.mounts[0].readonly && c.mounts[0].host_path == "/tmp");
        assert_eq!(c.linux.as_ref().unwrap().resources.as_ref().unwrap().memory_limit_in_bytes, 64 << 20);
        assert!(!c.tty && !c.stdin);
    }

    #[test]
    fn mistakes_are_named_with_their_path() {
        let err = from_value::<PodSandboxConfig>(serde_json::json!({"metadata": {"name": "p", "nmespace": "x"}})).unwrap_err().to_string();
        assert!(err.contains("metadata.nmespace") && err.contains("unknown field") && err.contains("namespace"), "{err}");
        let err =
            from_value::<PodSandboxConfig>(serde_json::json!({"linux": {"security_context": {"namespace_options": {"network": "host"}}}}))
                .unwrap_err()
                .to_string();
        assert!(err.contains("linux.security_context.namespace_options.network"), "{err}");
        let err = from_value::<ContainerConfig>(serde_json::json!({"command": "sh"})).unwrap_err().to_string();
        assert!(err.contains("field command") && err.contains("expected a list"), "{err}");
        let err = from_value::<ContainerConfig>(serde_json::json!({"envs": [{"key": "A"}, {"key": 1}]})).unwrap_err().to_string();
        assert!(err.contains("envs[1].key"), "{err}");
        let err = from_value::<ContainerConfig>(serde_json::json!([1])).unwrap_err().to_string();
        assert!(err.contains("expected an object"), "{err}");
    }

    #[test]
    fn files_are_named_in_errors() {
        let dir = std::env::temp_dir().join(format!("vfvm-crictl-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.json");
        let err = load_pod_config(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.json"), "{err}");
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"metadata\": ").unwrap();
        let err = load_pod_config(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("not JSON"), "{err}");
        let good = dir.join("c.json");
        std::fs::write(&good, CONTAINER).unwrap();
        assert_eq!(load_container_config(&good).unwrap().metadata.unwrap().name, "busybox");
        std::fs::write(&bad, r#"{"metadata": {"name": 5}}"#).unwrap();
        let err = load_container_config(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("metadata.name"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
