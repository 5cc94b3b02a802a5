//! A checked bulk TCP transfer between two pods: the client sends a deterministic
//! pseudo-random stream, both ends hash what they saw, and the hashes must match.

use crate::listen::accept_within;
use crate::testbed::Pod;
use crate::{fail, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use switchyard_dataplane::io::netns::run_in;

/// Streaming FNV-1a over bytes.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// Result of a transfer.
#[derive(Debug)]
pub struct Transfer {
    /// Bytes the server received.
    pub received: u64,
    /// Hash of what the client sent.
    pub sent_hash: u64,
    /// Hash of what the server received.
    pub received_hash: u64,
    /// Time from connect to the server's end of stream.
    pub elapsed: Duration,
    /// The client's address as the server saw it.
    pub peer: SocketAddr,
}

/// Runs `receive` in `server`'s namespace and, once it says it is ready, `send` in
/// `client`'s; returns both results.
fn run_pair<S: Send + 'static, R: Send + 'static>(
    client: &Pod,
    server: &Pod,
    receive: impl FnOnce(mpsc::Sender<()>) -> std::io::Result<R> + Send + 'static,
    send: impl FnOnce() -> std::io::Result<S> + Send,
) -> Result<(S, R)> {
    let server_ns = server.ns.path();
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = std::thread::spawn(move || run_in(&server_ns, move || receive(ready_tx)));
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| fail!("the receiving side did not start"))?;
    let sent = run_in(&client.ns.path(), send).map_err(|e| fail!("sending: {e}"))?;
    let received = receiver
        .join()
        .map_err(|_| fail!("receiver panicked"))?
        .map_err(|e| fail!("receiving: {e}"))?;
    Ok((sent, received))
}

/// Sends `bytes` from `client` to `server` over IPv4 TCP port 7000.
pub fn tcp_transfer(client: &Pod, server: &Pod, bytes: u64) -> Result<Transfer> {
    let addr = SocketAddr::from((server.ipv4, 7000));
    let start = Instant::now();
    let receive = move |ready: mpsc::Sender<()>| {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let _ = ready.send(());
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut stream, peer) = loop {
            if let Some(s) = accept_within(&listener, Duration::from_millis(100)) {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection within 30 s",
                ));
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hash = Fnv::default();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n as u64;
        }
        Ok((total, hash.finish(), peer))
    };
    let send = move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut hash = Fnv::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n])?;
            hash.update(&chunk[..n]);
            left -= n as u64;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(hash.finish())
    };
    let (sent_hash, (received, received_hash, peer)) = run_pair(client, server, receive, send)?;
    Ok(Transfer {
        received,
        sent_hash,
        received_hash,
        elapsed: start.elapsed(),
        peer,
    })
}

/// Result of a UDP burst.
#[derive(Debug)]
pub struct UdpBurst {
    /// Datagrams sent.
    pub sent: usize,
    /// Datagrams received intact.
    pub intact: usize,
    /// Datagrams received with wrong length or content, or twice.
    pub damaged: usize,
    /// The source addresses the receiver saw.
    pub sources: Vec<SocketAddr>,
}

/// The datagram with sequence number `seq`: its number then a pattern derived from it;
/// every tenth is shorter, so runs of equal sizes end with a short one.
pub fn udp_datagram(seq: u32, size: usize) -> Vec<u8> {
    let len = if seq % 10 == 9 { size / 2 } else { size };
    let mut d: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(7).wrapping_add(seq) as u8)
        .collect();
    d[..4].copy_from_slice(&seq.to_be_bytes());
    d
}

/// Sets the socket's receive buffer to `bytes`, past `rmem_max` (SO_RCVBUFFORCE, as root).
fn force_receive_buffer(socket: &std::net::UdpSocket, bytes: usize) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    Ok(setsockopt(socket, sockopt::RcvBufForce, &bytes)?)
}

/// Sends `count` numbered datagrams of `size` bytes from `client` to `server` (IPv4 or
/// IPv6) as fast as possible and checks each one that arrives.
pub fn udp_burst(
    client: &Pod,
    server: &Pod,
    ipv6: bool,
    count: u32,
    size: usize,
) -> Result<UdpBurst> {
    use std::net::UdpSocket;
    let addr: SocketAddr = if ipv6 {
        (server.ipv6, 7001).into()
    } else {
        (server.ipv4, 7001).into()
    };
    let receive = move |ready: mpsc::Sender<()>| {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        // Room for the whole burst: what is measured is the path, not whether the receiving
        // thread got a CPU in time (on two busy vCPUs it may not).
        force_receive_buffer(&socket, 16 << 20)?;
        let _ = ready.send(());
        let mut seen = vec![false; count as usize];
        let (mut intact, mut damaged) = (0, 0);
        let mut sources: Vec<SocketAddr> = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if !sources.contains(&from) {
                sources.push(from);
            }
            let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let ok = n >= 4
                && seq < count
                && !seen[seq as usize]
                && buf[..n] == udp_datagram(seq, size)[..];
            if ok {
                seen[seq as usize] = true;
                intact += 1;
            } else {
                damaged += 1;
            }
        }
        Ok((intact, damaged, sources))
    };
    let send = move || {
        let socket = UdpSocket::bind(if ipv6 { "[::]:0" } else { "0.0.0.0:0" })?;
        // Bursts of 128 (long enough runs to coalesce), with a pause between them so that
        // a busy receiver is not simply overrun.
        let mut sent = 0;
        for seq in 0..count {
            if socket.send_to(&udp_datagram(seq, size), addr).is_ok() {
                sent += 1;
            }
            if seq % 128 == 127 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        Ok(sent)
    };
    let (sent, (intact, damaged, sources)) = run_pair(client, server, receive, send)?;
    Ok(UdpBurst {
        sent,
        intact,
        damaged,
        sources,
    })
}

/// A TCP connection from a client pod to an echo server on another pod, held open so that
/// a test can check that an established flow keeps working across a change.
pub struct EchoFlow {
    stream: TcpStream,
    server: Option<std::thread::JoinHandle<()>>,
}

impl EchoFlow {
    /// Opens the connection from `client` to `server` (IPv4, TCP port 7002).
    pub fn open(client: &Pod, server: &Pod) -> Result<Self> {
        let addr = SocketAddr::from((server.ipv4, 7002));
        let listener = run_in(&server.ns.path(), || TcpListener::bind(addr))
            .map_err(|e| fail!("echo server: {e}"))?;
        let handle = std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let stream = run_in(&client.ns.path(), || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })
        .map_err(|e| fail!("connecting to the echo server: {e}"))?;
        Ok(Self {
            stream,
            server: Some(handle),
        })
    }

    /// Sends `message` and reads it back; true when it came back whole within 5 s.
    pub fn echo(&mut self, message: &[u8]) -> bool {
        if self.stream.write_all(message).is_err() {
            return false;
        }
        let mut back = vec![0u8; message.len()];
        self.stream.read_exact(&mut back).is_ok() && back == message
    }
}

impl Drop for EchoFlow {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// A TCP stream written continuously from one namespace and read, timed, in another: to
/// see whether a connection carries on across a disruption (a dataplane killed and
/// started again) and how long its bytes stopped.
pub struct TimedStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: std::thread::JoinHandle<std::io::Result<u64>>,
    reader: std::thread::JoinHandle<std::io::Result<(u64, Duration)>>,
}

/// What a [`TimedStream`] saw.
#[derive(Debug, Clone)]
pub struct StreamReport {
    /// Bytes the client wrote.
    pub written: u64,
    /// Bytes the server read.
    pub read: u64,
    /// The longest time between two reads.
    pub longest_gap: Duration,
}

impl TimedStream {
    /// A server listening on `listen` in the namespace at `server`, and a client in the
    /// namespace at `client` connected to `connect` (the same address, or one translated
    /// to it on the way, such as a node's published port), writing until stopped.
    pub fn open(
        client: &std::path::Path,
        server: &std::path::Path,
        listen: SocketAddr,
        connect: SocketAddr,
    ) -> Result<Self> {
        let listener = run_in(server, || TcpListener::bind(listen))
            .map_err(|e| fail!("stream server on {listen}: {e}"))?;
        let stream = run_in(client, || {
            let s = TcpStream::connect_timeout(&connect, Duration::from_secs(10))?;
            s.set_write_timeout(Some(Duration::from_secs(20)))?;
            Ok(s)
        })
        .map_err(|e| fail!("connecting to {connect}: {e}"))?;
        let (mut accepted, _) = listener
            .accept()
            .map_err(|e| fail!("accepting on {listen}: {e}"))?;
        accepted
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| fail!("{e}"))?;
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let (mut total, mut longest) = (0u64, Duration::ZERO);
            let mut last = Instant::now();
            loop {
                let n = accepted.read(&mut buf)?;
                longest = longest.max(last.elapsed());
                last = Instant::now();
                if n == 0 {
                    return Ok((total, longest));
                }
                total += n as u64;
            }
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::spawn({
            let stop = stop.clone();
            let mut stream = stream;
            move || {
                let chunk = vec![0x5au8; 16 << 10];
                let mut total = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    stream.write_all(&chunk)?;
                    total += chunk.len() as u64;
                    // A steady stream, not a flood: the gap measured is the disruption's.
                    std::thread::sleep(Duration::from_millis(2));
                }
                stream.shutdown(std::net::Shutdown::Write)?;
                Ok(total)
            }
        });
        Ok(Self {
            stop,
            writer,
            reader,
        })
    }

    /// Stops writing, waits for the server to read the rest; what both ends saw, or the
    /// error either met (a reset connection, a timeout).
    pub fn finish(self) -> Result<StreamReport> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = self
            .writer
            .join()
            .map_err(|_| fail!("the stream's writer panicked"))?
            .map_err(|e| fail!("writing the stream: {e}"))?;
        let (read, longest_gap) = self
            .reader
            .join()
            .map_err(|_| fail!("the stream's reader panicked"))?
            .map_err(|e| fail!("reading the stream: {e}"))?;
        Ok(StreamReport {
            written,
            read,
            longest_gap,
        })
    }
}
