//! The token service: authenticates principals, checks entitlements and quotas, mints tokens.

#![forbid(unsafe_code)]
