//! The customer API's routes, and the one parser of its requests.

use nitrile_api::{IdError, Name, Operation, ResourceId, ResourceKind};
use nitrile_image::Digest;
use serde::de::DeserializeOwned;

use crate::upload::{ImageUpload, MAX_UPLOAD_BODY, UploadError};
use crate::wire::{MAX_REQUEST_BODY, RunRequest};
use crate::{image_resource, instance_resource};

/// One route of the customer API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method.
    pub method: &'static str,
    /// The path, with `{name}` or `{digest}`.
    pub path: &'static str,
    /// The operation the customer's token must grant.
    pub operation: Operation,
}

/// Every route of the customer API; there is no other.
pub const ROUTES: [Route; 10] = [
    Route {
        method: "POST",
        path: "/v1/instances",
        operation: Operation::CustomerInstanceRun,
    },
    Route {
        method: "GET",
        path: "/v1/instances",
        operation: Operation::CustomerInstanceList,
    },
    Route {
        method: "GET",
        path: "/v1/instances/{name}",
        operation: Operation::CustomerInstanceDescribe,
    },
    Route {
        method: "POST",
        path: "/v1/instances/{name}/stop",
        operation: Operation::CustomerInstanceStop,
    },
    Route {
        method: "POST",
        path: "/v1/instances/{name}/start",
        operation: Operation::CustomerInstanceStart,
    },
    Route {
        method: "DELETE",
        path: "/v1/instances/{name}",
        operation: Operation::CustomerInstanceTerminate,
    },
    Route {
        method: "POST",
        path: "/v1/images",
        operation: Operation::CustomerImageImport,
    },
    Route {
        method: "GET",
        path: "/v1/images",
        operation: Operation::CustomerImageList,
    },
    Route {
        method: "GET",
        path: "/v1/images/{digest}",
        operation: Operation::CustomerImageDescribe,
    },
    Route {
        method: "DELETE",
        path: "/v1/images/{digest}",
        operation: Operation::CustomerImageDelete,
    },
];

/// Most characters of a refused path or method kept in an error.
const MAX_SHOWN: usize = 120;

fn clip(s: &str) -> String {
    s.chars().take(MAX_SHOWN).collect()
}

/// Why an HTTP request is not a request of the customer API. Paths and
/// names from the request are clipped to 120 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// no route has this path
    #[error("no endpoint of the placement service at {0:?}")]
    UnknownPath(String),
    /// the path exists, but not with this method
    #[error("{method} is not allowed on {path:?}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
    },
    /// the request has a query string; no endpoint takes one
    #[error("no endpoint of the placement service takes a query string")]
    QueryString,
    /// the body is larger than the route allows
    #[error("request body of {got} bytes is larger than {max}")]
    TooLarge {
        /// Bytes sent.
        got: usize,
        /// The route's bound.
        max: usize,
    },
    /// an instance name or image digest in the path is not one
    #[error("{what} {shown:?} in the path is not valid: {reason}")]
    BadPath {
        /// `instance name` or `image digest`.
        what: &'static str,
        /// The text, clipped.
        shown: String,
        /// Why.
        reason: String,
    },
    /// the body is not the operation's request
    #[error("invalid {operation} request: {reason}")]
    BadBody {
        /// The operation whose body was wrong.
        operation: Operation,
        /// Why (serde's message: the field and what is wrong with it).
        reason: String,
    },
    /// the image upload is malformed
    #[error("invalid image upload: {0}")]
    BadUpload(#[from] UploadError),
}

impl RequestError {
    /// The HTTP status the placement service answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownPath(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::TooLarge { .. } => 413,
            Self::BadUpload(
                UploadError::KernelTooLarge(_)
                | UploadError::InitramfsTooLarge(_)
                | UploadError::HeadTooLarge(_),
            ) => 413,
            Self::QueryString
            | Self::BadPath { .. }
            | Self::BadBody { .. }
            | Self::BadUpload(_) => 400,
        }
    }

    /// A short stable code for the journal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownPath(_) => "unknown_path",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::QueryString => "query_string",
            Self::TooLarge { .. } => "too_large",
            Self::BadPath { .. } => "bad_path",
            Self::BadBody { .. } => "bad_body",
            Self::BadUpload(UploadError::WrongDigest { .. }) => "wrong_digest",
            Self::BadUpload(_) => "bad_upload",
        }
    }
}

/// A request of the customer API, parsed: the only form in which the
/// placement service sees one. An upload borrows the body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlacedRequest<'a> {
    /// Run an instance.
    Run(RunRequest),
    /// List the caller's instances.
    ListInstances,
    /// Describe one.
    DescribeInstance(Name),
    /// Stop one.
    StopInstance(Name),
    /// Start one.
    StartInstance(Name),
    /// Terminate one.
    TerminateInstance(Name),
    /// Import an image.
    ImportImage(ImageUpload<'a>),
    /// List the caller's images.
    ListImages,
    /// Describe one.
    DescribeImage(Digest),
    /// Delete one.
    DeleteImage(Digest),
}

fn body<T: DeserializeOwned>(operation: Operation, body: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(body).map_err(|e| RequestError::BadBody {
        operation,
        reason: e.to_string(),
    })
}

fn empty_body(operation: Operation, bytes: &[u8]) -> Result<(), RequestError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match body::<serde_json::Value>(operation, bytes)? {
        serde_json::Value::Object(fields) if fields.is_empty() => Ok(()),
        _ => Err(RequestError::BadBody {
            operation,
            reason: "this request takes no body (or `{}`)".into(),
        }),
    }
}

fn instance_name(text: &str) -> Result<Name, RequestError> {
    Name::new(text).map_err(|e| RequestError::BadPath {
        what: "instance name",
        shown: clip(text),
        reason: e.to_string(),
    })
}

fn digest(text: &str) -> Result<Digest, RequestError> {
    text.parse::<Digest>().map_err(|e| RequestError::BadPath {
        what: "image digest",
        shown: clip(text),
        reason: e.to_string(),
    })
}

impl<'a> PlacedRequest<'a> {
    /// Parses an HTTP request (method, path, query, body) into the closed
    /// set, failing closed on anything else.
    pub fn parse(
        method: &str,
        path: &str,
        query: Option<&str>,
        bytes: &'a [u8],
    ) -> Result<Self, RequestError> {
        let segments: Vec<&str> = match path.strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None => return Err(RequestError::UnknownPath(clip(path))),
        };
        let upload = matches!((segments.as_slice(), method), (["v1", "images"], "POST"));
        let max = if upload {
            MAX_UPLOAD_BODY
        } else {
            MAX_REQUEST_BODY
        };
        if bytes.len() > max {
            return Err(RequestError::TooLarge {
                got: bytes.len(),
                max,
            });
        }
        let not_allowed = || RequestError::MethodNotAllowed {
            method: clip(method),
            path: clip(path),
        };
        let req = match (segments.as_slice(), method) {
            (["v1", "instances"], "POST") => {
                Self::Run(body(Operation::CustomerInstanceRun, bytes)?)
            }
            (["v1", "instances"], "GET") => {
                empty_body(Operation::CustomerInstanceList, bytes)?;
                Self::ListInstances
            }
            (["v1", "instances"], _) => return Err(not_allowed()),
            (["v1", "instances", n], "GET") => {
                let n = instance_name(n)?;
                empty_body(Operation::CustomerInstanceDescribe, bytes)?;
                Self::DescribeInstance(n)
            }
            (["v1", "instances", n], "DELETE") => {
                let n = instance_name(n)?;
                empty_body(Operation::CustomerInstanceTerminate, bytes)?;
                Self::TerminateInstance(n)
            }
            (["v1", "instances", _], _) => return Err(not_allowed()),
            (["v1", "instances", n, "stop"], "POST") => {
                let n = instance_name(n)?;
                empty_body(Operation::CustomerInstanceStop, bytes)?;
                Self::StopInstance(n)
            }
            (["v1", "instances", n, "start"], "POST") => {
                let n = instance_name(n)?;
                empty_body(Operation::CustomerInstanceStart, bytes)?;
                Self::StartInstance(n)
            }
            (["v1", "instances", _, "stop" | "start"], _) => return Err(not_allowed()),
            (["v1", "images"], "POST") => Self::ImportImage(ImageUpload::parse(bytes)?),
            (["v1", "images"], "GET") => {
                empty_body(Operation::CustomerImageList, bytes)?;
                Self::ListImages
            }
            (["v1", "images"], _) => return Err(not_allowed()),
            (["v1", "images", d], "GET") => {
                let d = digest(d)?;
                empty_body(Operation::CustomerImageDescribe, bytes)?;
                Self::DescribeImage(d)
            }
            (["v1", "images", d], "DELETE") => {
                let d = digest(d)?;
                empty_body(Operation::CustomerImageDelete, bytes)?;
                Self::DeleteImage(d)
            }
            (["v1", "images", _], _) => return Err(not_allowed()),
            _ => return Err(RequestError::UnknownPath(clip(path))),
        };
        if query.is_some() {
            return Err(RequestError::QueryString);
        }
        Ok(req)
    }

    /// The operation the token must grant.
    pub fn operation(&self) -> Operation {
        match self {
            Self::Run(_) => Operation::CustomerInstanceRun,
            Self::ListInstances => Operation::CustomerInstanceList,
            Self::DescribeInstance(_) => Operation::CustomerInstanceDescribe,
            Self::StopInstance(_) => Operation::CustomerInstanceStop,
            Self::StartInstance(_) => Operation::CustomerInstanceStart,
            Self::TerminateInstance(_) => Operation::CustomerInstanceTerminate,
            Self::ImportImage(_) => Operation::CustomerImageImport,
            Self::ListImages => Operation::CustomerImageList,
            Self::DescribeImage(_) => Operation::CustomerImageDescribe,
            Self::DeleteImage(_) => Operation::CustomerImageDelete,
        }
    }

    /// The exact resource the token must name, for `customer` in `cell`:
    /// `instance/<customer>--<name>`, `image/<customer>--<24 hex>` (the
    /// stated digest, for an import), or `placement/<cell>` for a list.
    /// Refused when the customer's name leaves no room for the resource's.
    pub fn resource(&self, customer: &Name, cell: &Name) -> Result<ResourceId, IdError> {
        match self {
            Self::Run(r) => instance_resource(customer, &r.name),
            Self::DescribeInstance(n)
            | Self::StopInstance(n)
            | Self::StartInstance(n)
            | Self::TerminateInstance(n) => instance_resource(customer, n),
            Self::ImportImage(u) => image_resource(customer, &u.head.digest),
            Self::DescribeImage(d) | Self::DeleteImage(d) => image_resource(customer, d),
            Self::ListInstances | Self::ListImages => {
                Ok(ResourceId::new(ResourceKind::Placement, cell.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_parses_to_its_operation() {
        let d = "ab".repeat(32);
        let run = format!(r#"{{"name":"web1","image":"{d}","memory_mib":256,"vcpus":1}}"#);
        let upload = crate::upload::encode("x", d.parse().unwrap(), b"K", b"I", None);
        for route in ROUTES {
            let path = route.path.replace("{name}", "web1").replace("{digest}", &d);
            let body: &[u8] = match route.operation {
                Operation::CustomerInstanceRun => run.as_bytes(),
                Operation::CustomerImageImport => &upload,
                _ => b"",
            };
            let req = PlacedRequest::parse(route.method, &path, None, body)
                .unwrap_or_else(|e| panic!("{} {path}: {e}", route.method));
            assert_eq!(req.operation(), route.operation);
        }
    }

    #[test]
    fn anything_else_is_refused_with_its_status() {
        type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a [u8], u16);
        let cases: [Case<'_>; 8] = [
            ("GET", "/v1/hosts", None, b"", 404),
            ("PUT", "/v1/instances", None, b"", 405),
            ("GET", "/v1/instances", Some("all=1"), b"", 400),
            ("GET", "/v1/instances/Web", None, b"", 400),
            ("GET", "/v1/images/sha256:00", None, b"", 400),
            ("POST", "/v1/instances", None, b"{}", 400),
            ("POST", "/v1/images", None, b"not an upload", 400),
            ("GET", "/v1/instances/web1", None, br#"{"x":1}"#, 400),
        ];
        for (method, path, query, body, status) in cases {
            let e = PlacedRequest::parse(method, path, query, body).unwrap_err();
            assert_eq!(e.status(), status, "{method} {path}: {e}");
        }
        let big = vec![b' '; MAX_REQUEST_BODY + 1];
        assert_eq!(
            PlacedRequest::parse("GET", "/v1/instances", None, &big)
                .unwrap_err()
                .status(),
            413
        );
    }

    #[test]
    fn resources_are_the_callers_own() {
        let acme = Name::new("acme").unwrap();
        let cell = Name::new("local").unwrap();
        let req = PlacedRequest::parse("DELETE", "/v1/instances/web1", None, b"").unwrap();
        assert_eq!(
            req.resource(&acme, &cell).unwrap().to_string(),
            "instance/acme--web1"
        );
        let d = "0123456789abcdef".repeat(4);
        let req = PlacedRequest::parse("GET", &format!("/v1/images/{d}"), None, b"").unwrap();
        assert_eq!(
            req.resource(&acme, &cell).unwrap().to_string(),
            "image/acme--0123456789abcdef01234567"
        );
        let req = PlacedRequest::parse("GET", "/v1/images", None, b"").unwrap();
        assert_eq!(
            req.resource(&acme, &cell).unwrap().to_string(),
            "placement/local"
        );
        let long = Name::new(&"a".repeat(40)).unwrap();
        assert!(req.resource(&long, &cell).is_ok());
        let req = PlacedRequest::parse("GET", &format!("/v1/images/{d}"), None, b"").unwrap();
        assert!(req.resource(&long, &cell).is_err());
    }
}
