//! virtio-vsock with hybrid vsock on the host (being written).
