//! A periodic signal to one thread, to interrupt a blocking system call
//! (the vCPU's `KVM_RUN`) at a steady rate.
//!
//! [`ThreadTimer::arm`] installs a handler that does nothing for
//! [`timer_signal`] (a real-time signal this crate owns; `SA_RESTART`, so
//! other interrupted calls restart) and creates a POSIX timer on
//! `CLOCK_MONOTONIC` that sends it to the calling thread alone
//! (`SIGEV_THREAD_ID`) every interval. The signal's only effect is that a
//! blocking call which does not restart (such as `KVM_RUN`) returns `EINTR`.
//! The timer is deleted on drop. System calls: `rt_sigaction`, `gettid`,
//! `timer_create`, `timer_settime`, `timer_delete`.

use std::io;
use std::time::Duration;

/// The real-time signal the timer sends: `SIGRTMIN + 1`.
pub fn timer_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_timer_signal(_: libc::c_int) {}

/// A timer signalling the thread that armed it; deleted on drop.
///
/// Drop it on the thread that armed it, before that thread ends (it is not
/// `Send`).
#[derive(Debug)]
pub struct ThreadTimer {
    id: libc::timer_t,
}

impl ThreadTimer {
    /// Signals the calling thread every `interval` (at least 1 ns).
    pub fn arm(interval: Duration) -> io::Result<Self> {
        if interval.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a zero interval would disarm the timer",
            ));
        }
        let sig = timer_signal();
        // SAFETY: an all-zero `sigaction` is a valid value to fill in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_timer_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa.sa_mask` is a valid, owned sigset_t the call writes.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs, for a real-time signal this crate owns, a handler
        // that does nothing (so is async-signal-safe); `sa` is fully
        // initialised and outlives the call; the old action is not asked for.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero `sigevent` is a valid value to fill in.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are valid for the call, which reads the
        // first and writes the second; the timer targets this thread, which
        // deletes it (drop) before it ends (the type is not `Send`).
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let timer = Self { id };
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(interval.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(interval.subsec_nanos() as i32),
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `timer.id` is the timer just created, not yet deleted;
        // `spec` is valid for the call; the old value is not asked for.
        if unsafe { libc::timer_settime(timer.id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(timer)
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` was returned by timer_create and is deleted
        // exactly once, here.
        unsafe {
            libc::timer_delete(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timer signals the thread that armed it, again and again, and its
    /// signal interrupts a blocking call (as it interrupts `KVM_RUN`).
    #[test]
    fn the_timer_interrupts_the_arming_thread() {
        let timer = ThreadTimer::arm(Duration::from_millis(2)).unwrap();
        for _ in 0..3 {
            // SAFETY: pause has no preconditions; it returns after a signal
            // handler ran (if the timer never fired, it never returns and
            // the test does not pass).
            let r = unsafe { libc::pause() };
            assert_eq!(r, -1);
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EINTR));
        }
        drop(timer);
    }

    #[test]
    fn a_zero_interval_is_refused() {
        assert!(ThreadTimer::arm(Duration::ZERO).is_err());
    }
}
