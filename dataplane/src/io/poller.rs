//! A worker's wait for its ports: level-triggered epoll over the ports' descriptors, and an
//! eventfd that wakes it.
//!
//! Level-triggered, a descriptor that still has something to read is reported again by the
//! next wait, so a worker may read a port without draining it: a TAP gives one frame per
//! read, and the read that finds its queue empty costs a system call as dear as one that
//! finds a frame (the worker's read plan decides when to skip it).
// Unsafe code here: epoll(7) and eventfd(2) on raw descriptors.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The token a wake-up is reported under internally (never returned by [`Poller::wait`]).
const WAKE: u64 = u64::MAX;

/// Level-triggered readiness of a set of descriptors, each registered under a token, and
/// a wake-up any thread can send. Every method takes `&self`: the control side registers
/// descriptors while the worker waits.
#[derive(Debug)]
pub struct Poller {
    epoll: OwnedFd,
    wake: OwnedFd,
}

/// What one [`Poller::wait`] found: the tokens of the ready descriptors.
pub struct Events {
    events: Vec<libc::epoll_event>,
    len: usize,
}

impl Events {
    /// Room for `capacity` ready descriptors per wait.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            len: 0,
        }
    }

    /// The tokens of the descriptors found ready (a token registered for two descriptors
    /// may come twice).
    pub fn tokens(&self) -> impl Iterator<Item = u64> + '_ {
        self.events[..self.len]
            .iter()
            .map(|e| e.u64)
            .filter(|&token| token != WAKE)
    }

    /// True when the wait found no descriptor ready (a wake-up alone counts as none).
    pub fn is_empty(&self) -> bool {
        self.tokens().next().is_none()
    }
}

impl Poller {
    /// A poller with no descriptor registered.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system calls; each result is checked before it is owned.
        let epoll = unsafe { owned(libc::epoll_create1(libc::EPOLL_CLOEXEC))? };
        // SAFETY: as above.
        let wake = unsafe { owned(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))? };
        let poller = Self { epoll, wake };
        poller.add(poller.wake.as_raw_fd(), WAKE)?;
        Ok(poller)
    }

    /// Reports `fd` as ready under `token` while it has something to read (or an error).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    /// Stops reporting `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` outlives the call; epoll_ctl checks both descriptors.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ends the current or next [`Poller::wait`] early.
    pub fn wake(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is a readable buffer of 8 bytes, as eventfd(2) wants.
        let rc = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` (whole milliseconds; zero: not at all; `None`: with no
    /// timer) until a descriptor is ready or a wake-up comes; fills `events` with what is
    /// ready. A wake-up is consumed here.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        // SAFETY: `events.events` is writable for its whole length, which is passed.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.events.as_mut_ptr(),
                events.events.len() as libc::c_int,
                ms,
            )
        };
        events.len = 0;
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        events.len = n as usize;
        if events.events[..events.len].iter().any(|e| e.u64 == WAKE) {
            let mut count = [0u8; 8];
            // SAFETY: `count` is a writable buffer of 8 bytes; the eventfd is non-blocking.
            unsafe { libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        }
        Ok(())
    }
}

/// Owns the descriptor a system call returned, or turns its failure into an error.
///
/// # Safety
/// `fd` must be a new descriptor nothing else owns, or negative.
unsafe fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the caller vouches that nothing else owns `fd`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_left_readable_is_reported_again_and_a_drained_one_is_not() {
        let poller = Poller::new().unwrap();
        let (mut tx, mut rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        poller.add(rx.as_raw_fd(), 7).unwrap();
        let mut events = Events::with_capacity(4);
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert!(events.is_empty());
        tx.write_all(b"ab").unwrap();
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.tokens().collect::<Vec<_>>(), [7]);
        let mut one = [0u8; 1];
        rx.read_exact(&mut one).unwrap();
        // One byte left: reported again without anything new arriving.
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.tokens().collect::<Vec<_>>(), [7]);
        rx.read_exact(&mut one).unwrap();
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert!(events.is_empty());
        poller.remove(rx.as_raw_fd()).unwrap();
        tx.write_all(b"c").unwrap();
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert!(events.is_empty());
    }

    #[test]
    fn a_wake_up_ends_a_wait_once() {
        let poller = Poller::new().unwrap();
        let mut events = Events::with_capacity(4);
        poller.wake().unwrap();
        let start = std::time::Instant::now();
        poller
            .wait(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(events.is_empty());
        // Consumed: the next wait times out.
        poller
            .wait(&mut events, Some(Duration::from_millis(20)))
            .unwrap();
        assert_eq!(events.len, 0);
    }

    #[test]
    fn a_wait_without_a_timer_ends_at_a_wake_up_from_another_thread() {
        let poller = std::sync::Arc::new(Poller::new().unwrap());
        let waker = std::thread::spawn({
            let poller = poller.clone();
            move || {
                std::thread::sleep(Duration::from_millis(20));
                poller.wake().unwrap();
            }
        });
        let mut events = Events::with_capacity(4);
        let start = std::time::Instant::now();
        poller.wait(&mut events, None).unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(10),
            "it waited for the wake-up"
        );
        assert!(events.is_empty());
        waker.join().unwrap();
    }
}
