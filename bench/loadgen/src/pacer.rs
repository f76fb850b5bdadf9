//! Precise waits for the open-loop schedule. tokio's timer wheel has a 1 ms resolution, which
//! would add up to 1 ms of false latency to every request measured from its intended send
//! time; a timerfd (nanosecond hrtimer, no timer slack) registered with the reactor wakes the
//! task within microseconds instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub struct Pacer {
    fd: AsyncFd<OwnedFd>,
}

impl Pacer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the AsyncFd owns the descriptor, which stays open and the same until it drops.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Self { fd })
    }

    /// Returns at `t` (or at once when `t` has passed). Cancel-safe: a dropped wait leaves at
    /// most a stale expiry, which the next wait re-arms over and discards.
    pub async fn wait_until(&mut self, t: Instant) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if now >= t {
                return Ok(());
            }
            let d = t - now;
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: d.as_secs() as libc::time_t,
                    tv_nsec: d.subsec_nanos().max(1) as libc::c_long,
                },
            };
            let fd = self.fd.get_ref().as_raw_fd();
            // SAFETY: valid descriptor and a fully initialised itimerspec.
            if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut guard = self.fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes into a u64 owned by this frame.
            let n = unsafe {
                libc::read(
                    fd,
                    (&mut expirations as *mut u64).cast::<libc::c_void>(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
            }
            // One read drains a timerfd, and the timer is one-shot: nothing is pending now.
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_close_to_the_deadline() {
        let mut pacer = Pacer::new().unwrap();
        for _ in 0..20 {
            let t = Instant::now() + Duration::from_micros(700);
            pacer.wait_until(t).await.unwrap();
            let late = Instant::now() - t;
            // Generous bound for a loaded CI machine; tokio's own timer would be ~0-1 ms late.
            assert!(late < Duration::from_millis(20), "late by {late:?}");
        }
    }
}
