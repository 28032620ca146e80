//! Shared helpers for the tests that boot the test guest.
#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use nitrile_vmm::{VOLUME_KEY_LEN, VolumeKey};
use nitrile_vmm_kvm::{
    DiskConfig, ExitReason, KernelFormat, TEST_GUEST_ELF, VmConfig, Vmm, VsockConfig,
};
use zeroize::Zeroizing;

/// Whether /dev/kvm can be opened; prints the skip line when not.
pub fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(_) => {
            println!("SKIPPED: no usable /dev/kvm");
            false
        }
    }
}

/// Serial output collected in memory.
#[derive(Clone, Default, Debug)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub fn guest_file() -> File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(TEST_GUEST_ELF).unwrap();
    f
}

pub fn key(seed: u8) -> VolumeKey {
    let mut b = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed ^ (i as u8).wrapping_mul(31);
    }
    VolumeKey::from_bytes(&b[..]).unwrap()
}

/// Boots the test guest with `cmdline` and the given disks; returns how it
/// ended and the serial output.
pub fn boot(cmdline: &str, disks: Vec<DiskConfig>) -> (ExitReason, String) {
    boot_with(cmdline, disks, None)
}

/// As [`boot`], with an optional vsock device.
pub fn boot_with(
    cmdline: &str,
    disks: Vec<DiskConfig>,
    vsock: Option<VsockConfig>,
) -> (ExitReason, String) {
    let console = Console::default();
    let config = VmConfig {
        memory_bytes: 32 << 20,
        kernel: guest_file(),
        kernel_format: KernelFormat::Elf,
        cmdline: cmdline.into(),
        serial_out: Box::new(console.clone()),
        disks,
        vsock,
    };
    let mut vmm = Vmm::new(config).unwrap();
    let exit = vmm.run().unwrap();
    (exit, console.text())
}
