//! The customer API of nitrile's placement service (`nitrile placed`) as
//! both sides speak it: the routes ([`ROUTES`]) and the one parser of a
//! request ([`PlacedRequest::parse`]), the JSON bodies ([`wire`]) with their
//! bounds, the framed image upload ([`upload`]), and [`PlacedClient`], the
//! mTLS client the CLI calls placement with. The CLI needs only this crate,
//! never the placement service's.
//!
//! Every call is a customer's (`nitrile://<cell>/customer/<name>`) with its
//! own token for audience [`PLACEMENT_SERVICE`], naming exactly the
//! resource of the call: `instance/<customer>--<name>`,
//! `image/<customer>--<first 24 hex digits of the digest>`
//! ([`image_resource`]), or `placement/<cell>` for the lists
//! ([`PlacedRequest::resource`]). Every refusal is a
//! [`nitrile_api::wire::Refusal`].
//!
//! What it guarantees: a request body is read only up to
//! [`MAX_REQUEST_BODY`] bytes for JSON and [`MAX_UPLOAD_BODY`] for an image
//! upload, whose head is at most [`upload::MAX_UPLOAD_HEAD`] bytes and whose
//! parts are at most [`upload::MAX_KERNEL`] and [`upload::MAX_INITRAMFS`]
//! bytes with a command line of at most [`upload::MAX_CMDLINE`]; names and
//! digests in paths and bodies only as [`nitrile_api::Name`]s and
//! [`nitrile_image::Digest`]s; SSH keys, user data and published ports within
//! [`wire::MAX_SSH_KEYS`], [`wire::MAX_SSH_KEY_LEN`], [`wire::MAX_USER_DATA`]
//! and [`wire::MAX_PUBLISHED_PORTS`]; unknown fields refused. No response
//! type carries user data or keys: answers are metadata only.
//!
//! What it does not do: check tokens or ownership, pick hosts, or store
//! anything (the placement service does).

#![forbid(unsafe_code)]

mod client;
mod request;
pub mod upload;
pub mod wire;

use nitrile_api::{IdError, Name, PrincipalId, PrincipalKind, ResourceId, ResourceKind};
use nitrile_image::Digest;

pub use client::{PlacedClient, PlacedClientError, placement_principal};
pub use request::{PlacedRequest, ROUTES, RequestError, Route};
pub use upload::{ImageUpload, MAX_UPLOAD_BODY, UploadError, UploadHead};
pub use wire::MAX_REQUEST_BODY;

/// The placement service's name: its principal is
/// `nitrile://<cell>/service/placement` and the audience of customers'
/// tokens is `placement`.
pub const PLACEMENT_SERVICE: &str = "placement";

/// How many hex digits of an image digest name the image resource.
pub const IMAGE_RESOURCE_HEX: usize = 24;

/// The resource a customer's image is named by in tokens:
/// `image/<customer>--<first 24 hex digits of the digest>`; refused for a
/// customer name too long to leave room for the digest.
pub fn image_resource(customer: &Name, digest: &Digest) -> Result<ResourceId, IdError> {
    let hex = digest.to_hex();
    ResourceId::owned(ResourceKind::Image, customer, &hex[..IMAGE_RESOURCE_HEX])
}

/// The resource a customer's instance `name` is named by:
/// `instance/<customer>--<name>`; refused when the whole is longer than a
/// name may be.
pub fn instance_resource(customer: &Name, name: &Name) -> Result<ResourceId, IdError> {
    ResourceId::owned(ResourceKind::Instance, customer, name.as_str())
}

/// The customer a principal is, if it is one.
pub fn customer_of(principal: &PrincipalId) -> Option<&Name> {
    (principal.kind == PrincipalKind::Customer).then_some(&principal.name)
}
