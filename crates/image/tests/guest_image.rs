//! The built guest image: an ELF vmlinux with a PVH entry note, and an
//! initramfs holding /init, busybox, the modules with their index, the
//! static vsock and metadata tools, udhcpc's script, and dropbear with
//! every shared library it links and the accounts it needs.
//!
//! Builds the image with the project's script (cached under
//! `$NITRILE_CACHE_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/nitrile`;
//! the first run downloads the kernel package) and prints `SKIPPED: <reason>`
//! when the build's tools are missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use nitrile_image::{
    Cmdline, GUEST_INIT, ImageStore, KernelFormat, build_guest_image, default_cache_dir,
};

/// ELF note type of the PVH 32-bit entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
/// Where the guest's dynamic loader finds libraries without a cache.
const LIBRARY_DIRS: [&str; 5] = [
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
];
/// The programs the server boot runs from the image.
const SERVER_PROGRAMS: [&str; 3] = [
    "usr/sbin/dropbear",
    "usr/bin/dropbearkey",
    "usr/bin/dbclient",
];
/// Bound on the entries of the initramfs archive this test parses.
const MAX_CPIO_ENTRIES: usize = 10_000;

const MODULES: [&str; 6] = [
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "dm_crypt",
];

fn missing_tool() -> Option<&'static str> {
    for tool in [
        "bash",
        "apt-get",
        "apt-cache",
        "dpkg-deb",
        "depmod",
        "cpio",
        "xz",
        "zstd",
    ] {
        let found = Command::new("bash")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(tool);
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("busybox (busybox-static)");
    }
    if !Path::new("/usr/sbin/dropbear").exists() {
        return Some("dropbear (dropbear-bin)");
    }
    None
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap()
}
fn align4(v: usize) -> usize {
    (v + 3) & !3
}

/// The PVH entry address from the ELF's PT_NOTE segments, and the PT_LOAD
/// physical ranges.
fn pvh_entry(elf: &[u8]) -> (Option<u64>, Vec<(u64, u64)>) {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    assert_eq!(elf[5], 1, "not little-endian");
    let phoff = to_usize(u64_at(elf, 0x20));
    let phentsize = usize::from(u16_at(elf, 0x36));
    let phnum = usize::from(u16_at(elf, 0x38));
    let mut entry = None;
    let mut loads = Vec::new();
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize];
        let kind = u32_at(ph, 0);
        let offset = to_usize(u64_at(ph, 0x08));
        let paddr = u64_at(ph, 0x18);
        let filesz = to_usize(u64_at(ph, 0x20));
        let memsz = u64_at(ph, 0x28);
        if kind == PT_LOAD {
            loads.push((paddr, paddr + memsz));
        }
        if kind != PT_NOTE {
            continue;
        }
        let notes = &elf[offset..offset + filesz];
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = to_usize(u64::from(u32_at(notes, at)));
            let descsz = to_usize(u64::from(u32_at(notes, at + 4)));
            let ntype = u32_at(notes, at + 8);
            let name = &notes[at + 12..at + 12 + namesz];
            let desc_at = at + 12 + align4(namesz);
            let desc = &notes[desc_at..desc_at + descsz];
            if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
                entry = Some(match descsz {
                    4 => u64::from(u32_at(desc, 0)),
                    8 => u64_at(desc, 0),
                    n => panic!("PVH note with a {n}-byte descriptor"),
                });
            }
            at = desc_at + align4(descsz);
        }
    }
    (entry, loads)
}

/// A C string at `at` in `b`.
fn c_str(b: &[u8], at: usize) -> String {
    let end = b[at..]
        .iter()
        .position(|&c| c == 0)
        .expect("unterminated string");
    String::from_utf8(b[at..at + end].to_vec()).unwrap()
}

/// The program interpreter (PT_INTERP) and the DT_NEEDED libraries of a
/// 64-bit ELF file; (None, []) for a static one.
fn elf_links(elf: &[u8]) -> (Option<String>, Vec<String>) {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    let phoff = to_usize(u64_at(elf, 0x20));
    let phentsize = usize::from(u16_at(elf, 0x36));
    let phnum = usize::from(u16_at(elf, 0x38));
    let mut interp = None;
    let mut dynamic = None;
    let mut loads = Vec::new();
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize];
        let offset = to_usize(u64_at(ph, 0x08));
        let vaddr = u64_at(ph, 0x10);
        let filesz = to_usize(u64_at(ph, 0x20));
        match u32_at(ph, 0) {
            PT_INTERP => interp = Some(c_str(elf, offset)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            _ => {}
        }
    }
    let Some((dyn_at, dyn_len)) = dynamic else {
        return (interp, Vec::new());
    };
    let mut needed = Vec::new();
    let mut strtab = None;
    for entry in elf[dyn_at..dyn_at + dyn_len].chunks_exact(16) {
        let (tag, val) = (u64_at(entry, 0), u64_at(entry, 8));
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(val),
            _ => {}
        }
    }
    if needed.is_empty() {
        return (interp, Vec::new());
    }
    // DT_STRTAB is an address: its file offset through the PT_LOAD holding it.
    let strtab = strtab.expect("DT_NEEDED without DT_STRTAB");
    let (vaddr, offset, _) = *loads
        .iter()
        .find(|(v, _, len)| (*v..*v + *len as u64).contains(&strtab))
        .expect("DT_STRTAB outside every PT_LOAD");
    let strtab = offset + to_usize(strtab - vaddr);
    let names = needed
        .into_iter()
        .map(|n| c_str(elf, strtab + to_usize(n)))
        .collect();
    (interp, names)
}

/// The initramfs decompressed, by its magic.
fn decompress(path: &Path) -> Vec<u8> {
    let head = std::fs::read(path).unwrap();
    let tool = match head.get(..4) {
        Some([0x28, 0xb5, 0x2f, 0xfd]) => "zstd",
        Some([0x1f, 0x8b, _, _]) => "gzip",
        Some([0x02, 0x21, 0x4c, 0x18]) => "lz4",
        _ => return head,
    };
    // The image pads the archive with zeros to whole pages (the kernel
    // skips them); the decompressors do not. The stream may itself end in
    // zero bytes, so up to 16 of them are given back until it decompresses.
    let end = head.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let run = |bytes: Vec<u8>| {
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&bytes);
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        out
    };
    let mut last = None;
    for extra in 0..=16 {
        let len = (end + extra).min(head.len());
        let out = run(head[..len].to_vec());
        if out.status.success() {
            return out.stdout;
        }
        last = Some(out.status);
        if len == head.len() {
            break;
        }
    }
    panic!("{tool} -dc failed: {last:?}")
}

/// Entries of a cpio newc archive: name -> (mode, contents).
fn cpio_entries(archive: &[u8]) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut at = 0;
    let field = |hdr: &[u8], i: usize| {
        let s = std::str::from_utf8(&hdr[6 + 8 * i..6 + 8 * (i + 1)]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    };
    loop {
        assert!(out.len() < MAX_CPIO_ENTRIES, "too many cpio entries");
        let hdr = &archive[at..at + 110];
        assert_eq!(&hdr[..6], b"070701", "not a cpio newc header at {at}");
        let mode = field(hdr, 1);
        let filesize = field(hdr, 6) as usize;
        let namesize = field(hdr, 11) as usize;
        let name = std::str::from_utf8(&archive[at + 110..at + 110 + namesize - 1])
            .unwrap()
            .to_owned();
        let data_at = align4(at + 110 + namesize);
        if name == "TRAILER!!!" {
            return out;
        }
        let data = archive[data_at..data_at + filesize].to_vec();
        out.insert(name.trim_start_matches("./").to_owned(), (mode, data));
        at = align4(data_at + filesize);
    }
}

/// What the server boot needs is in the archive: the static metadata
/// client, udhcpc's script, dropbear's programs with their loader and every
/// library they need (transitively), and root's account with no password.
fn server_files_are_whole(entries: &BTreeMap<String, (u32, Vec<u8>)>) {
    let (mode, imds) = entries.get("bin/imds").expect("/bin/imds");
    assert_eq!(mode & 0o111, 0o111, "/bin/imds is not executable");
    assert_eq!(
        elf_links(imds),
        (None, Vec::new()),
        "/bin/imds is not static"
    );
    let (mode, script) = entries
        .get("etc/udhcpc/default.script")
        .expect("udhcpc's default script");
    assert_eq!(mode & 0o111, 0o111, "udhcpc's script is not executable");
    assert_eq!(
        script.as_slice(),
        include_bytes!("../../../guest/initramfs/udhcpc.script")
    );

    let find_lib = |name: &str| {
        LIBRARY_DIRS
            .iter()
            .map(|dir| format!("{dir}/{name}"))
            .find(|path| entries.contains_key(path))
    };
    let mut todo: Vec<String> = SERVER_PROGRAMS.iter().map(|p| (*p).to_owned()).collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(path) = todo.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let (mode, bytes) = entries
            .get(&path)
            .unwrap_or_else(|| panic!("/{path} is not in the initramfs"));
        if SERVER_PROGRAMS.contains(&path.as_str()) {
            assert_eq!(mode & 0o111, 0o111, "/{path} is not executable");
        }
        let (interp, needed) = elf_links(bytes);
        if let Some(interp) = interp {
            let interp = interp.trim_start_matches('/').to_owned();
            assert!(
                entries.contains_key(&interp),
                "/{path} asks for the loader /{interp}, which is missing"
            );
            todo.push(interp);
        }
        for lib in needed {
            let found = find_lib(&lib)
                .unwrap_or_else(|| panic!("/{path} needs {lib}, which is in no library directory"));
            todo.push(found);
        }
    }
    assert!(
        seen.iter().any(|p| p.contains("libc.so")),
        "dropbear links no libc: {seen:?}"
    );

    let text = |name: &str| {
        let (mode, bytes) = entries
            .get(name)
            .unwrap_or_else(|| panic!("/{name} is missing"));
        (*mode, String::from_utf8(bytes.clone()).unwrap())
    };
    let (_, passwd) = text("etc/passwd");
    assert!(
        passwd.lines().any(|l| l == "root:x:0:0:root:/root:/bin/sh"),
        "root's account: {passwd}"
    );
    let (mode, shadow) = text("etc/shadow");
    assert_eq!(mode & 0o077, 0, "/etc/shadow is readable by others");
    let root = shadow
        .lines()
        .find(|l| l.starts_with("root:"))
        .expect("root in /etc/shadow");
    // '*' matches no password: there is none to guess.
    assert_eq!(root.split(':').nth(1), Some("*"), "root has a password");
    let (_, shells) = text("etc/shells");
    assert!(shells.lines().any(|l| l == "/bin/sh"));
    let (mode, _) = entries.get("root").expect("/root");
    assert_eq!(mode & 0o077, 0, "/root is open to others");
}

#[test]
fn guest_image_has_pvh_vmlinux_and_initramfs_with_init_and_modules() {
    if let Some(tool) = missing_tool() {
        println!("SKIPPED: {tool} is missing (run scripts/setup.sh --tests)");
        return;
    }
    let cache = match default_cache_dir() {
        Ok(c) => c,
        Err(e) => {
            println!("SKIPPED: {e}");
            return;
        }
    };
    let built = build_guest_image(&cache).expect("the guest image build");

    // The kernel: an ELF with a PVH entry inside a loaded segment.
    let vmlinux = std::fs::read(&built.kernel).unwrap();
    assert_eq!(
        KernelFormat::detect(&vmlinux[..64]),
        Some(KernelFormat::Elf64)
    );
    let (entry, loads) = pvh_entry(&vmlinux);
    let entry = entry.expect("no Xen PHYS32_ENTRY note: the kernel cannot boot through PVH");
    assert!(
        loads.iter().any(|(lo, hi)| (*lo..*hi).contains(&entry)),
        "PVH entry {entry:#x} outside every PT_LOAD segment {loads:x?}"
    );
    drop(vmlinux);

    // The initramfs: /init (ours, executable), busybox, the modules and
    // what modprobe reads.
    let release = built.kernel_release.clone().expect("kernel-release");
    let entries = cpio_entries(&decompress(&built.initramfs));
    let (init_mode, init) = entries.get("init").expect("/init");
    assert_eq!(init, GUEST_INIT.as_bytes());
    assert_eq!(init_mode & 0o111, 0o111, "/init is not executable");
    assert!(entries.contains_key("bin/busybox"));
    let (tool_mode, tool) = entries.get("bin/vsock-echo").expect("/bin/vsock-echo");
    assert_eq!(
        tool_mode & 0o111,
        0o111,
        "/bin/vsock-echo is not executable"
    );
    assert!(
        tool.starts_with(b"\x7fELF"),
        "/bin/vsock-echo is not an ELF file"
    );
    server_files_are_whole(&entries);
    let moddir = format!("lib/modules/{release}");
    let dep = entries
        .get(&format!("{moddir}/modules.dep"))
        .expect("modules.dep");
    let dep = String::from_utf8_lossy(&dep.1);
    for file in ["modules.dep.bin", "modules.alias.bin", "modules.builtin"] {
        assert!(entries.contains_key(&format!("{moddir}/{file}")), "{file}");
    }
    for module in MODULES {
        let file = entries.keys().find(|name| {
            name.starts_with(&moddir)
                && Path::new(name.as_str())
                    .file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.replace('-', "_") == format!("{module}.ko"))
        });
        let file = file.unwrap_or_else(|| panic!("module {module} is not in the initramfs"));
        let rel = file.strip_prefix(&format!("{moddir}/")).unwrap();
        assert!(
            dep.lines().any(|l| l.starts_with(&format!("{rel}:"))),
            "{rel} is not in modules.dep"
        );
        // Every dependency it names is in the archive too.
        let line = dep
            .lines()
            .find(|l| l.starts_with(&format!("{rel}:")))
            .unwrap();
        for needed in line.split_whitespace().skip(1) {
            assert!(
                entries.contains_key(&format!("{moddir}/{needed}")),
                "{module} needs {needed}, which is missing"
            );
        }
        assert_eq!(
            &entries[file].1[..4],
            b"\x7fELF",
            "{file} is not an ELF object"
        );
    }

    // And the store takes it and gives it back verified.
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let image = store
        .import(&built.kernel, &built.initramfs, &built.cmdline)
        .unwrap();
    assert_eq!(
        image.manifest().kernel_release.as_deref(),
        Some(release.as_str())
    );
    assert_eq!(store.get(&image.digest()).unwrap(), image);
    assert!(Cmdline::new(built.cmdline.as_str()).is_ok());
}
