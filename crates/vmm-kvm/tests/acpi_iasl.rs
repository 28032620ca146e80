//! An independent check of the generated ACPI tables: ACPICA's `iasl`
//! disassembles them (it verifies checksums and lengths and decodes the AML),
//! and the disassembly must name what the tables are meant to say.

use std::path::Path;
use std::process::Command;

use nitrile_vmm_kvm::acpi::{self, MmioDevice};

fn iasl() -> Option<&'static str> {
    match Command::new("iasl").arg("-v").output() {
        Ok(o) if o.status.success() => Some("iasl"),
        _ => {
            println!("SKIPPED: iasl (Debian package acpica-tools) is not installed");
            None
        }
    }
}

/// Disassembles `table` (written to `name.dat`) and returns the `.dsl` text.
fn disassemble(dir: &Path, name: &str, table: &[u8]) -> String {
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, table).unwrap();
    let out = Command::new("iasl")
        .current_dir(dir)
        .arg("-d")
        .arg(&dat)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "iasl -d {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

/// Collapses whitespace so multi-line disassembly can be matched.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn iasl_decodes_the_tables() {
    if iasl().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let devices = [
        MmioDevice {
            base: 0xd000_0000,
            gsi: 5,
        },
        MmioDevice {
            base: 0xd000_1000,
            gsi: 6,
        },
        MmioDevice {
            base: 0xd000_2000,
            gsi: 7,
        },
    ];
    let dsdt = squash(&disassemble(
        dir.path(),
        "dsdt",
        &acpi::dsdt(&devices).unwrap(),
    ));
    assert!(!dsdt.contains("Incorrect checksum"), "{dsdt}");
    for (i, d) in devices.iter().enumerate() {
        let device = format!("Device (VR{i:02X})");
        let at = dsdt
            .find(&device)
            .unwrap_or_else(|| panic!("{device}: {dsdt}"));
        let body = &dsdt[at..];
        assert!(body.contains("Name (_HID, \"LNRO0005\")"), "{dsdt}");
        let uid = match i {
            0 => "Zero".to_owned(),
            1 => "One".to_owned(),
            n => format!("0x{n:02X}"),
        };
        assert!(body.contains(&format!("Name (_UID, {uid})")), "{dsdt}");
        assert!(
            body.contains(&format!(
                "Memory32Fixed (ReadWrite, 0x{:08X}, // Address Base 0x00001000, // Address Length",
                d.base
            )),
            "{dsdt}"
        );
        assert!(
            body.contains(&format!(
                "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }}",
                d.gsi
            )),
            "{dsdt}"
        );
    }
    let madt = squash(&disassemble(dir.path(), "madt", &acpi::madt(2).unwrap()));
    assert!(!madt.contains("Incorrect checksum"), "{madt}");
    assert!(madt.contains("Address : FEC00000"), "{madt}");
    assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
    let fadt = squash(&disassemble(dir.path(), "fadt", &acpi::fadt(0xe_0400)));
    assert!(!fadt.contains("Incorrect checksum"), "{fadt}");
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(fadt.contains("DSDT Address : 000E0400"), "{fadt}");
    assert!(fadt.contains("CMOS RTC Not Present (V5) : 1"), "{fadt}");
    assert!(
        fadt.contains("8042 Present on ports 60/64 (V2) : 0"),
        "{fadt}"
    );
    let xsdt = squash(&disassemble(
        dir.path(),
        "xsdt",
        &acpi::xsdt(&[0xe_0080, 0xe_0200]),
    ));
    assert!(!xsdt.contains("Incorrect checksum"), "{xsdt}");
    assert!(
        xsdt.contains("ACPI Table Address 0 : 00000000000E0080"),
        "{xsdt}"
    );
    assert!(
        xsdt.contains("ACPI Table Address 1 : 00000000000E0200"),
        "{xsdt}"
    );
}
