//! STUB: the per-instance user-space TCP/IP stack (metadata service on
//! 169.254.169.254, the gateway address, published ports) is the other
//! half of this crate and replaces this file. Until then it drops every
//! frame it is given, emits nothing and closes every ingress connection.

use std::net::Ipv4Addr;
use std::sync::Arc;

/// The instance metadata service's address.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What the metadata service serves to one instance.
pub struct InstanceMetadata {
    pub instance_id: String,
    pub local_ipv4: Ipv4Addr,
    pub mac: [u8; 6],
    pub ssh_public_keys: Vec<String>,
    pub user_data: Vec<u8>,
    pub identity_document: Vec<u8>,
}

impl std::fmt::Debug for InstanceMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceMetadata")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// The addresses of one instance port, as the switch assigns them.
#[derive(Debug)]
pub struct StackConfig {
    pub gateway_mac: [u8; 6],
    pub gateway_ip: Ipv4Addr,
    pub instance_mac: [u8; 6],
    pub instance_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub metadata: Arc<InstanceMetadata>,
}

/// STUB of the per-instance stack: drops everything.
#[derive(Debug)]
pub struct GuestStack {
    _cfg: StackConfig,
}

impl GuestStack {
    pub fn new(cfg: StackConfig) -> Self {
        Self { _cfg: cfg }
    }

    /// An Ethernet frame from the instance for the gateway or the metadata address.
    pub fn receive(&mut self, _frame: &[u8], _now: std::time::Instant) {}

    /// Emits the frames to send to the instance.
    pub fn poll(&mut self, _now: std::time::Instant, _emit: &mut dyn FnMut(&[u8])) {}

    /// How soon `poll` wants to run again (None: only on input).
    pub fn poll_delay(&self, _now: std::time::Instant) -> Option<std::time::Duration> {
        None
    }

    /// An accepted ingress connection for `instance_port` (non-blocking stream; the stack relays it).
    pub fn ingress(&mut self, stream: std::net::TcpStream, _instance_port: u16) {
        drop(stream);
    }
}
