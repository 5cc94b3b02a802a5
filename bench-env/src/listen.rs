//! Accepting connections without spinning: the testbed's servers share two CPUs with the
//! datapaths they measure, so a server that waits must wait in the kernel.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

/// The next connection on `listener` (non-blocking, possibly shared between threads) if
/// one arrives within `within`; `None` otherwise, or when another thread took it first.
///
/// A non-blocking `accept` tried in a loop is not a cheap probe: the kernel allocates a
/// socket and its inode before it finds the queue empty. Twelve such loops at 200 µs
/// took a fifth of both CPUs from every Services measurement.
pub fn accept_within(listener: &TcpListener, within: Duration) -> Option<(TcpStream, SocketAddr)> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let millis = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(n) if n > 0 => listener.accept().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn waits_for_a_connection_and_times_out_without_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let started = Instant::now();
        assert!(accept_within(&listener, Duration::from_millis(30)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(30));
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_, peer) = accept_within(&listener, Duration::from_secs(5)).expect("a connection");
        assert_eq!(peer, client.local_addr().unwrap());
    }
}
