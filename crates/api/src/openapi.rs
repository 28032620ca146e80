//! The OpenAPI 3.1 document of the host admin API, generated from the code.
//!
//! [`document`] builds it from [`ROUTES`] and the JSON schemas of the request
//! and response types (derived with `schemars`; [`Name`], [`Sha256Hex`] and
//! [`Operation`] have hand-written schemas that state what their parsers
//! accept). The crate checks the document in as `openapi.json` and a test
//! fails when code and file drift.
//!
//! [`metadata_only`] checks that every response schema of a document can
//! carry metadata only: no byte or binary string, no encoded content, no
//! array of integers, no object or value of any shape, no unbounded string.

use std::borrow::Cow;
use std::collections::BTreeSet;

use schemars::generate::{Contract, SchemaSettings};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Map, Value, json};

use crate::admin::{
    HostAttestRequest, HostAttestation, HostDescription, HostUpdate, HostUpdateRequest,
    InstanceDescription, InstanceList, LaunchRequest, MAX_ADMIN_BODY, ROUTES, Route, Sha256Hex,
    VolumeAttachRequest, VolumeCreateRequest, VolumeDescription, VolumeList,
};
use crate::network::{HostNetwork, NetworkUpdate};
use crate::wire::Refusal;
use crate::{MAX_NAME_LEN, Name, Operation};

/// Where schemas live in the document.
const SCHEMAS: &str = "#/components/schemas/";
/// Where the shared refusal responses live in the document.
const RESPONSES: &str = "#/components/responses/";
/// Deepest nesting of schemas [`metadata_only`] follows.
pub const MAX_SCHEMA_DEPTH: usize = 64;

/// A refusal a host answers with: HTTP status, component name, description.
struct RefusalResponse {
    status: u16,
    name: &'static str,
    description: &'static str,
}

const REFUSALS: [RefusalResponse; 9] = [
    RefusalResponse {
        status: 400,
        name: "BadRequest",
        description: "The body is not the operation's request: an unknown field, a missing \
                      field or a value out of bounds (step `request`).",
    },
    RefusalResponse {
        status: 401,
        name: "Unauthorized",
        description: "The token is missing, malformed, not signed by a pinned issuer key, \
                      expired, already used, or bound to another certificate (step `token`).",
    },
    RefusalResponse {
        status: 403,
        name: "Forbidden",
        description: "The token does not grant this operation, this resource or this host \
                      (step `token`).",
    },
    RefusalResponse {
        status: 404,
        name: "NotFound",
        description: "No admin operation has this path (step `request`), or no such instance or volume \
                      (step `state`, decided after the request is journaled).",
    },
    RefusalResponse {
        status: 405,
        name: "MethodNotAllowed",
        description: "The path does not take this method (step `request`).",
    },
    RefusalResponse {
        status: 409,
        name: "Conflict",
        description: "The host, instance or volume is not in a state that allows the request \
                      (step `state`): drained host, name in use, wrong instance state, not \
                      enough capacity, unknown image, volume attached or of another \
                      backend's format, a key the key service will not release.",
    },
    RefusalResponse {
        status: 413,
        name: "PayloadTooLarge",
        description: "The body is larger than the host reads (step `request`).",
    },
    RefusalResponse {
        status: 500,
        name: "InternalError",
        description: "The hypervisor could not carry the request out (step `hypervisor`), or \
                      an internal failure (step `internal`).",
    },
    RefusalResponse {
        status: 503,
        name: "Unavailable",
        description: "The journal cannot record the request durably, so nothing ran \
                      (step `journal`).",
    },
];

/// The refusal statuses of a route. 409 only where a state check exists.
fn refusal_statuses(operation: Operation) -> &'static [u16] {
    match operation {
        Operation::HostAttest
        | Operation::HostShutdown
        | Operation::InstanceLaunch
        | Operation::InstanceStop
        | Operation::InstanceStart
        | Operation::InstanceTerminate
        | Operation::VolumeCreate
        | Operation::VolumeAttach
        | Operation::VolumeDetach
        | Operation::VolumeDelete => &[400, 401, 403, 404, 405, 409, 413, 500, 503],
        _ => &[400, 401, 403, 404, 405, 413, 500, 503],
    }
}

/// One line saying what an operation does (the `Operation` variant's doc).
fn summary(operation: Operation) -> &'static str {
    match operation {
        Operation::HostDescribe => {
            "Health, software versions, measurements and capacity of the host."
        }
        Operation::HostDrain => "Stop placing new instances on the host.",
        Operation::HostUndrain => "Allow placement on a drained host again.",
        Operation::HostUpdate => "Install a signed release on a host (the deployer only).",
        Operation::HostAttest => {
            "A TPM quote of the host's measured PCRs with the caller's nonce, and its event log."
        }
        Operation::HostShutdown => "Power a host running the host image off.",
        Operation::InstanceLaunch => "Launch a microVM instance on the host.",
        Operation::InstanceDescribe => "Metadata of one instance.",
        Operation::InstanceList => "Metadata of the instances on the host.",
        Operation::InstanceStop => "Stop an instance.",
        Operation::InstanceStart => "Start a stopped instance.",
        Operation::InstanceTerminate => {
            "Terminate an instance and crypto-erase its instance store."
        }
        Operation::AuditRead => "Read the cell's audit log (auditors only).",
        Operation::VolumeCreate => {
            "Create an encrypted volume whose data key the key service makes."
        }
        Operation::VolumeDescribe => "Metadata of one volume.",
        Operation::VolumeList => "Metadata of the volumes the host sees.",
        Operation::VolumeAttach => "Attach a volume to an instance on the host.",
        Operation::VolumeDetach => "Detach a volume from its instance.",
        Operation::VolumeDelete => "Delete a volume, its key destroyed first (crypto-erase).",
        Operation::KmsKeyCreate => "Create a key-encryption key in the key service.",
        Operation::KmsKeyDescribe => "Metadata of one key of the key service.",
        Operation::KmsKeyList => "Metadata of the key service's keys the caller may see.",
        Operation::KmsKeyDisable => "Disable a key of the key service.",
        Operation::KmsKeyEnable => "Enable a disabled key of the key service.",
        Operation::KmsKeyScheduleDeletion => {
            "Schedule the destruction of a key of the key service."
        }
        Operation::KmsKeyCancelDeletion => "Cancel a scheduled destruction of a key.",
        Operation::NetworkUpdate => {
            "Give the host the other hosts' tunnel announcements and the instance routes."
        }
        Operation::CustomerInstanceRun => "A customer runs an instance through placement.",
        Operation::CustomerInstanceDescribe => "A customer's metadata of one of its instances.",
        Operation::CustomerInstanceList => "A customer's list of its instances.",
        Operation::CustomerInstanceStop => "A customer stops one of its instances.",
        Operation::CustomerInstanceStart => "A customer starts one of its instances.",
        Operation::CustomerInstanceTerminate => "A customer terminates one of its instances.",
        Operation::CustomerImageImport => "A customer imports a guest image.",
        Operation::CustomerImageDescribe => "A customer's metadata of one of its images.",
        Operation::CustomerImageList => "A customer's list of its images.",
        Operation::CustomerImageDelete => "A customer deletes one of its images.",
        Operation::DeploymentStart => "Roll a release out to the cell's hosts in waves.",
        Operation::DeploymentDescribe => "The rollout in progress, or the last one.",
        Operation::DeploymentAbort => "Stop the rollout in progress before its next host.",
    }
}

/// The request body and success response of a served operation, as schema
/// references; `None` for an operation no host serves.
fn types_of(
    operation: Operation,
    requests: &mut SchemaGenerator,
    responses: &mut SchemaGenerator,
) -> Option<(Option<Schema>, Schema)> {
    Some(match operation {
        Operation::HostDescribe
        | Operation::HostDrain
        | Operation::HostUndrain
        | Operation::HostShutdown => (None, responses.subschema_for::<HostDescription>()),
        Operation::InstanceLaunch => (
            Some(requests.subschema_for::<LaunchRequest>()),
            responses.subschema_for::<InstanceDescription>(),
        ),
        Operation::InstanceList => (None, responses.subschema_for::<InstanceList>()),
        Operation::InstanceDescribe
        | Operation::InstanceStop
        | Operation::InstanceStart
        | Operation::InstanceTerminate => (None, responses.subschema_for::<InstanceDescription>()),
        Operation::VolumeCreate => (
            Some(requests.subschema_for::<VolumeCreateRequest>()),
            responses.subschema_for::<VolumeDescription>(),
        ),
        Operation::VolumeAttach => (
            Some(requests.subschema_for::<VolumeAttachRequest>()),
            responses.subschema_for::<VolumeDescription>(),
        ),
        Operation::VolumeList => (None, responses.subschema_for::<VolumeList>()),
        Operation::VolumeDescribe | Operation::VolumeDetach | Operation::VolumeDelete => {
            (None, responses.subschema_for::<VolumeDescription>())
        }
        Operation::NetworkUpdate => (
            Some(requests.subschema_for::<NetworkUpdate>()),
            responses.subschema_for::<HostNetwork>(),
        ),
        Operation::HostUpdate => (
            Some(requests.subschema_for::<HostUpdateRequest>()),
            responses.subschema_for::<HostUpdate>(),
        ),
        Operation::HostAttest => (
            Some(requests.subschema_for::<HostAttestRequest>()),
            responses.subschema_for::<HostAttestation>(),
        ),
        // Served by another service (audit.read by logd, the kms-key
        // operations by the key service, the customer operations by the
        // placement service, the deployment operations by the deployment
        // service).
        Operation::AuditRead
        | Operation::KmsKeyCreate
        | Operation::KmsKeyDescribe
        | Operation::KmsKeyList
        | Operation::KmsKeyDisable
        | Operation::KmsKeyEnable
        | Operation::KmsKeyScheduleDeletion
        | Operation::KmsKeyCancelDeletion
        | Operation::CustomerInstanceRun
        | Operation::CustomerInstanceDescribe
        | Operation::CustomerInstanceList
        | Operation::CustomerInstanceStop
        | Operation::CustomerInstanceStart
        | Operation::CustomerInstanceTerminate
        | Operation::CustomerImageImport
        | Operation::CustomerImageDescribe
        | Operation::CustomerImageList
        | Operation::CustomerImageDelete
        | Operation::DeploymentStart
        | Operation::DeploymentDescribe
        | Operation::DeploymentAbort => return None,
    })
}

fn generator(contract: Contract) -> SchemaGenerator {
    SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
            s.contract = contract;
        })
        .into_generator()
}

fn operation_object(
    route: &Route,
    requests: &mut SchemaGenerator,
    responses: &mut SchemaGenerator,
) -> Option<Value> {
    let op = route.operation;
    let (request, response) = types_of(op, requests, responses)?;
    let mut object = Map::new();
    object.insert("operationId".into(), op.as_str().into());
    object.insert("summary".into(), summary(op).into());
    object.insert(
        "description".into(),
        format!(
            "The token must grant `{op}` on `{kind}/<name>` at this host{single}. What it \
             does, who may call it and why it cannot reach customer content: \
             `crates/api/OPERATIONS.md`, section `{op}`.",
            kind = op.resource_kind(),
            single = if op.is_mutation() {
                " and is single use"
            } else {
                ""
            },
        )
        .into(),
    );
    let noun = op.as_str().split('.').next().unwrap_or_default();
    object.insert("tags".into(), json!([noun]));
    if let Some(request) = request {
        object.insert(
            "requestBody".into(),
            json!({
                "required": true,
                "content": { "application/json": { "schema": request } },
            }),
        );
    }
    let mut answers = Map::new();
    answers.insert(
        "200".into(),
        json!({
            "description": "Done; the answer holds metadata only.",
            "content": { "application/json": { "schema": response } },
        }),
    );
    for status in refusal_statuses(op) {
        if let Some(r) = REFUSALS.iter().find(|r| r.status == *status) {
            answers.insert(
                status.to_string(),
                json!({ "$ref": format!("{RESPONSES}{}", r.name) }),
            );
        }
    }
    object.insert("responses".into(), Value::Object(answers));
    object.insert("x-nitrile-mutation".into(), op.is_mutation().into());
    object.insert(
        "x-nitrile-resource-kind".into(),
        op.resource_kind().as_str().into(),
    );
    Some(Value::Object(object))
}

/// The generated parts of the document.
struct Parts {
    paths: Map<String, Value>,
    schemas: Map<String, Value>,
    refusal: Schema,
    instance_name: Schema,
    /// Names whose request (read) and response (written) schemas differ;
    /// the document keeps the response's. Empty (a test says so).
    conflicts: Vec<String>,
}

fn parts() -> Parts {
    let mut requests = generator(Contract::Deserialize);
    let mut responses = generator(Contract::Serialize);
    let mut paths = Map::new();
    for route in &ROUTES {
        // An operation without types is not served: it gets no path, and the
        // tests that compare `ROUTES` with the document say so.
        let Some(operation) = operation_object(route, &mut requests, &mut responses) else {
            continue;
        };
        let item = paths
            .entry(route.path)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(item) = item {
            for param in ["instance", "volume"] {
                if route.path.contains(&format!("{{{param}}}")) && !item.contains_key("parameters")
                {
                    item.insert(
                        "parameters".into(),
                        json!([{ "$ref": format!("#/components/parameters/{param}") }]),
                    );
                }
            }
            item.insert(route.method.to_ascii_lowercase(), operation);
        }
    }
    let refusal = responses.subschema_for::<Refusal>();
    let instance_name = requests.subschema_for::<Name>();

    let mut schemas = requests.take_definitions(true);
    let mut conflicts = Vec::new();
    for (name, schema) in responses.take_definitions(true) {
        if schemas.get(&name).is_some_and(|read| *read != schema) {
            conflicts.push(name.clone());
        }
        schemas.insert(name, schema);
    }
    Parts {
        paths,
        schemas,
        refusal,
        instance_name,
        conflicts,
    }
}

/// The OpenAPI 3.1 document of the host admin API: every route of
/// [`ROUTES`], its request and response schemas, the refusals, and the two
/// security schemes every call needs (mutual TLS and a bearer token).
pub fn document() -> Value {
    let Parts {
        paths,
        schemas,
        refusal,
        instance_name,
        conflicts,
    } = parts();
    debug_assert!(
        conflicts.is_empty(),
        "read and written schemas differ: {conflicts:?}"
    );

    let mut refusal_responses = Map::new();
    for r in &REFUSALS {
        refusal_responses.insert(
            r.name.into(),
            json!({
                "description": r.description,
                "content": { "application/json": { "schema": refusal } },
            }),
        );
    }

    canonical(json!({
        "openapi": "3.1.0",
        "info": {
            "title": "nitrile host admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "The closed set of admin operations a nitrile host agent serves.",
            "description": format!(
                "Every call travels over mutual TLS with a client certificate from the cell's \
                 CA and carries a token in `Authorization: Bearer <token>`, minted by the \
                 token service for exactly that operation, that resource and this host, and \
                 bound to the client certificate. The host parses the request into the closed \
                 set (unknown path, method or field: 4xx), verifies the token itself, journals \
                 the request durably, executes, journals the outcome and answers. Bodies are \
                 JSON of at most {MAX_ADMIN_BODY} bytes; routes without a request body take an \
                 empty body or `{{}}`. Every refusal is a `Refusal`. Responses carry metadata \
                 only. The reviewed list of operations is `crates/api/OPERATIONS.md`."
            ),
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
        },
        "tags": [
            { "name": "host", "description": "The host itself." },
            { "name": "instance", "description": "The microVM instances of the host." },
            { "name": "volume", "description": "The encrypted volumes of the host's volume store." },
        ],
        "security": [{ "mutualTLS": [], "bearerToken": [] }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "parameters": {
                "instance": {
                    "name": "instance",
                    "in": "path",
                    "required": true,
                    "description": "The instance's name.",
                    "schema": instance_name,
                },
                "volume": {
                    "name": "volume",
                    "in": "path",
                    "required": true,
                    "description": "The volume's id.",
                    "schema": instance_name,
                },
            },
            "responses": refusal_responses,
            "securitySchemes": {
                "mutualTLS": {
                    "type": "mutualTLS",
                    "description": "TLS 1.3 with a client certificate issued by the cell's CA \
                                    naming the caller as `nitrile://<cell>/<kind>/<name>`.",
                },
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "PASETO v4.public",
                    "description": "A short-lived token from the token service for exactly \
                                    this operation, resource and host, bound to the client \
                                    certificate; single use for mutations.",
                },
            },
        },
    }))
}

/// The document as checked in: pretty JSON, keys sorted, a final newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

/// `v` with every object's keys in sorted order, whichever map
/// `serde_json` was built with, and rustdoc links turned into code spans.
fn canonical(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Map::new();
            for (k, v) in entries {
                let v = match (k.as_str(), v) {
                    ("description", Value::String(s)) => Value::String(plain_doc(&s)),
                    (_, v) => canonical(v),
                };
                out.insert(k, v);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// Doc comment text as prose: lines of a paragraph joined with spaces, and
/// rustdoc links without their brackets ("[`X`]" and "[`X`](path)" become
/// "`X`").
fn plain_doc(s: &str) -> String {
    let s = s
        .split("\n\n")
        .map(|paragraph| paragraph.replace('\n', " "))
        .collect::<Vec<_>>()
        .join("\n\n");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(start) = rest.find("[`") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find("`]") {
            Some(end) => {
                out.push_str(&after[..end + 1]);
                rest = &after[end + 2..];
                if rest.starts_with('(')
                    && let Some(close) = rest.find(')')
                {
                    rest = &rest[close + 1..];
                }
            }
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Why a response schema could carry more than metadata. `at` says where:
/// the route and status, then the schema path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// a string format meant for raw or encoded bytes
    #[error("{at}: format {format:?} carries bytes")]
    ByteFormat {
        /// Where.
        at: String,
        /// The format.
        format: String,
    },
    /// a keyword describing encoded content (`contentEncoding`, ...)
    #[error("{at}: {keyword} describes encoded content")]
    EncodedContent {
        /// Where.
        at: String,
        /// The keyword.
        keyword: &'static str,
    },
    /// an array whose items may be numbers, i.e. bytes
    #[error("{at}: an array of integers can carry bytes")]
    NumberArray {
        /// Where.
        at: String,
    },
    /// an object that admits properties it does not list
    #[error("{at}: an object that admits unlisted properties (additionalProperties is not false)")]
    OpenObject {
        /// Where.
        at: String,
    },
    /// a schema that admits values of any shape
    #[error("{at}: the schema admits a value of any shape")]
    AnyValue {
        /// Where.
        at: String,
    },
    /// a string with no bound on its length
    #[error("{at}: a string without maxLength, enum or const")]
    UnboundedString {
        /// Where.
        at: String,
    },
    /// a response body that is not JSON
    #[error("{at}: a response body of media type {media_type:?}, not application/json")]
    NotJson {
        /// Where.
        at: String,
        /// The media type.
        media_type: String,
    },
    /// a `$ref` that names nothing in the document
    #[error("{at}: reference {reference:?} is not in the document")]
    BadReference {
        /// Where.
        at: String,
        /// The reference.
        reference: String,
    },
    /// schemas nested deeper than [`MAX_SCHEMA_DEPTH`]
    #[error("{at}: schemas nest deeper than {MAX_SCHEMA_DEPTH}")]
    TooDeep {
        /// Where.
        at: String,
    },
}

/// Proof that every response schema of a document is metadata only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetadataOnly {
    /// How many responses (route and status) were checked.
    pub responses: usize,
    /// How many distinct named schemas they reach.
    pub schemas: usize,
}

/// Checks every response of every path of `document`, following `$ref`s:
/// no `format` `byte`, `binary` or `base64`; no `contentEncoding`,
/// `contentMediaType` or `contentSchema`; no array whose items may be
/// numbers; every object closed (`additionalProperties: false`, no
/// `patternProperties`); no schema that admits any value; every string
/// bounded by `maxLength`, `enum` or `const`; every body `application/json`.
pub fn metadata_only(document: &Value) -> Result<MetadataOnly, Vec<SchemaError>> {
    let mut walk = Walk {
        document,
        seen: BTreeSet::new(),
        errors: Vec::new(),
    };
    let mut responses = 0;
    let paths = document.get("paths").and_then(Value::as_object);
    for (path, item) in paths.into_iter().flatten() {
        let Some(item) = item.as_object() else {
            continue;
        };
        for (method, operation) in item {
            let answers = operation.get("responses").and_then(Value::as_object);
            for (status, answer) in answers.into_iter().flatten() {
                let at = format!("{} {path} {status}", method.to_ascii_uppercase());
                let answer = match answer.get("$ref").and_then(Value::as_str) {
                    Some(r) => match r
                        .strip_prefix(RESPONSES)
                        .and_then(|name| document.pointer(&format!("/components/responses/{name}")))
                    {
                        Some(a) => a,
                        None => {
                            walk.errors.push(SchemaError::BadReference {
                                at,
                                reference: r.to_owned(),
                            });
                            continue;
                        }
                    },
                    None => answer,
                };
                responses += 1;
                let content = answer.get("content").and_then(Value::as_object);
                for (media_type, media) in content.into_iter().flatten() {
                    if media_type != "application/json" {
                        walk.errors.push(SchemaError::NotJson {
                            at: at.clone(),
                            media_type: media_type.clone(),
                        });
                        continue;
                    }
                    match media.get("schema") {
                        Some(schema) => walk.schema(schema, &format!("{at}: "), 0),
                        None => walk.errors.push(SchemaError::AnyValue { at: at.clone() }),
                    }
                }
            }
        }
    }
    if walk.errors.is_empty() {
        Ok(MetadataOnly {
            responses,
            schemas: walk.seen.len(),
        })
    } else {
        Err(walk.errors)
    }
}

struct Walk<'a> {
    document: &'a Value,
    /// Named schemas already checked (also stops recursion).
    seen: BTreeSet<String>,
    errors: Vec<SchemaError>,
}

impl<'a> Walk<'a> {
    /// The schema a `$ref` names, or the error.
    fn target(&self, reference: &str, at: &str) -> Result<(&'a Value, String), SchemaError> {
        reference
            .strip_prefix(SCHEMAS)
            .and_then(|name| {
                self.document
                    .pointer(&format!("/components/schemas/{name}"))
                    .map(|s| (s, name.to_owned()))
            })
            .ok_or_else(|| SchemaError::BadReference {
                at: at.to_owned(),
                reference: reference.to_owned(),
            })
    }

    /// Whether `schema` (through `$ref`s and compositions) admits a number.
    fn admits_number(&self, schema: &Value, depth: usize) -> bool {
        if depth > MAX_SCHEMA_DEPTH {
            return true;
        }
        let Some(object) = schema.as_object() else {
            return schema.as_bool().unwrap_or(true);
        };
        if let Some(r) = object.get("$ref").and_then(Value::as_str) {
            return match self.target(r, "") {
                Ok((s, _)) => self.admits_number(s, depth + 1),
                Err(_) => true,
            };
        }
        let composed = ["anyOf", "oneOf", "allOf"].iter().any(|k| {
            object
                .get(*k)
                .and_then(Value::as_array)
                .is_some_and(|all| all.iter().any(|s| self.admits_number(s, depth + 1)))
        });
        let typed = types(object)
            .iter()
            .any(|t| *t == "integer" || *t == "number");
        let untyped = !object.contains_key("type")
            && !object.contains_key("enum")
            && !object.contains_key("const")
            && !["anyOf", "oneOf", "allOf"]
                .iter()
                .any(|k| object.contains_key(*k));
        composed || typed || untyped
    }

    fn schema(&mut self, schema: &'a Value, at: &str, depth: usize) {
        if depth > MAX_SCHEMA_DEPTH {
            self.errors.push(SchemaError::TooDeep { at: at.to_owned() });
            return;
        }
        let object = match schema {
            Value::Bool(false) => return,
            Value::Object(object) => object,
            _ => {
                self.errors
                    .push(SchemaError::AnyValue { at: at.to_owned() });
                return;
            }
        };
        if let Some(format) = object.get("format").and_then(Value::as_str)
            && matches!(format, "byte" | "binary" | "base64")
        {
            self.errors.push(SchemaError::ByteFormat {
                at: at.to_owned(),
                format: format.to_owned(),
            });
        }
        for keyword in ["contentEncoding", "contentMediaType", "contentSchema"] {
            if object.contains_key(keyword) {
                self.errors.push(SchemaError::EncodedContent {
                    at: at.to_owned(),
                    keyword,
                });
            }
        }
        let mut constrained = false;
        if let Some(r) = object.get("$ref").and_then(Value::as_str) {
            constrained = true;
            match self.target(r, at) {
                Ok((target, name)) => {
                    if self.seen.insert(name.clone()) {
                        self.schema(target, &name, depth + 1);
                    }
                }
                Err(e) => self.errors.push(e),
            }
        }
        for keyword in ["anyOf", "oneOf", "allOf"] {
            if let Some(all) = object.get(keyword).and_then(Value::as_array) {
                constrained = true;
                for (i, s) in all.iter().enumerate() {
                    self.schema(s, &format!("{at}/{keyword}/{i}"), depth + 1);
                }
            }
        }
        let bounded = object.get("maxLength").is_some_and(Value::is_u64)
            || object.contains_key("enum")
            || object.contains_key("const");
        if object.contains_key("enum") || object.contains_key("const") {
            constrained = true;
        }
        let types = types(object);
        if !types.is_empty() {
            constrained = true;
        }
        if !constrained {
            self.errors
                .push(SchemaError::AnyValue { at: at.to_owned() });
        }
        if types.contains(&"string") && !bounded {
            self.errors
                .push(SchemaError::UnboundedString { at: at.to_owned() });
        }
        if types.contains(&"array") {
            match object.get("items") {
                Some(items) => {
                    if self.admits_number(items, depth + 1) {
                        self.errors
                            .push(SchemaError::NumberArray { at: at.to_owned() });
                    }
                    self.schema(items, &format!("{at}/items"), depth + 1);
                }
                None => self.errors.push(SchemaError::AnyValue {
                    at: format!("{at}/items"),
                }),
            }
        }
        if let Some(prefix) = object.get("prefixItems").and_then(Value::as_array) {
            for (i, s) in prefix.iter().enumerate() {
                if self.admits_number(s, depth + 1) {
                    self.errors
                        .push(SchemaError::NumberArray { at: at.to_owned() });
                }
                self.schema(s, &format!("{at}/prefixItems/{i}"), depth + 1);
            }
        }
        if types.contains(&"object") || object.contains_key("properties") {
            let closed = object.get("additionalProperties") == Some(&Value::Bool(false))
                && !object.contains_key("patternProperties");
            if !closed {
                self.errors
                    .push(SchemaError::OpenObject { at: at.to_owned() });
            }
            let properties = object.get("properties").and_then(Value::as_object);
            for (name, s) in properties.into_iter().flatten() {
                self.schema(s, &format!("{at}/{name}"), depth + 1);
            }
        }
    }
}

/// The `type` keyword as a list.
fn types(object: &Map<String, Value>) -> Vec<&str> {
    match object.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(all)) => all.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

impl JsonSchema for Name {
    fn schema_name() -> Cow<'static, str> {
        "Name".into()
    }

    fn schema_id() -> Cow<'static, str> {
        "nitrile_api::Name".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Lowercase letters, digits and '-', starting with a letter or \
                            digit and not ending with '-'.",
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_NAME_LEN,
            "pattern": "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
        })
    }
}

impl JsonSchema for Sha256Hex {
    fn schema_name() -> Cow<'static, str> {
        "Sha256Hex".into()
    }

    fn schema_id() -> Cow<'static, str> {
        "nitrile_api::admin::Sha256Hex".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A SHA-256 digest as 64 lowercase hex digits.",
            "type": "string",
            "minLength": 64,
            "maxLength": 64,
            "pattern": "^[0-9a-f]{64}$",
        })
    }
}

impl JsonSchema for Operation {
    fn schema_name() -> Cow<'static, str> {
        "Operation".into()
    }

    fn schema_id() -> Cow<'static, str> {
        "nitrile_api::Operation".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let names: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
        json_schema!({
            "description": "An admin operation; there is no other.",
            "type": "string",
            "enum": names,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document with one route whose 200 answer is `schema`, and `schemas`
    /// as its components.
    fn with_response(schema: Value, schemas: Value) -> Value {
        json!({
            "paths": { "/v1/x": { "get": { "responses": { "200": {
                "description": "x",
                "content": { "application/json": { "schema": schema } },
            } } } } },
            "components": { "schemas": schemas },
        })
    }

    fn closed(properties: Value) -> Value {
        json!({ "type": "object", "additionalProperties": false, "properties": properties })
    }

    fn errors_of(doc: &Value) -> Vec<SchemaError> {
        metadata_only(doc).expect_err("the checker refuses the schema")
    }

    #[test]
    fn metadata_passes() {
        let doc = with_response(
            json!({ "$ref": "#/components/schemas/A" }),
            json!({
                "A": closed(json!({
                    "name": { "type": "string", "maxLength": 63 },
                    "state": { "oneOf": [{ "const": "on", "type": "string" }] },
                    "count": { "type": "integer", "format": "uint32" },
                    "why": { "type": ["string", "null"], "maxLength": 256 },
                    "list": { "type": "array", "items": { "$ref": "#/components/schemas/B" } },
                })),
                "B": closed(json!({ "id": { "type": "string", "maxLength": 8 } })),
            }),
        );
        let proof = metadata_only(&doc).expect("metadata only");
        assert_eq!(proof.responses, 1);
        assert_eq!(proof.schemas, 2);
    }

    #[test]
    fn a_byte_field_is_refused() {
        for format in ["byte", "binary", "base64"] {
            let doc = with_response(
                json!({ "$ref": "#/components/schemas/A" }),
                json!({ "A": closed(json!({
                    "data": { "type": "string", "format": format, "maxLength": 10 },
                })) }),
            );
            let errors = errors_of(&doc);
            assert!(
                matches!(&errors[..], [SchemaError::ByteFormat { at, .. }] if at == "A/data"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn encoded_content_is_refused() {
        let doc = with_response(
            closed(json!({
                "console": { "type": "string", "maxLength": 10, "contentEncoding": "base64" },
                "memory": { "type": "string", "maxLength": 10, "contentMediaType": "x/y" },
            })),
            json!({}),
        );
        assert_eq!(errors_of(&doc).len(), 2);
    }

    #[test]
    fn arrays_of_numbers_are_refused_even_through_references() {
        let doc = with_response(
            closed(json!({
                "direct": { "type": "array", "items": { "type": "integer" } },
                "by_ref": { "type": "array", "items": { "$ref": "#/components/schemas/Octet" } },
                "nullable": { "type": ["array", "null"], "items": { "type": ["number", "null"] } },
                "tuple": { "type": "array", "prefixItems": [{ "type": "integer" }], "items": false },
            })),
            json!({ "Octet": { "type": "integer", "maximum": 255 } }),
        );
        let errors = errors_of(&doc);
        let arrays = errors
            .iter()
            .filter(|e| matches!(e, SchemaError::NumberArray { .. }))
            .count();
        assert_eq!(arrays, 4, "{errors:?}");
    }

    #[test]
    fn open_objects_and_any_values_are_refused() {
        let doc = with_response(
            closed(json!({
                "free": { "type": "object" },
                "open": { "type": "object", "properties": {}, "additionalProperties": true },
                "map": { "type": "object", "additionalProperties": { "type": "string", "maxLength": 1 } },
                "patterned": { "type": "object", "additionalProperties": false,
                               "patternProperties": { ".*": { "type": "string", "maxLength": 1 } } },
                "anything": {},
                "also_anything": true,
                "untyped_array": { "type": "array" },
            })),
            json!({}),
        );
        let errors = errors_of(&doc);
        let open = errors
            .iter()
            .filter(|e| matches!(e, SchemaError::OpenObject { .. }))
            .count();
        let any = errors
            .iter()
            .filter(|e| matches!(e, SchemaError::AnyValue { .. }))
            .count();
        assert_eq!((open, any), (4, 3), "{errors:?}");
    }

    #[test]
    fn unbounded_strings_and_foreign_bodies_are_refused() {
        let doc = with_response(
            closed(json!({
                "text": { "type": "string" },
                "pattern_only": { "type": "string", "pattern": "^a+$" },
                "tag": { "type": "string", "enum": ["a", "b"] },
            })),
            json!({}),
        );
        let errors = errors_of(&doc);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors
                .iter()
                .all(|e| matches!(e, SchemaError::UnboundedString { .. }))
        );

        let doc = json!({ "paths": { "/v1/x": { "get": { "responses": { "200": {
            "description": "x",
            "content": { "application/octet-stream": { "schema": { "type": "string", "maxLength": 1 } } },
        } } } } } });
        assert!(matches!(
            &errors_of(&doc)[..],
            [SchemaError::NotJson { .. }]
        ));
    }

    #[test]
    fn references_must_resolve_and_recursion_ends() {
        let doc = with_response(json!({ "$ref": "#/components/schemas/Missing" }), json!({}));
        assert!(matches!(
            &errors_of(&doc)[..],
            [SchemaError::BadReference { .. }]
        ));
        let doc = with_response(
            json!({ "$ref": "#/components/schemas/Tree" }),
            json!({ "Tree": closed(json!({
                "children": { "type": "array", "items": { "$ref": "#/components/schemas/Tree" } },
            })) }),
        );
        assert!(metadata_only(&doc).is_ok());
        let mut deep = json!({ "type": "string", "format": "byte", "maxLength": 1 });
        for _ in 0..(MAX_SCHEMA_DEPTH + 1) {
            deep = json!({ "anyOf": [deep] });
        }
        let doc = with_response(deep, json!({}));
        assert!(
            errors_of(&doc)
                .iter()
                .any(|e| matches!(e, SchemaError::TooDeep { .. }))
        );
    }

    #[test]
    fn hand_written_schemas_match_the_parsers() {
        let mut g = generator(Contract::Deserialize);
        let name = Name::json_schema(&mut g);
        assert_eq!(name.get("maxLength"), Some(&json!(MAX_NAME_LEN)));
        let digest = Sha256Hex::json_schema(&mut g);
        assert_eq!(digest.get("pattern"), Some(&json!("^[0-9a-f]{64}$")));
        let ops = Operation::json_schema(&mut g);
        let names: Vec<&str> = ops
            .get("enum")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(names.len(), Operation::ALL.len());
        for n in names {
            assert!(n.parse::<Operation>().is_ok(), "{n}");
        }
    }

    #[test]
    fn types_read_and_written_have_one_schema() {
        // The document keeps one schema per name; a type read in a request
        // and written in a response with different schemas would need two.
        let conflicts = parts().conflicts;
        assert!(conflicts.is_empty(), "{conflicts:?}");
    }

    #[test]
    fn doc_text_becomes_prose() {
        assert_eq!(
            plain_doc("at\nmost [`MAX_X`] and [`Y`](crate::Y).\n\nNext [not code]"),
            "at most `MAX_X` and `Y`.\n\nNext [not code]"
        );
        assert_eq!(plain_doc("[`open"), "[`open");
    }

    #[test]
    fn document_text_is_stable() {
        assert_eq!(document_text(), document_text());
        assert!(document_text().ends_with("}\n"));
    }
}
