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
//! - `blk=bench`: writes then reads [`BENCH_BYTES`] and prints `BLK-BENCH-DONE`.
//!
//! It then writes its exit code to the shutdown port [`SHUTDOWN_PORT`] and halts.
//! It reads guest memory it owns only; everything else is a device register.

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

fn mmio_read(off: usize) -> u32 {
    // SAFETY: the device window is identity-mapped; the VMM emulates it.
    unsafe { read_volatile((VIRTIO_BASE + off) as *const u32) }
}

fn mmio_write(off: usize, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile((VIRTIO_BASE + off) as *mut u32, v) }
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

fn cmdline_mode() -> BlkMode {
    let mut buf = [0u8; CMDLINE_MAX];
    let mut len = 0;
    while len < CMDLINE_MAX {
        let c: u8 = mem_read(CMDLINE_ADDR + len);
        if c == 0 {
            break;
        }
        buf[len] = c;
        len += 1;
    }
    let mut mode = BlkMode::None;
    for word in buf[..len].split(|&c| c == b' ') {
        match word {
            b"blk=rw" => mode = BlkMode::ReadWrite,
            b"blk=ro" => mode = BlkMode::ReadOnly,
            b"blk=bench" => mode = BlkMode::Bench,
            _ => {}
        }
    }
    mode
}

struct Blk {
    next_avail: u16,
}

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

impl Blk {
    fn init() -> Option<Blk> {
        if mmio_read(0x000) != 0x7472_6976 || mmio_read(0x004) != 2 || mmio_read(0x008) != 2 {
            return None;
        }
        mmio_write(0x070, 0);
        mmio_write(0x070, STATUS_ACK);
        mmio_write(0x070, STATUS_ACK | STATUS_DRIVER);
        mmio_write(0x014, 1);
        if mmio_read(0x010) & 1 == 0 {
            return None; // no VIRTIO_F_VERSION_1
        }
        mmio_write(0x024, 1);
        mmio_write(0x020, 1);
        mmio_write(0x024, 0);
        mmio_write(0x020, 0);
        mmio_write(0x070, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if mmio_read(0x070) & STATUS_FEATURES_OK == 0 {
            return None;
        }
        mmio_write(0x030, 0);
        if mmio_read(0x034) < u32::from(QUEUE_SIZE) {
            return None;
        }
        mmio_write(0x038, u32::from(QUEUE_SIZE));
        mmio_write(0x080, DESC_ADDR as u32);
        mmio_write(0x084, 0);
        mmio_write(0x090, AVAIL_ADDR as u32);
        mmio_write(0x094, 0);
        mmio_write(0x0a0, USED_ADDR as u32);
        mmio_write(0x0a4, 0);
        mmio_write(0x044, 1);
        mmio_write(0x070, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        Some(Blk { next_avail: 0 })
    }

    fn capacity(&self) -> u64 {
        u64::from(mmio_read(0x100)) | (u64::from(mmio_read(0x104)) << 32)
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
        // SAFETY: a compiler and CPU fence before publishing the index.
        unsafe { asm!("mfence", options(nostack)) };
        mem_write(AVAIL_ADDR + 2, self.next_avail);
        // SAFETY: a fence between publishing the index and the notification.
        unsafe { asm!("mfence", options(nostack)) };
        mmio_write(0x050, 0);
        while mem_read::<u16>(USED_ADDR + 2) != self.next_avail {
            core::hint::spin_loop();
        }
        mmio_write(0x064, mmio_read(0x060));
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

extern "C" fn guest_main() -> ! {
    print(b"NITRILE-TESTGUEST-READY\n");
    let mode = cmdline_mode();
    if mode == BlkMode::None {
        shutdown(0);
    }
    let Some(mut blk) = Blk::init() else {
        print(b"BLK-FAIL no device\n");
        shutdown(1);
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
    print(b"capacity=");
    print_hex(blk.capacity(), 16);
    putc(b'\n');
    shutdown(if ok { 0 } else { 1 })
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
