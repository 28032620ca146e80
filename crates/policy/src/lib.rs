//! Cedar entitlements, reviewer-signed bundles and durable quotas.

#![forbid(unsafe_code)]
