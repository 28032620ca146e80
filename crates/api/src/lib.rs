//! The closed vocabulary every nitrile component speaks.
//!
//! This crate guarantees that an admin operation, a principal, a resource and a
//! token audience can only exist in a parsed, valid form: every type here is a
//! closed enum or a newtype whose constructor fails closed, and unknown names are
//! errors, never passed through. There is no "other" operation and no free-form
//! resource; adding one is a reviewed change to this crate.
//!
//! The host admin API is [`admin`]: one closed request enum,
//! [`admin::AdminRequest`], parsed from method, path and body by
//! [`admin::AdminRequest::parse`], one route per served operation in
//! [`admin::ROUTES`], and responses that hold metadata only (names, states,
//! numbers, digests; no byte field). Its OpenAPI 3.1 document is generated from
//! that code by [`openapi::document`] and checked in as `openapi.json`; tests
//! fail when the two drift, when an [`Operation`] has no reviewed entry in
//! `OPERATIONS.md`, and when a response schema could carry more than metadata
//! ([`openapi::metadata_only`]).
//!
//! It does not authenticate, authorize or do I/O: it only names things. The
//! token service (`nitrile-tokend`) and hosts (`nitrile-hostd`) exchange the wire
//! types in [`wire`] and [`admin`] as JSON.

#![forbid(unsafe_code)]

pub mod admin;
mod id;
pub mod network;
mod op;
pub mod openapi;
pub mod wire;

pub use id::{
    Audience, IdError, MAX_NAME_LEN, MAX_PRINCIPAL_URI_LEN, Name, OWNER_SEPARATOR, PrincipalId,
    PrincipalKind, ResourceId, ResourceKind,
};
pub use op::{OpError, Operation};
