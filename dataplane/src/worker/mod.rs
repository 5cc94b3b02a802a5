//! Worker threads: each owns a set of ports, waits on them with level-triggered epoll
//! ([`crate::io::poller`]), and runs the pipeline over batches of frames read from them.
//! Workers share nothing mutable with each other or with the control side: they load the
//! published tables once per round, write frames straight to the egress port's device,
//! and publish their counters with plain atomic stores.

use crate::buffer::{PacketBuf, BATCH};
use crate::io::poller::{Events, Poller};
use crate::io::PortIo;
use crate::pipeline::{Counters, DropReason, Event, Pipeline, Verdict};
use crate::tables::{NextHop, Port, PortCounters, SharedTables, Tables};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod priority;
use priority::{NiceValues, NodeLoad, Priority};

/// Nanoseconds on one monotonic clock shared by every worker and the housekeeping thread
/// (connection-tracking timestamps are compared across them).
pub fn monotonic_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What one [`forward_batch`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRead {
    /// Frames read.
    pub frames: usize,
    /// Whether the batch stopped full (of frames, or of [`crate::buffer::BATCH_BYTES`]):
    /// the port may hold more.
    pub full: bool,
    /// The TAP the batch's only frame, small and read from a TAP, was forwarded to. Its
    /// stack may have answered within the write (a ping's echo, a SYN's SYN-ACK): that
    /// answer is already queued. Frames from other nodes are left out: reading for their
    /// answers gained nothing across nodes and cost short connections a few percent.
    pub answer_from: Option<u32>,
}

/// Which queue of a port a batch reads, and how deep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRead {
    /// The queue: the worker's number.
    pub queue: usize,
    /// At most this many read calls on the port's own descriptor (a device that takes
    /// one frame or datagram per read, [`PortIo::reads_one_per_call`], reads one per
    /// call; the others a batch); with 0, only the AF_XDP ring an uplink has beside it is
    /// read.
    pub calls: usize,
}

impl QueueRead {
    /// Queue `queue`, read until it is empty or the batch is full.
    pub fn drain(queue: usize) -> Self {
        Self {
            queue,
            calls: usize::MAX,
        }
    }
}

/// Reads one batch from `read`'s queue of `port`, runs the pipeline and transmits the
/// results through the same queue number of each egress port. What an uplink that is the
/// node's exit read for the node is run through the pipeline as if the host port had read
/// it.
pub fn forward_batch(
    pipeline: &mut Pipeline,
    tables: &Tables<PortIo>,
    port: &Port<PortIo>,
    read: QueueRead,
    bufs: &mut [PacketBuf],
    verdicts: &mut [Verdict],
    now_ns: u64,
) -> io::Result<BatchRead> {
    let QueueRead { queue, calls } = read;
    let (n, for_node) = match &port.device {
        PortIo::Uplink(uplink) => uplink.recv_split(queue, bufs, calls)?,
        device => (device.recv_batch(queue, bufs, calls)?, 0),
    };
    let read = n + for_node;
    if read == 0 {
        return Ok(BatchRead {
            frames: 0,
            full: false,
            answer_from: None,
        });
    }
    pipeline.counters_mut().add(Event::RxBatches, 1);
    pipeline.counters_mut().add(Event::RxFrames, read as u64);
    let bytes: usize = bufs[..read].iter().map(PacketBuf::len).sum();
    PortCounters::add(&port.counters.rx_frames, read as u64);
    PortCounters::add(&port.counters.rx_bytes, bytes as u64);
    pipeline.process(tables, port, &mut bufs[..n], &mut verdicts[..n], now_ns);
    let host = tables.exit.as_ref().map(|exit| exit.host.as_ref());
    if for_node > 0 {
        match host {
            Some(host) => pipeline.process(
                tables,
                host,
                &mut bufs[n..read],
                &mut verdicts[n..read],
                now_ns,
            ),
            // The exit went with the last snapshot: nothing to take these now.
            None => verdicts[n..read].fill(Verdict::Drop),
        }
    }
    let (counters, scratch) = pipeline.tx_parts();
    let mut posted = Posted::default();
    // One small frame from a TAP: the TAP it goes to may answer within the write.
    let may_be_answered =
        read == 1 && bytes <= ANSWERED_FRAME_BYTES && matches!(port.device, PortIo::Tap(_));
    let mut answer_from = None;
    for (i, (buf, verdict)) in bufs[..read].iter_mut().zip(&verdicts[..read]).enumerate() {
        let (nh, leaves) = match *verdict {
            Verdict::Drop | Verdict::Merged => continue,
            Verdict::Reply => {
                let ingress = match host {
                    Some(host) if i >= n => host,
                    _ => port,
                };
                send(counters, &mut posted, queue, ingress, None, buf, scratch);
                continue;
            }
            Verdict::Forward(nh) => (nh, false),
            Verdict::Leave(nh) => (nh, true),
        };
        if leaves {
            if let Some(exit) = &tables.exit {
                if let PortIo::Uplink(uplink) = &exit.uplink.device {
                    let len = buf.len();
                    if let Some(sent) = uplink.send_outside(queue, buf.frame_mut(), scratch) {
                        posted.note(&exit.uplink, queue);
                        count_tx(counters, &exit.uplink, len, sent);
                        continue;
                    }
                }
            }
        }
        let (egress, peer) = match tables.nexthop(nh) {
            Some(NextHop::Port(p)) => (p.as_ref(), None),
            Some(NextHop::Tunnel { port, peer }) => (port.as_ref(), Some(*peer)),
            _ => {
                counters.drop(DropReason::PortGone);
                continue;
            }
        };
        if may_be_answered && matches!(egress.device, PortIo::Tap(_)) {
            answer_from = Some(egress.id);
        }
        send(counters, &mut posted, queue, egress, peer, buf, scratch);
    }
    posted.flush_all(queue);
    Ok(BatchRead {
        frames: read,
        full: read == bufs.len() || bytes >= crate::buffer::BATCH_BYTES,
        answer_from,
    })
}

/// Sends `buf` through queue `queue` of `egress` (to `peer`, through an uplink), noting a
/// port that posts for the batch's flush, and counts it.
#[inline]
fn send<'a>(
    counters: &mut Counters,
    posted: &mut Posted<'a>,
    queue: usize,
    egress: &'a Port<PortIo>,
    peer: Option<std::net::Ipv4Addr>,
    buf: &mut PacketBuf,
    scratch: &mut [u8],
) {
    let frame = buf.frame_mut();
    let len = frame.len();
    if egress.device.posts() {
        posted.note(egress, queue);
    }
    let sent = match (&egress.device, peer) {
        (PortIo::Uplink(uplink), Some(peer)) => uplink.send_to(queue, frame, peer, scratch),
        (PortIo::AfXdp(xsk), _) => xsk.post(queue, frame, scratch),
        (io, _) => io.send(queue, frame),
    };
    count_tx(counters, egress, len, sent);
}

/// The AF_XDP ports a batch posted frames to, flushed once at its end (one system call
/// per port and batch). A batch that reaches more ports than there are slots flushes the
/// oldest early.
#[derive(Default)]
struct Posted<'a> {
    ports: [Option<&'a Port<PortIo>>; 4],
}

impl<'a> Posted<'a> {
    fn note(&mut self, port: &'a Port<PortIo>, queue: usize) {
        if self.ports.iter().flatten().any(|p| std::ptr::eq(*p, port)) {
            return;
        }
        if let Some(slot) = self.ports.iter_mut().find(|p| p.is_none()) {
            *slot = Some(port);
            return;
        }
        flush(self.ports[0], queue);
        self.ports.rotate_left(1);
        self.ports[3] = Some(port);
    }

    fn flush_all(self, queue: usize) {
        self.ports.into_iter().for_each(|p| flush(p, queue));
    }
}

fn flush(port: Option<&Port<PortIo>>, queue: usize) {
    if let Some(port) = port {
        if port.device.flush(queue).is_err() {
            PortCounters::add(&port.counters.tx_errors, 1);
        }
    }
}

#[inline]
fn count_tx(counters: &mut Counters, egress: &Port<PortIo>, len: usize, sent: io::Result<()>) {
    match sent {
        Ok(()) => {
            PortCounters::add(&egress.counters.tx_frames, 1);
            PortCounters::add(&egress.counters.tx_bytes, len as u64);
        }
        Err(_) => {
            PortCounters::add(&egress.counters.tx_errors, 1);
            counters.drop(DropReason::TxFailed);
        }
    }
}

/// Buckets of the per-batch histograms: batch sizes 1, 2, 3-4, ... 17-32 frames (bucket
/// `i` holds sizes up to 2^i), and batch times up to 2^(i+10) ns (1 µs ... 8.4 ms, the
/// last bucket holding everything longer).
pub const HISTOGRAM_BUCKETS: usize = 14;

/// The bucket of `value` among upper bounds `2^(shift)`, `2^(shift+1)`, ...
#[inline]
pub fn log2_bucket(value: u64, shift: u32) -> usize {
    let v = value.saturating_sub(1) >> shift;
    ((u64::BITS - v.leading_zeros()) as usize).min(HISTOGRAM_BUCKETS - 1)
}

/// What a worker measures of its own work, kept locally and published after every round.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkTimes {
    /// Nanoseconds spent forwarding (from a round's first read to its last write).
    pub busy_ns: u64,
    /// Batches by size bucket ([`HISTOGRAM_BUCKETS`]).
    pub batch_sizes: [u64; HISTOGRAM_BUCKETS],
    /// Batches by the time from read to the last write ([`HISTOGRAM_BUCKETS`]).
    pub batch_ns: [u64; HISTOGRAM_BUCKETS],
    /// Sum of the batches' times, in nanoseconds.
    pub batch_ns_sum: u64,
}

impl WorkTimes {
    /// Counts a batch of `frames` that took `took_ns` from its read to its last write.
    fn note_batch(&mut self, frames: usize, took_ns: u64) {
        self.batch_sizes[log2_bucket(frames as u64, 0)] += 1;
        self.batch_ns[log2_bucket(took_ns, 10)] += 1;
        self.batch_ns_sum += took_ns;
    }
}

/// Counters a worker publishes after every round.
pub struct WorkerStats {
    /// Event counts by [`Event`] index.
    pub events: Vec<AtomicU64>,
    /// Drop counts by [`DropReason`] index.
    pub drops: Vec<AtomicU64>,
    /// Ports whose read failed.
    pub rx_errors: AtomicU64,
    /// [`WorkTimes::busy_ns`].
    pub busy_ns: AtomicU64,
    /// [`WorkTimes::batch_sizes`].
    pub batch_sizes: [AtomicU64; HISTOGRAM_BUCKETS],
    /// [`WorkTimes::batch_ns`].
    pub batch_ns: [AtomicU64; HISTOGRAM_BUCKETS],
    /// [`WorkTimes::batch_ns_sum`].
    pub batch_ns_sum: AtomicU64,
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self {
            events: (0..Event::COUNT).map(|_| AtomicU64::new(0)).collect(),
            drops: (0..DropReason::COUNT).map(|_| AtomicU64::new(0)).collect(),
            rx_errors: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            batch_sizes: std::array::from_fn(|_| AtomicU64::new(0)),
            batch_ns: std::array::from_fn(|_| AtomicU64::new(0)),
            batch_ns_sum: AtomicU64::new(0),
        }
    }
}

impl WorkerStats {
    fn publish(&self, counters: &Counters, times: &WorkTimes) {
        for (slot, value) in self.events.iter().zip(counters.events) {
            slot.store(value, Ordering::Relaxed);
        }
        for (slot, value) in self.drops.iter().zip(counters.drops) {
            slot.store(value, Ordering::Relaxed);
        }
        self.busy_ns.store(times.busy_ns, Ordering::Relaxed);
        for (slot, value) in self.batch_sizes.iter().zip(times.batch_sizes) {
            slot.store(value, Ordering::Relaxed);
        }
        for (slot, value) in self.batch_ns.iter().zip(times.batch_ns) {
            slot.store(value, Ordering::Relaxed);
        }
        self.batch_ns_sum
            .store(times.batch_ns_sum, Ordering::Relaxed);
    }

    /// What the worker measured so far.
    pub fn work_times(&self) -> WorkTimes {
        WorkTimes {
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            batch_sizes: std::array::from_fn(|i| self.batch_sizes[i].load(Ordering::Relaxed)),
            batch_ns: std::array::from_fn(|i| self.batch_ns[i].load(Ordering::Relaxed)),
            batch_ns_sum: self.batch_ns_sum.load(Ordering::Relaxed),
        }
    }
}

/// How many reads a worker makes on each ready port in a round. A TAP gives one frame per
/// read (the uplink's VXLAN socket one datagram), and the read that finds the queue empty
/// costs a system call as dear as one that finds a frame. Polling is level-triggered, so
/// a port whose queue still holds frames is reported again by the very next wait: a port
/// whose frames come one at a time (a ping, a request and its answer) is read once per
/// round, without the empty read, and one reported again in the round right after such a
/// read is drained, until a drain finds at most one frame. Ports read a batch per call
/// (`recvmmsg`, rings) are always drained.
///
/// A TAP that was just written one small frame from another TAP is read once at once, in
/// the same round, for the answer its stack may have queued within the write (a ping's
/// echo, a SYN's SYN-ACK): the answer is forwarded without a wait. A port whose stack did
/// not answer that way is not looked at again for [`SILENT_ROUNDS`] rounds, so a one-way
/// stream of single frames costs almost no empty read.
#[derive(Debug)]
struct ReadPlan {
    /// Direct-mapped by port id: a collision only forgets a port's pace.
    slots: Vec<Pace>,
}

/// What a [`ReadPlan`] remembers of one port.
#[derive(Debug, Clone, Copy, Default)]
struct Pace {
    id: u32,
    /// Drained when ready.
    bulk: bool,
    /// The last round in which its one read found something and no more was looked for.
    single_round: u64,
    /// The first round in which an answer within a write is looked for again.
    silent_until: u64,
}

/// The largest frame (with its virtio-net header) after which a TAP is read for an answer
/// within the write: a ping, a SYN, an ACK, a short request. A bulk stream's segments are
/// answered, if at all, by the next batch.
const ANSWERED_FRAME_BYTES: usize = 256;

/// Rounds a port whose stack left a written frame unanswered goes without the read for
/// an answer.
const SILENT_ROUNDS: u64 = 1024;

/// At most this many answers, each to the last, are followed in one round (a SYN, its
/// SYN-ACK, the ACK: two).
const ANSWER_HOPS: usize = 4;

/// Slots of a [`ReadPlan`].
const PLAN_SLOTS: usize = 256;

impl Default for ReadPlan {
    fn default() -> Self {
        Self {
            slots: vec![Pace::default(); PLAN_SLOTS],
        }
    }
}

impl ReadPlan {
    fn pace(&mut self, id: u32) -> &mut Pace {
        let pace = &mut self.slots[id as usize % PLAN_SLOTS];
        if pace.id != id {
            *pace = Pace {
                id,
                ..Pace::default()
            };
        }
        pace
    }

    /// How many reads to make on port `id`, ready in round `round`.
    fn limit(&mut self, id: u32, round: u64) -> usize {
        let pace = self.pace(id);
        if pace.single_round + 1 == round {
            // Frames were left, or came at once: a burst.
            pace.bulk = true;
        }
        if pace.bulk {
            usize::MAX
        } else {
            1
        }
    }

    /// Learns from what at most `limit` reads on port `id` in round `round` got.
    fn note(&mut self, id: u32, round: u64, limit: usize, read: BatchRead) {
        let pace = self.pace(id);
        if limit == 1 {
            if read.frames > 0 {
                pace.single_round = round;
            }
        } else {
            pace.bulk = read.full || read.frames > 1;
        }
    }

    /// Whether to read port `id`, just written one frame in round `round`, for its answer.
    fn expects_answer(&mut self, id: u32, round: u64) -> bool {
        self.pace(id).silent_until <= round
    }

    /// Learns whether the read of port `id` for an answer in round `round` found one.
    fn note_answer(&mut self, id: u32, round: u64, found: bool) {
        if !found {
            self.pace(id).silent_until = round + SILENT_ROUNDS;
        }
    }
}

/// A running worker thread. Worker `i` serves queue `i` of every port.
pub struct Worker {
    index: usize,
    poller: Arc<Poller>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What the worker counted.
    pub stats: Arc<WorkerStats>,
}

impl Worker {
    /// Starts worker number `index` over the shared tables. After a round that moved
    /// frames, the worker keeps polling without sleeping for `spin` before it blocks in
    /// epoll again: a frame that arrives meanwhile costs no thread wake-up (tens of
    /// microseconds on a VM).
    /// With `pin_among = Some(n)`, the thread is pinned to the CPUs whose frames CPU
    /// steering puts on queue `index` of `n`. The thread takes `nice.base` (0: left as
    /// inherited), and `nice.quiet` while the workers sharing `load` are nearly idle
    /// ([`priority`]).
    pub fn spawn(
        index: usize,
        tables: Arc<SharedTables<PortIo>>,
        spin: Duration,
        pin_among: Option<usize>,
        nice: NiceValues,
        load: Arc<NodeLoad>,
    ) -> io::Result<Self> {
        let poller = Arc::new(Poller::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WorkerStats::default());
        let thread = std::thread::Builder::new()
            .name(format!("sy-worker-{index}"))
            .spawn({
                let stop = stop.clone();
                let stats = stats.clone();
                let poller = poller.clone();
                move || {
                    let mut nice = nice;
                    if nice.base != 0 && !take_nice(index, nice.base) {
                        nice = NiceValues::default();
                    }
                    if let Some(workers) = pin_among {
                        if let Err(err) = crate::io::steering::pin_current_thread(index, workers) {
                            tracing::warn!("worker {index}: cannot pin to its CPUs: {err}");
                        }
                    }
                    let priority = Priority::new(nice, index, load, monotonic_ns());
                    run(index, spin, priority, &poller, &tables, &stop, &stats)
                }
            })?;
        Ok(Self {
            index,
            poller,
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// Starts polling this worker's queue of a port (ports without a file descriptor are
    /// skipped).
    pub fn watch(&self, port: &Port<PortIo>) -> io::Result<()> {
        for (index, fd) in port.device.fds(self.index).enumerate() {
            self.poller.add(fd, token(port.id, index))?;
        }
        Ok(())
    }

    /// Stops polling this worker's queue of a port.
    pub fn unwatch(&self, port: &Port<PortIo>) {
        for fd in port.device.fds(self.index) {
            let _ = self.poller.remove(fd);
        }
    }

    /// Asks the thread to finish and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.poller.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The poll token of a port's descriptor: the port's id, and the descriptor's place in
/// [`PortIo::fds`] above it (0 for the port's own descriptor, 1 for an uplink's AF_XDP
/// socket).
fn token(id: u32, index: usize) -> u64 {
    u64::from(id) | (index as u64) << 32
}

/// A port one wait found ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ready {
    id: u32,
    /// Whether its own descriptor was reported (not only the AF_XDP socket beside it).
    main: bool,
}

/// Gathers the ports behind `tokens` into `ready`, each once, in the order first reported.
fn gather(tokens: impl Iterator<Item = u64>, ready: &mut Vec<Ready>) {
    ready.clear();
    for token in tokens {
        let (id, main) = (token as u32, token >> 32 == 0);
        match ready.iter_mut().find(|r| r.id == id) {
            Some(r) => r.main |= main,
            None => ready.push(Ready { id, main }),
        }
    }
}

fn run(
    queue: usize,
    spin: Duration,
    mut priority: Priority,
    poller: &Poller,
    shared: &SharedTables<PortIo>,
    stop: &AtomicBool,
    stats: &WorkerStats,
) {
    let mut events = Events::with_capacity(256);
    let mut ready: Vec<Ready> = Vec::with_capacity(256);
    let mut plan = ReadPlan::default();
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
    let mut verdicts = [Verdict::Drop; BATCH];
    let mut pipeline = Pipeline::new();
    let mut times = WorkTimes::default();
    let mut last_work = Instant::now();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Asleep, a worker arms no timer: a frame or `stop` (through the poller's wake-up)
        // is all that wakes it, so an idle node's workers stay asleep and no sleep or
        // wake-up arms and cancels one.
        let timeout = (last_work.elapsed() < spin).then_some(Duration::ZERO);
        if let Err(err) = poller.wait(&mut events, timeout) {
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("worker: poll failed: {err}");
            return;
        }
        round += 1;
        gather(events.tokens(), &mut ready);
        if ready.is_empty() {
            continue;
        }
        if shared.held() {
            // A restart restoring its state: the frames wait on their ports.
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let tables = shared.load();
        last_work = Instant::now();
        let now_ns = monotonic_ns();
        let mut batch_start = now_ns;
        for &Ready { id, main } in &ready {
            let Some(port) = tables.ports.get(&id) else {
                continue;
            };
            let per_call = port.device.reads_one_per_call();
            let calls = if !main {
                // Only the AF_XDP socket beside it: its ring is read, its own
                // descriptor would find nothing.
                0
            } else if per_call {
                plan.limit(id, round)
            } else {
                usize::MAX
            };
            let read = forward_batch(
                &mut pipeline,
                &tables,
                port,
                QueueRead { queue, calls },
                &mut bufs,
                &mut verdicts,
                now_ns,
            );
            let mut batch_end = monotonic_ns();
            match read {
                Ok(read) => {
                    if per_call {
                        plan.note(id, round, calls, read);
                    }
                    if read.frames > 0 {
                        times.note_batch(read.frames, batch_end - batch_start);
                    }
                    let mut answer_from = read.answer_from;
                    for _ in 0..ANSWER_HOPS {
                        let Some(next) = answer_from.take() else {
                            break;
                        };
                        let Some(next) = tables.ports.get(&next) else {
                            break;
                        };
                        if !plan.expects_answer(next.id, round) {
                            break;
                        }
                        // The read stands for the round it saves: a port read in the
                        // round before is one that had frames left.
                        round += 1;
                        let answer = forward_batch(
                            &mut pipeline,
                            &tables,
                            next,
                            QueueRead { queue, calls: 1 },
                            &mut bufs,
                            &mut verdicts,
                            now_ns,
                        );
                        let found = answer.as_ref().map_or(0, |a| a.frames);
                        plan.note_answer(next.id, round, found > 0);
                        if found > 0 {
                            pipeline
                                .counters_mut()
                                .add(Event::AnswersRead, found as u64);
                            let end = monotonic_ns();
                            times.note_batch(found, end - batch_end);
                            batch_end = end;
                        }
                        answer_from = answer.ok().and_then(|a| a.answer_from);
                    }
                }
                Err(err) => {
                    stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                    if err.raw_os_error() == Some(libc::EBADFD) {
                        // A TAP whose device is gone (its namespace deleted) stays
                        // readable for ever: stop polling it until the port is removed.
                        tracing::warn!("worker {queue}: port {id}'s device is gone: {err}");
                        for fd in port.device.fds(queue) {
                            let _ = poller.remove(fd);
                        }
                    }
                }
            }
            batch_start = batch_end;
        }
        times.busy_ns += batch_start - now_ns;
        stats.publish(pipeline.counters(), &times);
        let had = priority.current();
        if let Some(nice) = priority.note(batch_start - now_ns, batch_start) {
            if !take_nice(queue, nice) {
                priority.fix(had);
            }
        }
    }
}

/// Gives the calling worker thread `nice`; false, with a warning, when it cannot.
fn take_nice(queue: usize, nice: i32) -> bool {
    match crate::io::steering::set_current_thread_nice(nice) {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(
                "worker {queue}: cannot set its nice value {nice}, keeping the one it has: \
                 {err} (a lower value needs CAP_SYS_NICE; --worker-nice and \
                 --worker-quiet-nice set the values, equal values turn the change off)"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_read_once_a_round_until_frames_are_left_then_drained_until_one_comes_alone() {
        let mut plan = ReadPlan::default();
        let got = |frames| BatchRead {
            frames,
            full: false,
            answer_from: None,
        };
        // A ping: one frame now and then, never the empty read.
        assert_eq!(plan.limit(9, 5), 1);
        plan.note(9, 5, 1, got(1));
        assert_eq!(plan.limit(9, 7), 1);
        plan.note(9, 7, 1, got(1));
        // Reported again by the very next wait: frames were left.
        assert_eq!(plan.limit(9, 8), usize::MAX);
        plan.note(9, 8, usize::MAX, got(5));
        assert_eq!(plan.limit(9, 12), usize::MAX);
        plan.note(9, 12, usize::MAX, got(1));
        // A batch that found one frame alone: back to single reads.
        assert_eq!(plan.limit(9, 20), 1);
        // Another port on the same slot starts afresh, and the first is forgotten.
        let other = 9 + PLAN_SLOTS as u32;
        assert_eq!(plan.limit(other, 21), 1);
        plan.note(other, 21, 1, got(1));
        assert_eq!(plan.limit(other, 22), usize::MAX);
        assert_eq!(plan.limit(9, 23), 1);
    }

    #[test]
    fn a_port_that_left_a_frame_unanswered_is_not_read_for_answers_for_a_while() {
        let mut plan = ReadPlan::default();
        // A pod that answers every ping at once is always read for the answer.
        for round in 1..5 {
            assert!(plan.expects_answer(3, round));
            plan.note_answer(3, round, true);
        }
        // One that did not answer (a one-way stream) is left alone, then tried again.
        assert!(plan.expects_answer(4, 10));
        plan.note_answer(4, 10, false);
        assert!(!plan.expects_answer(4, 11));
        assert!(!plan.expects_answer(4, 10 + SILENT_ROUNDS - 1));
        assert!(plan.expects_answer(4, 10 + SILENT_ROUNDS));
        // The silence is the port's own.
        assert!(plan.expects_answer(3, 11));
    }

    #[test]
    fn ready_ports_are_listed_once_each_saying_whether_their_own_descriptor_was_reported() {
        let mut ready = vec![Ready { id: 1, main: true }];
        // Port 7's AF_XDP socket alone, port 9's own descriptor, then port 7's too.
        gather([token(7, 1), token(9, 0)].into_iter(), &mut ready);
        assert_eq!(
            ready,
            [Ready { id: 7, main: false }, Ready { id: 9, main: true }]
        );
        gather(
            [token(7, 1), token(9, 0), token(7, 0)].into_iter(),
            &mut ready,
        );
        assert_eq!(
            ready,
            [Ready { id: 7, main: true }, Ready { id: 9, main: true }]
        );
        // Port ids fill the token's low half whole.
        gather([token(u32::MAX, 1)].into_iter(), &mut ready);
        assert_eq!(
            ready,
            [Ready {
                id: u32::MAX,
                main: false
            }]
        );
    }

    #[test]
    fn histogram_buckets_are_powers_of_two_with_a_last_catch_all() {
        let sizes: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32]
            .iter()
            .map(|&n| log2_bucket(n, 0))
            .collect();
        assert_eq!(sizes, [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
        assert_eq!(log2_bucket(1_000, 10), 0); // up to 1,024 ns
        assert_eq!(log2_bucket(1_025, 10), 1);
        assert_eq!(log2_bucket(2_048, 10), 1);
        assert_eq!(log2_bucket(u64::MAX, 10), HISTOGRAM_BUCKETS - 1);
        assert_eq!(log2_bucket(0, 0), 0);
    }
    use crate::gateway::Gateway;
    use crate::io::memory;
    use crate::tables::builder::TableBuilder;
    use crate::tables::PortRole;
    use switchyard_api::{MacAddr, PortInfo};

    /// A pod port whose queues hold `depth` frames each way.
    fn memory_port(
        id: u32,
        mac: MacAddr,
        ip: &str,
        depth: usize,
    ) -> (Arc<Port<PortIo>>, memory::MemoryPeer) {
        let (io, peer) = memory::pair(depth);
        let net: switchyard_api::IpNet = ip.parse().unwrap();
        let std::net::IpAddr::V4(v4) = net.addr() else {
            panic!("an IPv4 address")
        };
        let port = Port {
            id,
            mac,
            mtu: 1500,
            ipv4: vec![v4],
            ipv6: Vec::new(),
            device: PortIo::Memory(io),
            role: PortRole::Pod,
            accepts_udp_gso: false,
            counters: PortCounters::default(),
            info: PortInfo {
                id,
                kind: "memory".into(),
                netns: format!("/test/{id}"),
                ifname: "eth0".into(),
                ifindex: 0,
                mac,
                mtu: 1500,
                ips: vec![net],
                owner: None,
                pod: None,
                queues: 1,
                port_mappings: Vec::new(),
            },
        };
        (Arc::new(port), peer)
    }

    /// An IPv4 UDP datagram from `src` to `dst` (checksum none), in an Ethernet frame
    /// from `mac` to the gateway, behind a zeroed virtio-net header.
    fn frame(mac: MacAddr, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&Gateway::default().mac.0);
        f.extend_from_slice(&mac.0);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0u8; 20];
        crate::wire::ipv4::emit_header(&mut ip, src.into(), dst.into(), 17, 10, 64);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 10, 0, 0, b'h', b'i']);
        f
    }

    /// One batch read from queue 0 of `port` until it is empty or the batch full.
    fn drain_once(
        pipeline: &mut Pipeline,
        tables: &Tables<PortIo>,
        port: &Port<PortIo>,
        now_ns: u64,
    ) -> BatchRead {
        let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
        let mut verdicts = [Verdict::Drop; BATCH];
        let read = QueueRead::drain(0);
        forward_batch(
            pipeline,
            tables,
            port,
            read,
            &mut bufs,
            &mut verdicts,
            now_ns,
        )
        .unwrap()
    }

    #[test]
    fn a_batch_of_large_frames_stops_at_its_byte_budget_and_says_it_is_full() {
        let a_mac = MacAddr([0x0a, 0x58, 10, 244, 0, 5]);
        let (a, pa) = memory_port(1, a_mac, "10.244.0.5/24", 16);
        let mut builder = TableBuilder::new(Gateway::default());
        builder.insert_port(a.clone());
        let tables = builder.build();
        // Ten frames of 60,000 bytes (to nowhere: dropped): a batch takes them until they
        // reach the budget.
        let mut big = frame(a_mac, [10, 244, 0, 5], [10, 244, 0, 6]);
        big.resize(60_000, 0);
        for _ in 0..10 {
            assert!(pa.send(&big));
        }
        let mut pipeline = Pipeline::new();
        let mut run = || drain_once(&mut pipeline, &tables, &a, 1);
        let per_batch = crate::buffer::BATCH_BYTES.div_ceil(60_000);
        let first = run();
        assert_eq!(
            first,
            BatchRead {
                frames: per_batch,
                full: true,
                answer_from: None
            }
        );
        let second = run();
        assert_eq!(
            second,
            BatchRead {
                frames: per_batch,
                full: true,
                answer_from: None
            }
        );
        let last = run();
        assert_eq!(
            last,
            BatchRead {
                frames: 10 - 2 * per_batch,
                full: false,
                answer_from: None
            }
        );
    }

    #[test]
    fn a_batch_is_forwarded_and_counted_and_a_full_port_counts_a_failed_write() {
        let a_mac = MacAddr([0x0a, 0x58, 10, 244, 0, 5]);
        let (a, pa) = memory_port(1, a_mac, "10.244.0.5/24", 4);
        let (b, pb) = memory_port(2, MacAddr([0x0a, 0x58, 10, 244, 0, 6]), "10.244.0.6/24", 2);
        let mut builder = TableBuilder::new(Gateway::default());
        builder.insert_port(a.clone());
        builder.insert_port(b.clone());
        let tables = builder.build();
        // Three frames to B, whose queue toward the pod holds two.
        for _ in 0..3 {
            assert!(pa.send(&frame(a_mac, [10, 244, 0, 5], [10, 244, 0, 6])));
        }
        let mut pipeline = Pipeline::new();
        let n = drain_once(&mut pipeline, &tables, &a, 1);
        assert_eq!(
            n,
            BatchRead {
                frames: 3,
                full: false,
                answer_from: None
            }
        );
        assert_eq!(a.counters.rx_frames.load(Ordering::Relaxed), 3);
        assert_eq!(b.counters.tx_frames.load(Ordering::Relaxed), 2);
        assert_eq!(b.counters.tx_errors.load(Ordering::Relaxed), 1);
        assert_eq!(pipeline.counters().dropped(DropReason::TxFailed), 1);
        assert_eq!(pipeline.counters().count(Event::RxBatches), 1);
        assert!(pb.recv().is_some() && pb.recv().is_some() && pb.recv().is_none());
        // Nothing more to read: no batch.
        let n = drain_once(&mut pipeline, &tables, &a, 2);
        assert_eq!(n.frames, 0);
        assert_eq!(pipeline.counters().count(Event::RxBatches), 1);
        // What the worker publishes is what its pipeline counted.
        let stats = WorkerStats::default();
        stats.publish(pipeline.counters(), &WorkTimes::default());
        assert_eq!(
            stats.drops[DropReason::TxFailed as usize].load(Ordering::Relaxed),
            1
        );
        assert_eq!(
            stats.events[Event::RxFrames as usize].load(Ordering::Relaxed),
            3
        );
    }
}
