//! A CRI RuntimeService client over containerd's Unix socket (gRPC, HTTP/2).

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub type Client = RuntimeServiceClient<Channel>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("runtime endpoint {0:?}: only unix:// endpoints (or a socket path) are supported")]
    Endpoint(String),
    #[error("connecting to the runtime endpoint {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
}

/// The socket path of a crictl-style endpoint: `unix:///run/x.sock` or `/run/x.sock`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ClientError> {
    let path = match endpoint.strip_prefix("unix://") {
        Some(p) => p,
        None if endpoint.starts_with('/') => endpoint,
        None => return Err(ClientError::Endpoint(endpoint.to_string())),
    };
    if path.is_empty() {
        return Err(ClientError::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Connects to the runtime at `endpoint`; every call then gets `timeout`.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Client, ClientError> {
    let path = socket_path(endpoint)?;
    let fail = |reason: String| ClientError::Connect { endpoint: endpoint.to_string(), reason };
    // The URI is a placeholder: the connector below ignores it and dials the socket.
    let endpoint_cfg = Endpoint::from_static("http://localhost").connect_timeout(timeout).timeout(timeout);
    let channel = endpoint_cfg.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    }));
    let channel = tokio::time::timeout(timeout, channel)
        .await
        .map_err(|_| fail(format!("no connection within {}s", timeout.as_secs())))?
        .map_err(|e| fail(error_chain(&e)))?;
    Ok(RuntimeServiceClient::new(channel))
}

/// An error with its causes, as `a: b: c` (tonic's transport errors say little
/// on their own).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A CRI call's failure as crictl words it: the text of Go's gRPC status error,
/// `rpc error: code = InvalidArgument desc = <the runtime's message>`. A failure
/// of the transport (no runtime answering) has its causes after the message.
pub fn status_message(s: &tonic::Status) -> String {
    let mut text = format!("rpc error: code = {} desc = {}", go_code_name(s.code()), s.message());
    if let Some(src) = std::error::Error::source(s) {
        let causes = error_chain(src);
        if !s.message().contains(&causes) {
            text.push_str(": ");
            text.push_str(&causes);
        }
    }
    text
}

/// A gRPC status code's name as Go's `codes.Code.String()` writes it.
pub fn go_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_sockets() {
        assert_eq!(socket_path("unix:///run/containerd/containerd.sock").unwrap(), PathBuf::from("/run/containerd/containerd.sock"));
        assert_eq!(socket_path("/tmp/c.sock").unwrap(), PathBuf::from("/tmp/c.sock"));
        assert!(socket_path("tcp://127.0.0.1:1").unwrap_err().to_string().contains("tcp://127.0.0.1:1"));
        assert!(socket_path("unix://").is_err());
    }

    #[test]
    fn statuses_read_as_gos() {
        let s = tonic::Status::invalid_argument("annotation default_vcpus \"64\": from 1 to 8");
        assert_eq!(status_message(&s), "rpc error: code = InvalidArgument desc = annotation default_vcpus \"64\": from 1 to 8");
        assert_eq!(status_message(&tonic::Status::cancelled("stop")), "rpc error: code = Canceled desc = stop");
        assert_eq!(status_message(&tonic::Status::ok("")), "rpc error: code = OK desc = ");
        assert_eq!(go_code_name(tonic::Code::DeadlineExceeded), "DeadlineExceeded");
    }

    #[test]
    fn a_missing_socket_is_a_named_connect_error() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let endpoint = format!("unix:///tmp/vfvm-crictl-nothing-{}.sock", std::process::id());
        let err = rt.block_on(connect(&endpoint, Duration::from_secs(5))).unwrap_err().to_string();
        assert!(err.contains(&endpoint) && err.to_lowercase().contains("no such file"), "{err}");
    }
}
