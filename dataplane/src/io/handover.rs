//! Descriptors kept across a planned restart: the open queues of the pod ports and the host
//! port, and the uplink's receive sockets.
//!
//! A TAP queue or a socket that nobody holds drops what arrives (a TAP with no queue
//! attached discards the pod's frames; the kernel answers a datagram to a closed UDP port
//! with an ICMP error). Between a stopping dataplane and its successor, a small holder
//! process keeps them open instead, so what arrives meanwhile waits in their queues:
//!
//! 1. the stopping process stops its workers and gives every descriptor, each under a key
//!    that names what it is (`tap <netns> <ifname>`, ...), to a holder it spawns
//!    (`switchyard-dataplane --hold-descriptors PATH`) over a socket pair;
//! 2. the holder listens on `PATH` (beside the API socket) and hands everything to the
//!    first process that connects, then exits; after [`HOLD_FOR`] with no successor it
//!    exits too, and the descriptors close as if it had never held them;
//! 3. the new process takes them ([`take`]) before it re-attaches its ports, and uses a
//!    kept descriptor where it would have opened a new one ([`Kept::take`]).
//!
//! Messages are `SOCK_SEQPACKET`: one per key, the key as payload and its descriptors as
//! `SCM_RIGHTS`; an empty message ends the list.
// Unsafe code here: adopting the descriptors `SCM_RIGHTS` delivers (`OwnedFd::from_raw_fd`).
#![allow(unsafe_code)]

use nix::sys::socket::{
    accept, bind, connect, listen, recvmsg, sendmsg, socket, socketpair, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

/// How long a holder waits for a successor before it lets the descriptors go.
pub const HOLD_FOR: Duration = Duration::from_secs(60);
/// The longest key.
const MAX_KEY: usize = 4096;
/// The most descriptors under one key.
const MAX_FDS: usize = 64;

/// Descriptors a previous process handed over, by key.
#[derive(Default)]
pub struct Kept {
    by_key: HashMap<String, Vec<OwnedFd>>,
}

impl Kept {
    /// The descriptors kept under `key`, taken out (none when nothing was kept for it).
    pub fn take(&mut self, key: &str) -> Option<Vec<OwnedFd>> {
        self.by_key.remove(key)
    }

    /// How many keys are left.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when nothing is left.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The keys left.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.by_key.keys().map(String::as_str)
    }
}

/// The key of a pod's TAP device.
pub fn tap_key(netns: &str, ifname: &str) -> String {
    format!("tap {netns} {ifname}")
}

/// The key of the host port.
pub fn host_key(ifname: &str) -> String {
    format!("host {ifname}")
}

/// The key of an uplink's receive sockets.
pub fn uplink_key(name: &str, local: std::net::Ipv4Addr) -> String {
    format!("uplink {name} {local}")
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Sends `entries` over `socket`, then the end of the list.
fn send_all(socket: &impl AsFd, entries: &[(String, Vec<RawFd>)]) -> io::Result<()> {
    let fd = socket.as_fd().as_raw_fd();
    for (key, fds) in entries {
        if key.is_empty() || key.len() > MAX_KEY || fds.is_empty() || fds.len() > MAX_FDS {
            return Err(io::Error::other(format!("cannot hand over {key:?}")));
        }
        let rights = [ControlMessage::ScmRights(fds)];
        sendmsg::<()>(
            fd,
            &[IoSlice::new(key.as_bytes())],
            &rights,
            MsgFlags::empty(),
            None,
        )?;
    }
    sendmsg::<()>(fd, &[IoSlice::new(&[])], &[], MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives a list [`send_all`] sent.
fn receive_all(socket: &impl AsFd) -> io::Result<Kept> {
    let fd = socket.as_fd().as_raw_fd();
    let mut kept = Kept::default();
    loop {
        let mut key = vec![0u8; MAX_KEY];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut key)];
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS gave this process these new descriptors, owned by
                // nobody else.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        let len = msg.bytes;
        if len == 0 && fds.is_empty() {
            return Ok(kept);
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) || msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(io::Error::other("a handed-over message was cut short"));
        }
        let key = String::from_utf8(key[..len].to_vec())
            .map_err(|_| io::Error::other("a handed-over key is not text"))?;
        kept.by_key.insert(key, fds);
    }
}

/// Spawns the holder (this executable, `--hold-descriptors PATH`) and gives it `entries`.
/// Returns once the holder has them all; the caller may then exit.
pub fn hold(path: &Path, entries: &[(String, Vec<RawFd>)]) -> io::Result<()> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let _ = std::fs::remove_file(path);
    // This very executable, even when an upgrade has replaced or removed its file.
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg("--hold-descriptors")
        .arg(path)
        .stdin(std::process::Stdio::from(theirs))
        .stdout(std::process::Stdio::null())
        .spawn()?;
    send_all(&ours, entries)?;
    // The holder answers one byte once it listens on `path` (or closes on failure).
    let mut answer = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut answer)];
    let bytes = recvmsg::<()>(ours.as_raw_fd(), &mut iov, None, MsgFlags::empty())?.bytes;
    if bytes != 1 {
        let _ = child.kill();
        return Err(io::Error::other("the descriptor holder did not start"));
    }
    Ok(())
}

/// The holder's life (`--hold-descriptors PATH`): takes the descriptors from standard
/// input (a socket from [`hold`]), listens on `path`, hands them to the first process that
/// connects, and returns; after `wait` with nobody connecting, returns without.
pub fn serve_held(path: &Path, wait: Duration) -> io::Result<bool> {
    let parent = std::io::stdin();
    let kept = receive_all(&parent)?;
    let listener = seqpacket()?;
    let _ = std::fs::remove_file(path);
    bind(listener.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&listener, Backlog::new(1)?)?;
    sendmsg::<()>(
        parent.as_raw_fd(),
        &[IoSlice::new(&[1])],
        &[],
        MsgFlags::empty(),
        None,
    )?;
    let served = wait_for_successor(&listener, wait).and_then(|successor| match successor {
        Some(successor) => {
            let entries: Vec<(String, Vec<RawFd>)> = kept
                .by_key
                .iter()
                .map(|(k, fds)| (k.clone(), fds.iter().map(AsRawFd::as_raw_fd).collect()))
                .collect();
            send_all(&successor, &entries).map(|()| true)
        }
        None => Ok(false),
    });
    let _ = std::fs::remove_file(path);
    served
}

fn wait_for_successor(listener: &OwnedFd, wait: Duration) -> io::Result<Option<OwnedFd>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(wait.as_millis().min(i32::MAX as u128) as i32)
        .unwrap_or(PollTimeout::MAX);
    if poll(&mut fds, timeout)? == 0 {
        return Ok(None);
    }
    let fd = accept(listener.as_raw_fd())?;
    // SAFETY: accept returned a new descriptor owned by nobody else.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Takes what a holder at `path` keeps, if one is there (nothing otherwise).
pub fn take(path: &Path) -> Kept {
    if !path.exists() {
        return Kept::default();
    }
    let taken = seqpacket().and_then(|socket| {
        connect(socket.as_raw_fd(), &UnixAddr::new(path)?)?;
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        receive_all(&socket)
    });
    let _ = std::fs::remove_file(path);
    match taken {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!(
                "cannot take the descriptors kept at {}: {e}; opening afresh",
                path.display()
            );
            Kept::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn descriptors_cross_under_their_keys_and_stay_the_same_files() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (mut r1, mut w1) = std::os::unix::net::UnixStream::pair().unwrap();
        let (r2, _w2) = std::os::unix::net::UnixStream::pair().unwrap();
        let entries = vec![
            (
                tap_key("/run/netns/p", "eth0"),
                vec![w1.as_raw_fd(), r2.as_raw_fd()],
            ),
            (host_key("sy0"), vec![r1.as_raw_fd()]),
        ];
        send_all(&a, &entries).unwrap();
        let mut kept = receive_all(&b).unwrap();
        assert_eq!(kept.len(), 2);
        let tap = kept.take(&tap_key("/run/netns/p", "eth0")).unwrap();
        assert_eq!(tap.len(), 2);
        assert!(kept.take("tap other eth0").is_none());
        // The first descriptor is the same socket as `w1`: what is written through it
        // arrives at `r1`.
        let mut through = std::os::unix::net::UnixStream::from(tap.into_iter().next().unwrap());
        through.write_all(b"kept").unwrap();
        drop(w1.write_all(b"!"));
        let mut got = [0u8; 5];
        r1.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"kept!");
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec!["host sy0"]);
    }

    #[test]
    fn nothing_is_taken_where_no_holder_listens() {
        let path = std::env::temp_dir().join(format!("sy-handover-none-{}", std::process::id()));
        assert!(take(&path).is_empty());
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(take(&path).is_empty(), "a stale file is no holder");
        assert!(!path.exists(), "and is removed");
    }
}
