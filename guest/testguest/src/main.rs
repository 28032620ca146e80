//! The nitrile test guest: a tiny bare-metal x86_64 program that exercises the
//! `kvm` backend's devices in milliseconds.
//!
//! Boot protocol (set up by the VMM): entered at `_start` in 64-bit long mode,
//! identity-mapped paging covering the low 4 GiB, interrupts off. A
//! NUL-terminated command line sits at [`CMDLINE_ADDR`]. The guest prints
//! `NITRILE-TESTGUEST-READY` to the 16550 UART at 0x3f8, then runs what the
//! command line asks for:
//!
//! - `blk=rw`: writes a pattern (`NITRILE-PATTERN-` + sector number) to the first
//!   [`BLK_SECTORS`] sectors of the virtio-mmio block device at [`VIRTIO_BASE`],
//!   reads them back and prints `BLK-OK` or `BLK-FAIL`;
//! - `blk=ro`: only reads and compares (checks data written by an earlier boot);
//! - `blk=bench`: writes then reads [`BENCH_BYTES`] and prints `BLK-BENCH-DONE`;
//! - `vsock=<port>`: connects over virtio-vsock to host port `<port>`, sends a
//!   message, expects it echoed back and prints `VSOCK-OK` or `VSOCK-FAIL`;
//! - `vsock-listen=<port>`: accepts one host-initiated connection on `<port>`,
//!   echoes it until the host shuts it down, prints `VSOCK-SERVE-OK`;
//! - `net=ping`: sends one Ethernet broadcast frame (ethertype
//!   [`NET_ETHERTYPE`], payload `NITRILE-NET-PING`) through virtio-net, waits
//!   for a frame of that type carrying `NITRILE-NET-PONG` and prints `NET-OK`
//!   or `NET-FAIL`.
//!
//! It then writes its exit code to the shutdown port [`SHUTDOWN_PORT`] and halts.
//! It reads guest memory it owns only; everything else is a device register.
//!
//! Other VMMs (QEMU `-M microvm -kernel`) enter it through its PVH ELF note
//! instead: at `pvh_start32` in 32-bit protected mode with paging off and
//! `%ebx` pointing at `hvm_start_info`. That stub identity-maps the low 4 GiB
//! with 2 MiB pages, enables PAE, long mode and paging, loads a 64-bit GDT and
//! jumps to `_start`; the command line then comes from `hvm_start_info`, and
//! the guest prints `ENTRY-PVH` after its ready marker. Under QEMU the shutdown
//! port is QEMU's `isa-debug-exit` device at the same port, when configured.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::panic::PanicInfo;
use core::ptr::{read_volatile, write_volatile};

const CMDLINE_ADDR: usize = 0x2_0000;
const CMDLINE_MAX: usize = 256;
const SERIAL: u16 = 0x3f8;
const SHUTDOWN_PORT: u16 = 0x501;
const VIRTIO_BASE: usize = 0xd000_0000;
const BLK_SECTORS: u64 = 64;
const SECTORS_PER_REQ: u64 = 8;
const BENCH_BYTES: u64 = 16 << 20;
const BENCH_SECTORS_PER_REQ: u64 = 128;

// Fixed guest-physical layout of the driver's shared structures.
const QUEUE_SIZE: u16 = 8;
const DESC_ADDR: usize = 0x20_0000;
const AVAIL_ADDR: usize = 0x20_1000;
const USED_ADDR: usize = 0x20_2000;
const HDR_ADDR: usize = 0x20_3000;
const STATUS_ADDR: usize = 0x20_3100;
const DATA_ADDR: usize = 0x21_0000;
const DATA_MAX: usize = 0x1_0000;

global_asm!(
    ".section .text._start,\"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "lea rsp, [rip + {stack} + {size}]",
    "and rsp, -16",
    "call {main}",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    stack = sym STACK,
    size = const STACK_SIZE,
    main = sym guest_main,
);

// The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18, owner "Xen") naming the
// 32-bit entry, and that entry: build identity page tables, turn on PAE, long
// mode and paging, load a flat 64-bit GDT and far-jump into 64-bit code.
global_asm!(
    ".pushsection .note.Xen,\"a\",@note",
    ".balign 4",
    ".long 4",
    ".long 4",
    ".long 18",
    ".asciz \"Xen\"",
    ".balign 4",
    ".long pvh_start32",
    ".balign 4",
    ".popsection",
    ".pushsection .text.pvh32,\"ax\"",
    ".code32",
    ".global pvh_start32",
    "pvh_start32:",
    "cli",
    "cld",
    "movl %ebx, {info}",
    // PML4[0] -> PDPT.
    "movl ${tables} + 0x1003, %eax",
    "movl %eax, {tables}",
    "movl $0, {tables} + 4",
    // PDPT[0..4] -> the four page directories.
    "xorl %ecx, %ecx",
    ".Lpvh_pdpt:",
    "movl %ecx, %eax",
    "shll $12, %eax",
    "addl ${tables} + 0x2003, %eax",
    "movl %eax, {tables} + 0x1000(,%ecx,8)",
    "movl $0, {tables} + 0x1004(,%ecx,8)",
    "incl %ecx",
    "cmpl $4, %ecx",
    "jb .Lpvh_pdpt",
    // 2048 present, writable 2 MiB pages: the low 4 GiB, identity-mapped.
    "xorl %ecx, %ecx",
    ".Lpvh_pd:",
    "movl %ecx, %eax",
    "shll $21, %eax",
    "orl $0x83, %eax",
    "movl %eax, {tables} + 0x2000(,%ecx,8)",
    "movl $0, {tables} + 0x2004(,%ecx,8)",
    "incl %ecx",
    "cmpl $2048, %ecx",
    "jb .Lpvh_pd",
    "movl %cr4, %eax",
    "orl $0x20, %eax",
    "movl %eax, %cr4",
    "movl ${tables}, %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $0x100, %eax",
    "wrmsr",
    "movl %cr0, %eax",
    "orl $0x80000001, %eax",
    "movl %eax, %cr0",
    "lgdt .Lpvh_gdt_ptr",
    "ljmp $0x08, $.Lpvh_start64",
    ".code64",
    ".Lpvh_start64:",
    "movl $0x10, %eax",
    "movl %eax, %ds",
    "movl %eax, %es",
    "movl %eax, %ss",
    "movl %eax, %fs",
    "movl %eax, %gs",
    "jmp _start",
    ".balign 8",
    ".Lpvh_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    ".Lpvh_gdt_ptr:",
    ".word 23",
    ".long .Lpvh_gdt",
    ".popsection",
    info = sym PVH_START_INFO,
    tables = sym PVH_TABLES,
    options(att_syntax),
);

/// The PML4, the PDPT and four page directories built by the PVH entry.
#[repr(C, align(4096))]
struct PvhTables([u64; 6 * 512]);

#[unsafe(no_mangle)]
static mut PVH_TABLES: PvhTables = PvhTables([0; 6 * 512]);

/// `hvm_start_info`'s address when entered through PVH, else 0.
#[unsafe(no_mangle)]
static mut PVH_START_INFO: u32 = 0;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The `hvm_start_info` address if the guest was entered through PVH.
fn pvh_start_info() -> Option<usize> {
    // SAFETY: written once by the entry stub before any Rust code runs.
    let info = unsafe { read_volatile(&raw const PVH_START_INFO) } as usize;
    (info != 0 && mem_read::<u32>(info) == XEN_HVM_START_MAGIC).then_some(info)
}

const STACK_SIZE: usize = 64 * 1024;
#[unsafe(no_mangle)]
static mut STACK: [u8; STACK_SIZE] = [0; STACK_SIZE];

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O on a bare-metal guest; the VMM handles the exit.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack)) }
    value
}

fn putc(c: u8) {
    while inb(SERIAL + 5) & 0x20 == 0 {}
    outb(SERIAL, c);
}

fn print(s: &[u8]) {
    for &c in s {
        putc(c);
    }
}

fn print_hex(mut v: u64, digits: u32) {
    let mut buf = [0u8; 16];
    for i in (0..digits as usize).rev() {
        buf[i] = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
    print(&buf[..digits as usize]);
}

fn shutdown(code: u8) -> ! {
    outb(SHUTDOWN_PORT, code);
    loop {
        // SAFETY: halting with interrupts off is the guest's end.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

fn rd(base: usize, off: usize) -> u32 {
    // SAFETY: the device window is identity-mapped; the VMM emulates it.
    unsafe { read_volatile((base + off) as *const u32) }
}

fn wr(base: usize, off: usize, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile((base + off) as *mut u32, v) }
}

/// The MMIO base of the first virtio device with `id`, scanning the slots.
fn find_device(id: u32) -> Option<usize> {
    (0..8)
        .map(|slot| VIRTIO_BASE + slot * 0x1000)
        .find(|&base| rd(base, 0x000) == 0x7472_6976 && rd(base, 0x004) == 2 && rd(base, 0x008) == id)
}

/// Negotiates VERSION_1 only and sets up `queues` (desc, avail, used).
fn device_init(base: usize, queues: &[(usize, usize, usize)]) -> bool {
    wr(base, 0x070, 0);
    wr(base, 0x070, STATUS_ACK);
    wr(base, 0x070, STATUS_ACK | STATUS_DRIVER);
    wr(base, 0x014, 1);
    if rd(base, 0x010) & 1 == 0 {
        return false; // no VIRTIO_F_VERSION_1
    }
    wr(base, 0x024, 1);
    wr(base, 0x020, 1);
    wr(base, 0x024, 0);
    wr(base, 0x020, 0);
    wr(base, 0x070, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    if rd(base, 0x070) & STATUS_FEATURES_OK == 0 {
        return false;
    }
    for (i, &(desc, avail, used)) in queues.iter().enumerate() {
        wr(base, 0x030, i as u32);
        if rd(base, 0x034) < u32::from(QUEUE_SIZE) {
            return false;
        }
        wr(base, 0x038, u32::from(QUEUE_SIZE));
        wr(base, 0x080, desc as u32);
        wr(base, 0x084, 0);
        wr(base, 0x090, avail as u32);
        wr(base, 0x094, 0);
        wr(base, 0x0a0, used as u32);
        wr(base, 0x0a4, 0);
        wr(base, 0x044, 1);
    }
    wr(base, 0x070, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    true
}

fn mem_write<T>(addr: usize, v: T) {
    // SAFETY: addr lies in the driver's fixed region of guest RAM.
    unsafe { write_volatile(addr as *mut T, v) }
}

fn mem_read<T>(addr: usize) -> T {
    // SAFETY: as above.
    unsafe { read_volatile(addr as *const T) }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BlkMode {
    None,
    ReadWrite,
    ReadOnly,
    Bench,
}

struct Opts {
    net_ping: bool,
    blk: BlkMode,
    vsock_port: Option<u32>,
    vsock_listen: Option<u32>,
}

fn parse_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || digits.len() > 9 {
        return None;
    }
    let mut v = 0u32;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(d - b'0');
    }
    Some(v)
}

fn cmdline() -> Opts {
    let mut buf = [0u8; CMDLINE_MAX];
    let mut len = 0;
    let addr = match pvh_start_info() {
        // hvm_start_info.cmdline_paddr (0: none).
        Some(info) => mem_read::<u64>(info + 24) as usize,
        None => CMDLINE_ADDR,
    };
    while addr != 0 && len < CMDLINE_MAX {
        let c: u8 = mem_read(addr + len);
        if c == 0 {
            break;
        }
        buf[len] = c;
        len += 1;
    }
    let mut opts = Opts { net_ping: false, blk: BlkMode::None, vsock_port: None, vsock_listen: None };
    for word in buf[..len].split(|&c| c == b' ') {
        match word {
            b"blk=rw" => opts.blk = BlkMode::ReadWrite,
            b"blk=ro" => opts.blk = BlkMode::ReadOnly,
            b"blk=bench" => opts.blk = BlkMode::Bench,
            b"net=ping" => opts.net_ping = true,
            _ => {
                if let Some(port) = word.strip_prefix(b"vsock=") {
                    opts.vsock_port = parse_u32(port);
                } else if let Some(port) = word.strip_prefix(b"vsock-listen=") {
                    opts.vsock_listen = parse_u32(port);
                }
            }
        }
    }
    opts
}

struct Blk {
    base: usize,
    next_avail: u16,
}

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

impl Blk {
    fn init() -> Option<Blk> {
        let base = find_device(2)?;
        device_init(base, &[(DESC_ADDR, AVAIL_ADDR, USED_ADDR)]).then_some(Blk { base, next_avail: 0 })
    }

    fn capacity(&self) -> u64 {
        u64::from(rd(self.base, 0x100)) | (u64::from(rd(self.base, 0x104)) << 32)
    }

    fn desc(i: usize, addr: usize, len: u32, flags: u16, next: u16) {
        let d = DESC_ADDR + 16 * i;
        mem_write(d, addr as u64);
        mem_write(d + 8, len);
        mem_write(d + 12, flags);
        mem_write(d + 14, next);
    }

    /// One request: `kind` 0 = IN, 1 = OUT, 8 = GET_ID. Returns the status byte.
    fn request(&mut self, kind: u32, sector: u64, len: u32) -> u8 {
        mem_write(HDR_ADDR, kind);
        mem_write(HDR_ADDR + 4, 0u32);
        mem_write(HDR_ADDR + 8, sector);
        mem_write(STATUS_ADDR, 0xffu8);
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        Self::desc(0, HDR_ADDR, 16, NEXT, 1);
        let data_flags = if kind == 1 { NEXT } else { NEXT | WRITE };
        Self::desc(1, DATA_ADDR, len, data_flags, 2);
        Self::desc(2, STATUS_ADDR, 1, WRITE, 0);
        let slot = usize::from(self.next_avail % QUEUE_SIZE);
        mem_write(AVAIL_ADDR + 4 + 2 * slot, 0u16);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence();
        mem_write(AVAIL_ADDR + 2, self.next_avail);
        fence();
        wr(self.base, 0x050, 0);
        while mem_read::<u16>(USED_ADDR + 2) != self.next_avail {
            core::hint::spin_loop();
        }
        wr(self.base, 0x064, rd(self.base, 0x060));
        mem_read(STATUS_ADDR)
    }
}

fn pattern_byte(sector: u64, i: usize) -> u8 {
    const P: &[u8; 16] = b"NITRILE-PATTERN-";
    let j = i % 32;
    if j < 16 {
        P[j]
    } else if j < 24 {
        let nibble = (sector >> (4 * (23 - j))) & 0xf;
        b"0123456789abcdef"[nibble as usize]
    } else if j < 31 {
        b'.'
    } else {
        b'\n'
    }
}

fn fill_pattern(first: u64, sectors: u64) {
    for s in 0..sectors {
        for i in 0..512usize {
            mem_write(DATA_ADDR + (s as usize) * 512 + i, pattern_byte(first + s, i));
        }
    }
}

fn check_pattern(first: u64, sectors: u64) -> bool {
    for s in 0..sectors {
        for i in 0..512usize {
            let got: u8 = mem_read(DATA_ADDR + (s as usize) * 512 + i);
            if got != pattern_byte(first + s, i) {
                return false;
            }
        }
    }
    true
}

fn blk_test(blk: &mut Blk, write: bool) -> bool {
    if blk.capacity() < BLK_SECTORS {
        return false;
    }
    let len = (SECTORS_PER_REQ * 512) as u32;
    if write {
        let mut s = 0;
        while s < BLK_SECTORS {
            fill_pattern(s, SECTORS_PER_REQ);
            if blk.request(1, s, len) != 0 {
                return false;
            }
            s += SECTORS_PER_REQ;
        }
    }
    let mut s = 0;
    while s < BLK_SECTORS {
        for i in 0..len as usize {
            mem_write(DATA_ADDR + i, 0u8);
        }
        if blk.request(0, s, len) != 0 || !check_pattern(s, SECTORS_PER_REQ) {
            return false;
        }
        s += SECTORS_PER_REQ;
    }
    true
}

fn blk_bench(blk: &mut Blk) -> bool {
    let len = (BENCH_SECTORS_PER_REQ * 512) as u32;
    if len as usize > DATA_MAX || blk.capacity() * 512 < BENCH_BYTES {
        return false;
    }
    for kind in [1u32, 0u32] {
        let mut s = 0;
        while s * 512 < BENCH_BYTES {
            if blk.request(kind, s, len) != 0 {
                return false;
            }
            s += BENCH_SECTORS_PER_REQ;
        }
    }
    true
}

// virtio-vsock driver: guest-initiated stream connection to the host.
const VS_RX: (usize, usize, usize) = (0x30_0000, 0x30_1000, 0x30_2000);
const VS_TX: (usize, usize, usize) = (0x30_3000, 0x30_4000, 0x30_5000);
const VS_EV: (usize, usize, usize) = (0x30_6000, 0x30_7000, 0x30_8000);
const VS_RX_BUF: usize = 0x31_0000;
const VS_TX_BUF: usize = 0x32_0000;
const VS_BUF_LEN: u32 = 4096;
const VS_HDR: usize = 44;
const VS_SPIN_LIMIT: u32 = 2_000_000;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const GUEST_PORT: u32 = 1234;

struct Vsock {
    base: usize,
    cid: u64,
    tx_next: u16,
    rx_next_avail: u16,
    rx_last_used: u16,
    fwd_cnt: u32,
}

fn put_desc(table: usize, i: usize, addr: usize, len: u32, flags: u16) {
    let d = table + 16 * i;
    mem_write(d, addr as u64);
    mem_write(d + 8, len);
    mem_write(d + 12, flags);
    mem_write(d + 14, 0u16);
}

fn fence() {
    // SAFETY: a full memory fence; no other effect.
    unsafe { asm!("mfence", options(nostack)) };
}

impl Vsock {
    fn init() -> Option<Vsock> {
        let base = find_device(19)?;
        if !device_init(base, &[VS_RX, VS_TX, VS_EV]) {
            return None;
        }
        let cid = u64::from(rd(base, 0x100)) | (u64::from(rd(base, 0x104)) << 32);
        for i in 0..usize::from(QUEUE_SIZE) {
            put_desc(VS_RX.0, i, VS_RX_BUF + i * 0x1000, VS_BUF_LEN, 2);
            mem_write(VS_RX.1 + 4 + 2 * i, i as u16);
        }
        fence();
        mem_write(VS_RX.1 + 2, QUEUE_SIZE);
        wr(base, 0x050, 0);
        Some(Vsock { base, cid, tx_next: 0, rx_next_avail: QUEUE_SIZE, rx_last_used: 0, fwd_cnt: 0 })
    }

    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) -> bool {
        let b = VS_TX_BUF;
        mem_write(b, self.cid);
        mem_write(b + 8, 2u64);
        mem_write(b + 16, src_port);
        mem_write(b + 20, dst_port);
        mem_write(b + 24, payload.len() as u32);
        mem_write(b + 28, 1u16);
        mem_write(b + 30, op);
        mem_write(b + 32, if op == OP_SHUTDOWN { 3u32 } else { 0 });
        mem_write(b + 36, 65536u32);
        mem_write(b + 40, self.fwd_cnt);
        for (i, &c) in payload.iter().enumerate() {
            mem_write(b + VS_HDR + i, c);
        }
        put_desc(VS_TX.0, 0, b, (VS_HDR + payload.len()) as u32, 0);
        mem_write(VS_TX.1 + 4 + 2 * usize::from(self.tx_next % QUEUE_SIZE), 0u16);
        self.tx_next = self.tx_next.wrapping_add(1);
        fence();
        mem_write(VS_TX.1 + 2, self.tx_next);
        fence();
        wr(self.base, 0x050, 1);
        for _ in 0..VS_SPIN_LIMIT {
            if mem_read::<u16>(VS_TX.2 + 2) == self.tx_next {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// Waits for a packet; returns its descriptor id, op and payload length.
    fn recv(&mut self) -> Option<(usize, u16, usize)> {
        for _ in 0..VS_SPIN_LIMIT {
            if mem_read::<u16>(VS_RX.2 + 2) != self.rx_last_used {
                let slot = usize::from(self.rx_last_used % QUEUE_SIZE);
                let id = mem_read::<u32>(VS_RX.2 + 4 + 8 * slot) as usize;
                self.rx_last_used = self.rx_last_used.wrapping_add(1);
                if id >= usize::from(QUEUE_SIZE) {
                    return None;
                }
                let buf = VS_RX_BUF + id * 0x1000;
                let op: u16 = mem_read(buf + 30);
                let len = mem_read::<u32>(buf + 24) as usize;
                return Some((id, op, len.min(VS_BUF_LEN as usize - VS_HDR)));
            }
            // No interrupts: kick the receive queue so the device can fill it.
            wr(self.base, 0x050, 0);
        }
        None
    }

    fn repost(&mut self, id: usize) {
        mem_write(VS_RX.1 + 4 + 2 * usize::from(self.rx_next_avail % QUEUE_SIZE), id as u16);
        self.rx_next_avail = self.rx_next_avail.wrapping_add(1);
        fence();
        mem_write(VS_RX.1 + 2, self.rx_next_avail);
    }
}

fn vsock_echo(port: u32) -> bool {
    const MSG: &[u8] = b"NITRILE-VSOCK-ECHO-0123456789abcdef";
    let Some(mut vs) = Vsock::init() else { return false };
    if !vs.send(OP_REQUEST, GUEST_PORT, port, &[]) {
        return false;
    }
    match vs.recv() {
        Some((id, OP_RESPONSE, _)) => vs.repost(id),
        _ => return false,
    }
    if !vs.send(OP_RW, GUEST_PORT, port, MSG) {
        return false;
    }
    let mut got = 0;
    while got < MSG.len() {
        let Some((id, op, len)) = vs.recv() else { return false };
        if op != OP_RW || got + len > MSG.len() {
            return false;
        }
        for i in 0..len {
            if mem_read::<u8>(VS_RX_BUF + id * 0x1000 + VS_HDR + i) != MSG[got + i] {
                return false;
            }
        }
        got += len;
        vs.fwd_cnt = vs.fwd_cnt.wrapping_add(len as u32);
        vs.repost(id);
    }
    vs.send(OP_SHUTDOWN, GUEST_PORT, port, &[])
}

/// Accepts one host-initiated connection on `port` and echoes what arrives
/// until the host shuts it down. True when at least one byte was echoed.
fn vsock_serve(port: u32) -> bool {
    let Some(mut vs) = Vsock::init() else { return false };
    let Some((id, op, _)) = vs.recv() else { return false };
    let buf = VS_RX_BUF + id * 0x1000;
    let peer: u32 = mem_read(buf + 16);
    let dst: u32 = mem_read(buf + 20);
    vs.repost(id);
    if op != OP_REQUEST || dst != port || !vs.send(OP_RESPONSE, port, peer, &[]) {
        return false;
    }
    let mut echoed = 0usize;
    let mut payload = [0u8; VS_BUF_LEN as usize - VS_HDR];
    loop {
        let Some((id, op, len)) = vs.recv() else { return false };
        let buf = VS_RX_BUF + id * 0x1000;
        for (i, b) in payload[..len].iter_mut().enumerate() {
            *b = mem_read(buf + VS_HDR + i);
        }
        vs.repost(id);
        match op {
            OP_RW => {
                vs.fwd_cnt = vs.fwd_cnt.wrapping_add(len as u32);
                if !vs.send(OP_RW, port, peer, &payload[..len]) {
                    return false;
                }
                echoed += len;
            }
            OP_SHUTDOWN | OP_RST => {
                if op == OP_SHUTDOWN {
                    vs.send(OP_RST, port, peer, &[]);
                }
                return echoed > 0;
            }
            _ => {}
        }
    }
}

extern "C" fn guest_main() -> ! {
    print(b"NITRILE-TESTGUEST-READY\n");
    if pvh_start_info().is_some() {
        print(b"ENTRY-PVH\n");
    }
    let opts = cmdline();
    let mut code = 0;
    if opts.blk != BlkMode::None && !blk_main(opts.blk) {
        code = 1;
    }
    if let Some(port) = opts.vsock_listen {
        if vsock_serve(port) {
            print(b"VSOCK-SERVE-OK\n");
        } else {
            print(b"VSOCK-SERVE-FAIL\n");
            code = 1;
        }
    }
    if let Some(port) = opts.vsock_port {
        if vsock_echo(port) {
            print(b"VSOCK-OK\n");
        } else {
            print(b"VSOCK-FAIL\n");
            code = 1;
        }
    }
    if opts.net_ping {
        if net_ping() {
            print(b"NET-OK\n");
        } else {
            print(b"NET-FAIL\n");
            code = 1;
        }
    }
    shutdown(code)
}

// virtio-net driver: one receive and one transmit queue, no offloads.
const NET_RX: (usize, usize, usize) = (0x40_0000, 0x40_1000, 0x40_2000);
const NET_TX: (usize, usize, usize) = (0x40_3000, 0x40_4000, 0x40_5000);
const NET_RX_BUF: usize = 0x41_0000;
const NET_TX_BUF: usize = 0x42_0000;
const NET_BUF_LEN: u32 = 4096;
const NET_HDR: usize = 12;
const NET_ETHERTYPE: u16 = 0x88b5;
const NET_SPIN_LIMIT: u32 = 100_000;
const NET_PING: &[u8] = b"NITRILE-NET-PING";
const NET_PONG: &[u8] = b"NITRILE-NET-PONG";

fn net_ping() -> bool {
    let Some(base) = find_device(1) else { return false };
    if !device_init(base, &[NET_RX, NET_TX]) {
        return false;
    }
    let mac_lo = rd(base, 0x100).to_le_bytes();
    let mac_hi = rd(base, 0x104).to_le_bytes();
    let mac = [mac_lo[0], mac_lo[1], mac_lo[2], mac_lo[3], mac_hi[0], mac_hi[1]];
    for i in 0..usize::from(QUEUE_SIZE) {
        put_desc(NET_RX.0, i, NET_RX_BUF + i * 0x1000, NET_BUF_LEN, 2);
        mem_write(NET_RX.1 + 4 + 2 * i, i as u16);
    }
    fence();
    mem_write(NET_RX.1 + 2, QUEUE_SIZE);
    // The frame: virtio header (zero), broadcast, our MAC, type, payload.
    let b = NET_TX_BUF;
    for i in 0..NET_HDR + 6 {
        mem_write(b + i, if i < NET_HDR { 0u8 } else { 0xffu8 });
    }
    for (i, &m) in mac.iter().enumerate() {
        mem_write(b + NET_HDR + 6 + i, m);
    }
    mem_write(b + NET_HDR + 12, NET_ETHERTYPE.to_be_bytes());
    for (i, &c) in NET_PING.iter().enumerate() {
        mem_write(b + NET_HDR + 14 + i, c);
    }
    put_desc(NET_TX.0, 0, b, (NET_HDR + 14 + NET_PING.len()) as u32, 0);
    mem_write(NET_TX.1 + 4, 0u16);
    fence();
    mem_write(NET_TX.1 + 2, 1u16);
    fence();
    wr(base, 0x050, 1);
    let mut last_used = 0u16;
    let mut next_avail = QUEUE_SIZE;
    for _ in 0..NET_SPIN_LIMIT {
        while mem_read::<u16>(NET_RX.2 + 2) != last_used {
            let slot = usize::from(last_used % QUEUE_SIZE);
            let id = mem_read::<u32>(NET_RX.2 + 4 + 8 * slot) as usize;
            let len = mem_read::<u32>(NET_RX.2 + 8 + 8 * slot) as usize;
            last_used = last_used.wrapping_add(1);
            if id >= usize::from(QUEUE_SIZE) {
                return false;
            }
            let f = NET_RX_BUF + id * 0x1000 + NET_HDR;
            let matches = len >= NET_HDR + 14 + NET_PONG.len()
                && mem_read::<[u8; 2]>(f + 12) == NET_ETHERTYPE.to_be_bytes()
                && (0..6).all(|i| mem_read::<u8>(f + i) == mac[i])
                && NET_PONG.iter().enumerate().all(|(i, &c)| mem_read::<u8>(f + 14 + i) == c);
            if matches {
                return true;
            }
            // Not ours (the host's own traffic): give the buffer back.
            mem_write(NET_RX.1 + 4 + 2 * usize::from(next_avail % QUEUE_SIZE), id as u16);
            next_avail = next_avail.wrapping_add(1);
            fence();
            mem_write(NET_RX.1 + 2, next_avail);
        }
        // No interrupts: kick the receive queue so the device can fill it.
        wr(base, 0x050, 0);
    }
    false
}

fn blk_main(mode: BlkMode) -> bool {
    let Some(mut blk) = Blk::init() else {
        print(b"BLK-FAIL no device\n");
        return false;
    };
    if blk.request(8, 0, 20) == 0 {
        print(b"BLK-ID:");
        for i in 0..20 {
            let c: u8 = mem_read(DATA_ADDR + i);
            if c == 0 {
                break;
            }
            putc(c);
        }
        putc(b'\n');
    }
    let ok = match mode {
        BlkMode::ReadWrite => blk_test(&mut blk, true),
        BlkMode::ReadOnly => blk_test(&mut blk, false),
        BlkMode::Bench => blk_bench(&mut blk),
        BlkMode::None => true,
    };
    if mode == BlkMode::Bench {
        print(if ok { b"BLK-BENCH-DONE\n" } else { b"BLK-FAIL\n" });
    } else {
        print(if ok { b"BLK-OK\n" } else { b"BLK-FAIL\n" });
    }
    ok
}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    print(b"GUEST-PANIC\n");
    shutdown(2)
}

// The freestanding memory functions the compiler may call.

/// # Safety
/// Standard `memcpy` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds the memcpy contract.
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack)) };
    dst
}

/// # Safety
/// Standard `memmove` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is safe when dst does not start inside src.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backward copy with the direction flag set, then cleared.
        unsafe {
            asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                options(nostack));
        }
        dst
    }
}

/// # Safety
/// Standard `memset` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds the memset contract.
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack)) };
    dst
}

/// # Safety
/// Standard `memcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, within both buffers.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
