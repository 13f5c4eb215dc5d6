//! The JSON `crictl inspect` / `inspectp` print: `{"status": ..., "info": ...}`
//! with the status in protobuf's JSON form (lowerCamelCase names, enums by name),
//! so a test reading `status.state` or `status.logPath` works with either client.

use std::collections::HashMap;

use k8s_cri::v1::{ContainerState, ContainerStatus, PodSandboxState, PodSandboxStatus};
use serde_json::{Map, Value};

/// Fields that are maps of user data: their keys stay as they are.
const MAP_FIELDS: &[&str] = &["labels", "annotations"];

/// `crictl inspect CONTAINER`.
pub fn container(status: &ContainerStatus, info: &HashMap<String, String>) -> Value {
    let mut s = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Some(o) = s.as_object_mut() {
        let name = ContainerState::try_from(status.state).map_or("CONTAINER_UNKNOWN", |st| st.as_str_name());
        o.insert("state".into(), Value::String(name.into()));
    }
    document(s, info)
}

/// `crictl inspectp POD`.
pub fn pod(status: &PodSandboxStatus, info: &HashMap<String, String>) -> Value {
    let mut s = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Some(o) = s.as_object_mut() {
        let name = PodSandboxState::try_from(status.state).map_or("SANDBOX_NOTREADY", |st| st.as_str_name());
        o.insert("state".into(), Value::String(name.into()));
    }
    document(s, info)
}

fn document(status: Value, info: &HashMap<String, String>) -> Value {
    // The runtime's verbose info is JSON text per key; containerd uses one key, "info".
    let mut parsed: Map<String, Value> =
        info.iter().map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone())))).collect();
    let info = match (parsed.len(), parsed.remove("info")) {
        (1, Some(only)) => only,
        (_, Some(inner)) => {
            parsed.insert("info".into(), inner);
            Value::Object(parsed)
        }
        (_, None) => Value::Object(parsed),
    };
    let mut doc = Map::new();
    doc.insert("status".into(), camel_case(status));
    doc.insert("info".into(), info);
    Value::Object(doc)
}

/// Renames snake_case keys to lowerCamelCase, recursively (user maps excepted).
pub fn camel_case(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if MAP_FIELDS.contains(&k.as_str()) { v } else { camel_case(v) };
                    (lower_camel(&k), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(camel_case).collect()),
        other => other,
    }
}

fn lower_camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::ContainerMetadata;

    #[test]
    fn container_status_reads_like_crictls() {
        let status = ContainerStatus {
            id: "abc".into(),
            metadata: Some(ContainerMetadata { name: "c1".into(), attempt: 0 }),
            state: ContainerState::ContainerRunning as i32,
            log_path: "/var/log/pods/x/c1/0.log".into(),
            labels: HashMap::from([("io.kubernetes.pod_name".to_string(), "a".to_string())]),
            ..Default::default()
        };
        let info = HashMap::from([("info".to_string(), r#"{"sandboxID": "p1", "pid": 42}"#.to_string())]);
        let doc = container(&status, &info);
        assert_eq!(doc["status"]["state"], "CONTAINER_RUNNING");
        assert_eq!(doc["status"]["logPath"], "/var/log/pods/x/c1/0.log");
        assert_eq!(doc["status"]["metadata"]["name"], "c1");
        assert_eq!(doc["status"]["labels"]["io.kubernetes.pod_name"], "a", "user keys stay as they are");
        assert_eq!(doc["info"]["sandboxID"], "p1");
        assert_eq!(doc["info"]["pid"], 42);
    }

    #[test]
    fn pod_status_reads_like_crictls() {
        let status = PodSandboxStatus {
            id: "p1".into(),
            state: PodSandboxState::SandboxReady as i32,
            runtime_handler: "kata".into(),
            ..Default::default()
        };
        let info = HashMap::from([("info".to_string(), "not json".to_string()), ("other".to_string(), "[1]".to_string())]);
        let doc = pod(&status, &info);
        assert_eq!(doc["status"]["state"], "SANDBOX_READY");
        assert_eq!(doc["status"]["runtimeHandler"], "kata");
        assert_eq!(doc["info"]["info"], "not json");
        assert_eq!(doc["info"]["other"], serde_json::json!([1]));
        assert_eq!(lower_camel("pod_sandbox_id"), "podSandboxId");
    }
}
