//! Cell certificate authority, principal certificates and the one TLS configuration builder.

#![forbid(unsafe_code)]
