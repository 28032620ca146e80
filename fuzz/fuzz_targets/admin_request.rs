//! Admin requests as a host reads them: `AdminRequest::parse(method, path,
//! body)`, the only way a host learns what it is asked to do.
//!
//! The input is an HTTP request reduced to what the parser sees: a request
//! line `METHOD PATH`, a newline, then the body.
//!
//! Properties: nothing panics; a request that parses is one of the routes
//! (its method and operation), prints back as exactly the method and path
//! it came from, and parses again from what a client would send for it
//! (method, path, body) to an equal request; its resource is of the kind
//! its operation names; a launch, volume create or network update that parses is
//! valid and its body round-trips through JSON; a refusal is one of the
//! four statuses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nitrile_api::Name;
use nitrile_api::network::NetworkUpdate;
use nitrile_api::admin::{
    AdminRequest, LaunchRequest, MAX_ADMIN_BODY, ROUTES, VolumeCreateRequest,
};

fuzz_target!(|data: &[u8]| {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    // hyper hands the service a method and a path that are text.
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let (method, path) = line.split_once(' ').unwrap_or((line, ""));

    let request = match AdminRequest::parse(method, path, body) {
        Ok(request) => request,
        Err(e) => {
            assert!(
                [400, 404, 405, 413].contains(&e.status()),
                "unexpected status {} for {e}",
                e.status()
            );
            if body.len() > MAX_ADMIN_BODY {
                assert_eq!(e.status(), 413);
            }
            return;
        }
    };
    assert!(body.len() <= MAX_ADMIN_BODY);
    assert_eq!(request.method(), method);
    assert_eq!(request.path(), path);
    let operation = request.operation();
    assert!(
        ROUTES
            .iter()
            .any(|r| r.operation == operation && r.method == method),
        "{method} {path} parsed to {operation:?}, which has no such route"
    );
    let host = Name::new("h1").expect("valid name");
    assert_eq!(
        request.resource(&host).kind,
        operation.resource_kind(),
        "the resource is not of the operation's kind"
    );

    let again = AdminRequest::parse(request.method(), &request.path(), &request.body())
        .expect("what a client sends for a request parses");
    assert_eq!(again, request, "request changed in a round trip");

    if let AdminRequest::InstanceLaunch(launch) = &request {
        assert_eq!(launch.validate(), Ok(()));
        let json = serde_json::to_vec(launch).expect("a launch request serializes");
        let back: LaunchRequest = serde_json::from_slice(&json).expect("and parses back");
        assert_eq!(&back, launch);
    } else if let AdminRequest::VolumeCreate(create) = &request {
        assert_eq!(create.validate(), Ok(()));
        let json = serde_json::to_vec(create).expect("a create request serializes");
        let back: VolumeCreateRequest = serde_json::from_slice(&json).expect("and parses back");
        assert_eq!(&back, create);
    } else if let AdminRequest::NetworkUpdate(update) = &request {
        assert_eq!(update.validate(), Ok(()));
        let json = serde_json::to_vec(update).expect("a network update serializes");
        let back: NetworkUpdate = serde_json::from_slice(&json).expect("and parses back");
        assert_eq!(&back, update);
    } else if let AdminRequest::HostUpdate(update) = &request {
        assert_eq!(update.validate(), Ok(()));
        assert_eq!(update.version.split('.').count(), 3);
    } else if !matches!(request, AdminRequest::VolumeAttach(..)) {
        assert!(request.body().is_empty());
    }
});
