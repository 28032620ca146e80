//! The key service's routes, and the one parser of its requests.

use nitrile_api::{IdError, Name, Operation, ResourceId, ResourceKind};
use serde::de::DeserializeOwned;

use crate::wire::{
    CreateKeyRequest, GenerateRequest, MAX_REQUEST_BODY, ScheduleDeletionRequest, UnwrapRequest,
};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A host, over its own mTLS identity, relaying the token its caller
    /// presented to it for `operation` (audience: that host).
    Host,
    /// Any principal of the cell with its own token for `operation`
    /// (audience: the key service).
    Principal,
}

/// One route of the key service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method.
    pub method: &'static str,
    /// The path, with `{volume}` or `{key}` for a name.
    pub path: &'static str,
    /// The operation the token must grant.
    pub operation: Operation,
    /// Who calls it.
    pub caller: Caller,
}

/// Every route of the key service; there is no other.
pub const ROUTES: [Route; 10] = [
    Route {
        method: "POST",
        path: "/v1/volume-keys/{volume}",
        operation: Operation::VolumeCreate,
        caller: Caller::Host,
    },
    Route {
        method: "POST",
        path: "/v1/volume-keys/{volume}/unwrap",
        operation: Operation::VolumeAttach,
        caller: Caller::Host,
    },
    Route {
        method: "DELETE",
        path: "/v1/volume-keys/{volume}",
        operation: Operation::VolumeDelete,
        caller: Caller::Host,
    },
    Route {
        method: "POST",
        path: "/v1/keys",
        operation: Operation::KmsKeyCreate,
        caller: Caller::Principal,
    },
    Route {
        method: "GET",
        path: "/v1/keys",
        operation: Operation::KmsKeyList,
        caller: Caller::Principal,
    },
    Route {
        method: "GET",
        path: "/v1/keys/{key}",
        operation: Operation::KmsKeyDescribe,
        caller: Caller::Principal,
    },
    Route {
        method: "POST",
        path: "/v1/keys/{key}/disable",
        operation: Operation::KmsKeyDisable,
        caller: Caller::Principal,
    },
    Route {
        method: "POST",
        path: "/v1/keys/{key}/enable",
        operation: Operation::KmsKeyEnable,
        caller: Caller::Principal,
    },
    Route {
        method: "POST",
        path: "/v1/keys/{key}/schedule-deletion",
        operation: Operation::KmsKeyScheduleDeletion,
        caller: Caller::Principal,
    },
    Route {
        method: "POST",
        path: "/v1/keys/{key}/cancel-deletion",
        operation: Operation::KmsKeyCancelDeletion,
        caller: Caller::Principal,
    },
];

/// Most characters of a refused path or method kept in an error.
const MAX_SHOWN: usize = 120;

fn clip(s: &str) -> String {
    s.chars().take(MAX_SHOWN).collect()
}

/// Why an HTTP request is not a request of the key service. Paths and
/// names from the request are clipped to 120 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// no route has this path
    #[error("no endpoint of the key service at {0:?}")]
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
    #[error("no endpoint of the key service takes a query string")]
    QueryString,
    /// the body is larger than [`MAX_REQUEST_BODY`]
    #[error("request body of {0} bytes is larger than {MAX_REQUEST_BODY}")]
    TooLarge(usize),
    /// a volume or key name in the path is not a name
    #[error("{what} {shown:?} in the path is not a name: {reason}")]
    BadName {
        /// `volume` or `key`.
        what: &'static str,
        /// The text, clipped.
        shown: String,
        /// Why.
        reason: IdError,
    },
    /// the body is not the operation's request
    #[error("invalid {operation} request: {reason}")]
    BadBody {
        /// The operation whose body was wrong.
        operation: Operation,
        /// Why (serde's message: the field and what is wrong with it).
        reason: String,
    },
}

impl RequestError {
    /// The HTTP status the key service answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownPath(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::TooLarge(_) => 413,
            Self::QueryString | Self::BadName { .. } | Self::BadBody { .. } => 400,
        }
    }

    /// A short stable code for the journal: `unknown_path`,
    /// `method_not_allowed`, `query_string`, `too_large`, `bad_name`,
    /// `bad_body`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownPath(_) => "unknown_path",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::QueryString => "query_string",
            Self::TooLarge(_) => "too_large",
            Self::BadName { .. } => "bad_name",
            Self::BadBody { .. } => "bad_body",
        }
    }
}

/// A request of the key service, parsed: the only form in which the
/// service sees one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KmsRequest {
    /// Make `volume`'s data key (a host relaying `volume.create`).
    Generate {
        /// The volume.
        volume: Name,
        /// The key to wrap it under.
        body: GenerateRequest,
    },
    /// Release `volume`'s data key sealed to a recipient (a host relaying
    /// `volume.attach`).
    Unwrap {
        /// The volume.
        volume: Name,
        /// The wrapped key and the recipient.
        body: UnwrapRequest,
    },
    /// Destroy `volume`'s key record (a host relaying `volume.delete`).
    Destroy {
        /// The volume.
        volume: Name,
    },
    /// Create a key owned by the caller.
    CreateKey(CreateKeyRequest),
    /// List the keys the caller may see.
    ListKeys,
    /// Describe a key.
    DescribeKey(Name),
    /// Disable a key.
    DisableKey(Name),
    /// Enable a key.
    EnableKey(Name),
    /// Schedule a key's destruction.
    ScheduleKeyDeletion(Name, ScheduleDeletionRequest),
    /// Cancel a key's scheduled destruction.
    CancelKeyDeletion(Name),
}

fn body<T: DeserializeOwned>(operation: Operation, body: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(body).map_err(|e| RequestError::BadBody {
        operation,
        reason: e.to_string(),
    })
}

/// An empty body, or `{}`.
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

fn name(what: &'static str, text: &str) -> Result<Name, RequestError> {
    Name::new(text).map_err(|reason| RequestError::BadName {
        what,
        shown: clip(text),
        reason,
    })
}

impl KmsRequest {
    /// Parses an HTTP request (method, path, query, body) into the closed
    /// set, failing closed on anything else.
    pub fn parse(
        method: &str,
        path: &str,
        query: Option<&str>,
        bytes: &[u8],
    ) -> Result<Self, RequestError> {
        if bytes.len() > MAX_REQUEST_BODY {
            return Err(RequestError::TooLarge(bytes.len()));
        }
        let segments: Vec<&str> = match path.strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None => return Err(RequestError::UnknownPath(clip(path))),
        };
        let not_allowed = || RequestError::MethodNotAllowed {
            method: clip(method),
            path: clip(path),
        };
        let req = match (segments.as_slice(), method) {
            (["v1", "volume-keys", v], "POST") => Self::Generate {
                volume: name("volume", v)?,
                body: body(Operation::VolumeCreate, bytes)?,
            },
            (["v1", "volume-keys", v], "DELETE") => {
                let volume = name("volume", v)?;
                empty_body(Operation::VolumeDelete, bytes)?;
                Self::Destroy { volume }
            }
            (["v1", "volume-keys", _], _) => return Err(not_allowed()),
            (["v1", "volume-keys", v, "unwrap"], "POST") => Self::Unwrap {
                volume: name("volume", v)?,
                body: body(Operation::VolumeAttach, bytes)?,
            },
            (["v1", "volume-keys", _, "unwrap"], _) => return Err(not_allowed()),
            (["v1", "keys"], "GET") => {
                empty_body(Operation::KmsKeyList, bytes)?;
                Self::ListKeys
            }
            (["v1", "keys"], "POST") => Self::CreateKey(body(Operation::KmsKeyCreate, bytes)?),
            (["v1", "keys"], _) => return Err(not_allowed()),
            (["v1", "keys", k], "GET") => {
                let key = name("key", k)?;
                empty_body(Operation::KmsKeyDescribe, bytes)?;
                Self::DescribeKey(key)
            }
            (["v1", "keys", _], _) => return Err(not_allowed()),
            (
                [
                    "v1",
                    "keys",
                    k,
                    action @ ("disable" | "enable" | "schedule-deletion" | "cancel-deletion"),
                ],
                "POST",
            ) => {
                let key = name("key", k)?;
                match *action {
                    "disable" => {
                        empty_body(Operation::KmsKeyDisable, bytes)?;
                        Self::DisableKey(key)
                    }
                    "enable" => {
                        empty_body(Operation::KmsKeyEnable, bytes)?;
                        Self::EnableKey(key)
                    }
                    "schedule-deletion" => {
                        let b = if bytes.iter().all(u8::is_ascii_whitespace) {
                            ScheduleDeletionRequest::default()
                        } else {
                            body(Operation::KmsKeyScheduleDeletion, bytes)?
                        };
                        Self::ScheduleKeyDeletion(key, b)
                    }
                    _ => {
                        empty_body(Operation::KmsKeyCancelDeletion, bytes)?;
                        Self::CancelKeyDeletion(key)
                    }
                }
            }
            (
                [
                    "v1",
                    "keys",
                    _,
                    "disable" | "enable" | "schedule-deletion" | "cancel-deletion",
                ],
                _,
            ) => {
                return Err(not_allowed());
            }
            _ => return Err(RequestError::UnknownPath(clip(path))),
        };
        // Checked last, so that a query on an unknown path is told as such.
        if query.is_some() {
            return Err(RequestError::QueryString);
        }
        Ok(req)
    }

    /// The operation the token must grant.
    pub fn operation(&self) -> Operation {
        match self {
            Self::Generate { .. } => Operation::VolumeCreate,
            Self::Unwrap { .. } => Operation::VolumeAttach,
            Self::Destroy { .. } => Operation::VolumeDelete,
            Self::CreateKey(_) => Operation::KmsKeyCreate,
            Self::ListKeys => Operation::KmsKeyList,
            Self::DescribeKey(_) => Operation::KmsKeyDescribe,
            Self::DisableKey(_) => Operation::KmsKeyDisable,
            Self::EnableKey(_) => Operation::KmsKeyEnable,
            Self::ScheduleKeyDeletion(..) => Operation::KmsKeyScheduleDeletion,
            Self::CancelKeyDeletion(_) => Operation::KmsKeyCancelDeletion,
        }
    }

    /// Who may call it.
    pub fn caller(&self) -> Caller {
        match self {
            Self::Generate { .. } | Self::Unwrap { .. } | Self::Destroy { .. } => Caller::Host,
            _ => Caller::Principal,
        }
    }

    /// The exact resource the token must name: `volume/<id>`,
    /// `kms-key/<name>`, or `kms/<cell>` for the list.
    pub fn resource(&self, cell: &Name) -> ResourceId {
        match self {
            Self::Generate { volume, .. }
            | Self::Unwrap { volume, .. }
            | Self::Destroy { volume } => ResourceId::new(ResourceKind::Volume, volume.clone()),
            Self::CreateKey(c) => ResourceId::new(ResourceKind::KmsKey, c.name.clone()),
            Self::ListKeys => ResourceId::new(ResourceKind::Kms, cell.clone()),
            Self::DescribeKey(k)
            | Self::DisableKey(k)
            | Self::EnableKey(k)
            | Self::ScheduleKeyDeletion(k, _)
            | Self::CancelKeyDeletion(k) => ResourceId::new(ResourceKind::KmsKey, k.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: &str, path: &str, body: &str) -> Result<KmsRequest, RequestError> {
        KmsRequest::parse(method, path, None, body.as_bytes())
    }

    #[test]
    fn every_route_parses_to_its_operation_caller_and_resource() {
        let cell = Name::new("local").unwrap();
        let unwrap = format!(
            r#"{{"wrapped_key":"AAAA","recipient":"{}"}}"#,
            "A".repeat(43) + "="
        );
        for (route, body, resource) in [
            (&ROUTES[0], r#"{"kms_key":"default"}"#, "volume/v-1"),
            (&ROUTES[1], unwrap.as_str(), "volume/v-1"),
            (&ROUTES[2], "", "volume/v-1"),
            (&ROUTES[3], r#"{"name":"k-1"}"#, "kms-key/k-1"),
            (&ROUTES[4], "", "kms/local"),
            (&ROUTES[5], "", "kms-key/k-1"),
            (&ROUTES[6], "{}", "kms-key/k-1"),
            (&ROUTES[7], "", "kms-key/k-1"),
            (&ROUTES[8], r#"{"days":7}"#, "kms-key/k-1"),
            (&ROUTES[9], "", "kms-key/k-1"),
        ] {
            let path = route
                .path
                .replace("{volume}", "v-1")
                .replace("{key}", "k-1");
            let req = parse(route.method, &path, body)
                .unwrap_or_else(|e| panic!("{} {path}: {e}", route.method));
            assert_eq!(req.operation(), route.operation, "{path}");
            assert_eq!(req.caller(), route.caller, "{path}");
            assert_eq!(req.resource(&cell).to_string(), resource, "{path}");
        }
        assert_eq!(
            parse("POST", "/v1/keys/k-1/schedule-deletion", "").unwrap(),
            KmsRequest::ScheduleKeyDeletion(
                Name::new("k-1").unwrap(),
                ScheduleDeletionRequest { days: None }
            )
        );
    }

    #[test]
    fn anything_else_is_refused_with_a_4xx_naming_why() {
        let cases: &[(&str, &str, &str, u16, &str)] = &[
            ("GET", "/v1/volume-keys/v-1", "", 405, "method_not_allowed"),
            ("PUT", "/v1/keys", "", 405, "method_not_allowed"),
            ("GET", "/v1/keys/k/disable", "", 405, "method_not_allowed"),
            ("POST", "/v1/keys/k/rotate", "", 404, "unknown_path"),
            ("GET", "/v2/keys", "", 404, "unknown_path"),
            ("GET", "keys", "", 404, "unknown_path"),
            ("POST", "/v1/volume-keys/..", "{}", 400, "bad_name"),
            ("POST", "/v1/volume-keys/a%00b", "{}", 400, "bad_name"),
            ("GET", "/v1/keys/UPPER", "", 400, "bad_name"),
            ("POST", "/v1/volume-keys/v", "{}", 400, "bad_body"),
            (
                "POST",
                "/v1/volume-keys/v",
                r#"{"kms_key":"default","size":1}"#,
                400,
                "bad_body",
            ),
            ("POST", "/v1/keys", r#"{"name":"../etc"}"#, 400, "bad_body"),
            ("POST", "/v1/keys", r#"{"name":"a\u0000"}"#, 400, "bad_body"),
            ("POST", "/v1/keys/k/disable", r#"{"x":1}"#, 400, "bad_body"),
            ("DELETE", "/v1/volume-keys/v", "[]", 400, "bad_body"),
        ];
        for (method, path, body, status, code) in cases {
            let e = parse(method, path, body).unwrap_err();
            assert_eq!(e.status(), *status, "{method} {path} {body}: {e}");
            assert_eq!(e.code(), *code, "{method} {path} {body}: {e}");
        }
        let long = "a".repeat(10_240);
        let e = parse("GET", &format!("/v1/keys/{long}"), "").unwrap_err();
        assert_eq!(e.code(), "bad_name");
        assert!(e.to_string().len() < 400, "{e}");
        let e = parse("POST", "/v1/keys", &format!(r#"{{"name":"{long}"}}"#)).unwrap_err();
        assert_eq!(e.code(), "too_large");
        let e = KmsRequest::parse("GET", "/v1/keys", Some("a=b"), b"").unwrap_err();
        assert_eq!(e.code(), "query_string");
    }
}
