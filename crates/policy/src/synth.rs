//! A synthetic bundle generator for benchmarks and tests: many groups, many
//! policies, the same shapes as a real cell's.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use crate::SCHEMA_TEXT;

/// Writes a bundle with `groups` groups and `policies` policies (spread over
/// the groups, one file per group) into the empty directory `dir`.
///
/// Group `gN` has operator `opN` and service `svcN`; host `hM` is in resource
/// set `rsK` (K = M mod 10); each group's policies permit host or instance
/// operations on one resource set each, with a few forbids, and a quota on
/// `host.drain` for each group.
pub fn write_bundle(dir: &Path, groups: usize, policies: usize) -> io::Result<()> {
    let groups = groups.max(1);
    let hosts = 100;
    let sets = 10;
    fs::write(dir.join(crate::MANIFEST_FILE), "serial = 1\n")?;
    fs::write(dir.join("schema.cedarschema"), SCHEMA_TEXT)?;
    let mut entities = String::from("[\n");
    let mut first = true;
    let mut push = |s: String| {
        if !first {
            entities.push_str(",\n");
        }
        first = false;
        entities.push_str(&s);
    };
    for g in 0..groups {
        push(format!(
            r#"{{"uid":{{"type":"Nitrile::Group","id":"g{g}"}},"attrs":{{}},"parents":[]}}"#
        ));
        push(format!(
            r#"{{"uid":{{"type":"Nitrile::Operator","id":"op{g}"}},"attrs":{{}},"parents":[{{"type":"Nitrile::Group","id":"g{g}"}}]}}"#
        ));
        push(format!(
            r#"{{"uid":{{"type":"Nitrile::Service","id":"svc{g}"}},"attrs":{{}},"parents":[{{"type":"Nitrile::Group","id":"g{g}"}},{{"type":"Nitrile::Group","id":"g{}"}}]}}"#,
            (g + 1) % groups
        ));
    }
    for s in 0..sets {
        push(format!(
            r#"{{"uid":{{"type":"Nitrile::ResourceSet","id":"rs{s}"}},"attrs":{{}},"parents":[]}}"#
        ));
    }
    for h in 0..hosts {
        push(format!(
            r#"{{"uid":{{"type":"Nitrile::Host","id":"h{h}"}},"attrs":{{}},"parents":[{{"type":"Nitrile::ResourceSet","id":"rs{}"}}]}}"#,
            h % sets
        ));
    }
    push(r#"{"uid":{"type":"Nitrile::Log","id":"local"},"attrs":{},"parents":[]}"#.to_owned());
    entities.push_str("\n]\n");
    fs::write(dir.join("groups.json"), entities)?;

    let host_ops = [
        "host.describe",
        "host.drain",
        "host.undrain",
        "instance.launch",
        "instance.list",
    ];
    let instance_ops = [
        "instance.describe",
        "instance.stop",
        "instance.start",
        "instance.terminate",
    ];
    let mut files = vec![String::new(); groups];
    for i in 0..policies {
        let g = i % groups;
        let set = (i / groups) % sets;
        let text = &mut files[g];
        let _ = match i % 7 {
            0..=2 => writeln!(
                text,
                "permit(principal in Nitrile::Group::\"g{g}\", action == Nitrile::Action::\"{}\", resource in Nitrile::ResourceSet::\"rs{set}\");",
                host_ops[i % host_ops.len()]
            ),
            3 | 4 => writeln!(
                text,
                "permit(principal in Nitrile::Group::\"g{g}\", action == Nitrile::Action::\"{}\", resource is Nitrile::Instance) when {{ context.host in Nitrile::ResourceSet::\"rs{set}\" }};",
                instance_ops[i % instance_ops.len()]
            ),
            5 => writeln!(
                text,
                "permit(principal is Nitrile::Operator in Nitrile::Group::\"g{g}\", action in Nitrile::Action::\"read\", resource in Nitrile::ResourceSet::\"rs{set}\");"
            ),
            _ => writeln!(
                text,
                "forbid(principal in Nitrile::Group::\"g{g}\", action == Nitrile::Action::\"host.drain\", resource == Nitrile::Host::\"h{}\");",
                (i * 7) % hosts
            ),
        };
    }
    for (g, text) in files.iter().enumerate() {
        if !text.is_empty() {
            fs::write(dir.join(format!("g{g}.cedar")), text)?;
        }
    }
    let mut quotas = String::new();
    for g in 0..groups {
        let _ = writeln!(
            quotas,
            "[[quota]]\ngroup = \"g{g}\"\noperation = \"host.drain\"\nmax_resources = 20\nwindow = \"1h\"\n"
        );
    }
    fs::write(dir.join("quotas.toml"), quotas)?;
    Ok(())
}
