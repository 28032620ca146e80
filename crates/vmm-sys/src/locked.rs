//! Memory for secrets: a value alone on pages of its own, locked in RAM,
//! left out of core dumps, and overwritten with zeros when dropped.
//!
//! [`Locked<T>`] places its value in one heap allocation aligned to, and a
//! whole number of, [`PAGE_SIZE`] pages, so no other allocation shares its
//! pages: locking them (`mlock`) never locks someone else's memory, and
//! unlocking them never unlocks another secret's. The pages are excluded
//! from core dumps (`MADV_DONTDUMP`). On drop, the value's own destructor
//! runs first (e.g. a cipher wiping its key schedule), then every byte of
//! the pages is overwritten with zeros by volatile writes the compiler cannot
//! elide, then the pages are unlocked and freed. Failure to lock or to
//! exclude from dumps is an error: a [`Locked`] that exists is locked.
//!
//! It guarantees nothing about copies made before the value was moved in
//! (build secrets in place: [`Locked::new`] a zero value, then write through
//! [`DerefMut`]), nor about copies the caller makes of what it reads.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};

/// The page size the layout of [`Locked`] assumes (x86_64's); a host with
/// larger pages is refused ([`LockError::PageSize`]) rather than share a
/// page between two secrets.
pub const PAGE_SIZE: usize = 4096;

/// Why locked memory could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// the host's pages are larger than [`PAGE_SIZE`]
    #[error("the host's page size is {0} bytes, not {PAGE_SIZE}")]
    PageSize(usize),
    /// the pages could not be locked in RAM (check `RLIMIT_MEMLOCK`)
    #[error("could not mlock {len} bytes of secret memory (check RLIMIT_MEMLOCK)")]
    Mlock {
        /// bytes asked for
        len: usize,
        /// the cause
        #[source]
        source: io::Error,
    },
    /// the pages could not be excluded from core dumps
    #[error("could not exclude secret memory from core dumps (MADV_DONTDUMP)")]
    DontDump(#[source] io::Error),
}

/// One value on whole pages of its own: its size rounded up to, and its
/// address aligned to, [`PAGE_SIZE`].
#[repr(C, align(4096))]
struct Pages<T>(MaybeUninit<T>);

/// A value of type `T` in locked, dump-excluded pages of its own, zeroed
/// when dropped. See the [module documentation](self).
///
/// `Debug` never shows the value.
pub struct Locked<T> {
    pages: Box<Pages<T>>,
    /// Whether `mlock` succeeded (only false while [`Locked::new`] fails).
    locked: bool,
}

// `Locked<T>` holds no raw pointer: it is `Send` and `Sync` exactly when `T`
// is, as a `Box<T>` would be.

impl<T> Locked<T> {
    /// Moves `value` into fresh locked pages.
    ///
    /// On error the value is dropped and its pages zeroed as on drop.
    pub fn new(value: T) -> Result<Self, LockError> {
        const { assert!(size_of::<T>() > 0, "a zero-sized value has nothing to lock") };
        let mut this = Self {
            pages: Box::new(Pages(MaybeUninit::new(value))),
            locked: false,
        };
        let page = page_size();
        if page > PAGE_SIZE {
            return Err(LockError::PageSize(page));
        }
        let (ptr, len) = this.range();
        // SAFETY: `ptr..ptr + len` is exactly the live heap allocation owned by
        // `this.pages` (a `Pages<T>` is a whole number of pages, page
        // aligned); mlock reads and writes no memory, it only pins the pages.
        if unsafe { libc::mlock(ptr, len) } != 0 {
            return Err(LockError::Mlock {
                len,
                source: io::Error::last_os_error(),
            });
        }
        this.locked = true;
        // SAFETY: the same allocation, owned by `this.pages` and not shared
        // with any other allocation; MADV_DONTDUMP only marks the range as
        // excluded from core dumps and does not change its contents.
        if unsafe { libc::madvise(ptr, len, libc::MADV_DONTDUMP) } != 0 {
            return Err(LockError::DontDump(io::Error::last_os_error()));
        }
        Ok(this)
    }

    /// The start and length of the pages holding the value.
    fn range(&mut self) -> (*mut libc::c_void, usize) {
        let ptr: *mut Pages<T> = &mut *self.pages;
        (ptr.cast(), size_of::<Pages<T>>())
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the value was written in `new` and is dropped only in
        // `drop`, after which no `&self` exists.
        unsafe { self.pages.0.assume_init_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`: initialised from `new` until `drop`.
        unsafe { self.pages.0.assume_init_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: the value was initialised in `new` and is dropped exactly
        // once, here; afterwards it is only overwritten (below) and freed
        // with the box, whose `MaybeUninit` neither reads nor drops it.
        unsafe { self.pages.0.assume_init_drop() };
        let (ptr, len) = self.range();
        let bytes = ptr.cast::<u8>();
        for i in 0..len {
            // SAFETY: `bytes + i` lies inside the allocation owned by
            // `self.pages` (i < len = its size), which is writable and
            // u8-aligned; writing a byte needs no initialised contents.
            unsafe { bytes.add(i).write_volatile(0) };
        }
        // The zeros must be written before the pages are unlocked and freed.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        if self.locked {
            // SAFETY: the range locked in `new`, still allocated (the box is
            // freed only after this function returns); munlock touches no
            // memory.
            unsafe { libc::munlock(ptr, len) };
        }
    }
}

impl<T> fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Locked(<redacted>)")
    }
}

/// The host's page size.
fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) => usize::try_from(n).unwrap_or(usize::MAX),
        // Unknown: refuse rather than assume.
        _ => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The test binary's allocator: the system's, which, when a block
    /// aligned like [`Pages`] is freed, first records whether every byte
    /// of it is zero. That is the last moment its contents can be observed
    /// as ours: afterwards the allocator reuses it or returns it to the
    /// kernel.
    struct Witness;

    /// The last page-aligned blocks freed: address and whether all zero.
    static FREED: std::sync::Mutex<[(usize, bool); 64]> = std::sync::Mutex::new([(0, false); 64]);
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    // SAFETY: every call is forwarded unchanged to the system allocator; the
    // extra work in `dealloc` only reads the block before it is freed (it is
    // live and `layout.size()` bytes long) and locks a mutex that never
    // allocates.
    unsafe impl std::alloc::GlobalAlloc for Witness {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            if layout.align() == PAGE_SIZE {
                // SAFETY: `ptr` is a live block of `layout.size()` bytes
                // (the caller's guarantee), read before it is freed.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
                let zero = bytes.iter().all(|&b| b == 0);
                let slot = NEXT.fetch_add(1, Ordering::Relaxed) % 64;
                if let Ok(mut freed) = FREED.lock() {
                    freed[slot] = (ptr as usize, zero);
                }
            }
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Witness = Witness;

    /// Whether the page-aligned block at `addr` was all zeros when freed.
    fn freed_zero(addr: usize) -> Option<bool> {
        let freed = FREED.lock().unwrap();
        freed
            .iter()
            .rev()
            .find(|(a, _)| *a == addr)
            .map(|&(_, z)| z)
    }

    /// Drop zeroes every byte of the key's pages before they go back to the
    /// allocator.
    #[test]
    fn a_locked_key_page_is_zeroed_on_drop() {
        let secret: [u8; 64] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
        let mut key = Locked::new([0u8; 64]).unwrap();
        key.copy_from_slice(&secret);
        let addr = key.as_ptr() as usize;
        assert_eq!(freed_zero(addr), None);
        drop(key);
        assert_eq!(
            freed_zero(addr),
            Some(true),
            "the key's page was freed with bytes left"
        );
        // Control: a page-aligned block freed without zeroing is seen.
        #[repr(align(4096))]
        struct Plain([u8; 64]);
        let plain = Box::new(Plain(secret));
        let addr = plain.0.as_ptr() as usize;
        drop(plain);
        assert_eq!(freed_zero(addr), Some(false));
    }

    #[test]
    fn pages_are_aligned_locked_and_excluded_from_dumps() {
        let key = Locked::new([7u8; 64]).unwrap();
        let addr = key.as_ptr() as usize;
        assert_eq!(addr % PAGE_SIZE, 0);
        // /proc/self/smaps: the mapping holding the page reports it locked
        // and carries the `dd` (do not dump) flag.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_range = false;
        let mut locked = None;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_range = (lo..hi).contains(&addr);
                continue;
            }
            if !in_range {
                continue;
            }
            if let Some(rest) = line.strip_prefix("Locked:") {
                locked = Some(rest.trim().trim_end_matches(" kB").parse::<u64>().unwrap());
            }
            if let Some(rest) = line.strip_prefix("VmFlags:") {
                flags = Some(
                    rest.split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                );
            }
        }
        assert!(locked.unwrap() >= 4, "page not locked: {locked:?}");
        let flags = flags.unwrap();
        assert!(
            flags.iter().any(|f| f == "dd"),
            "not excluded from dumps: {flags:?}"
        );
    }

    /// Two secrets never share a page, so dropping one (munlock) leaves the
    /// other locked.
    #[test]
    fn secrets_never_share_a_page() {
        let keys: Vec<Locked<[u8; 64]>> = (0..8).map(|_| Locked::new([1u8; 64]).unwrap()).collect();
        let mut pages: Vec<usize> = keys
            .iter()
            .map(|k| k.as_ptr() as usize / PAGE_SIZE)
            .collect();
        pages.sort_unstable();
        pages.dedup();
        assert_eq!(pages.len(), keys.len());
    }

    #[test]
    fn the_value_is_dropped_before_its_pages_are_zeroed() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let locked = Locked::new(Flag(Arc::clone(&dropped))).unwrap();
        assert!(!dropped.load(Ordering::SeqCst));
        drop(locked);
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn debug_never_shows_the_value() {
        let key = Locked::new([0xabu8; 64]).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "Locked(<redacted>)");
    }
}
