//! A blocking client for the dataplane's Unix socket.

use crate::{
    ApiError, HelloReply, NodeSpec, NodeStatus, Outcome, PortInfo, Reply, Request, RequestEnvelope,
    ResponseEnvelope, Stats, API_VERSION, MAX_MESSAGE_BYTES,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a call did not produce an answer from the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached: the dataplane is not running or the path is wrong.
    #[error("cannot reach the dataplane at {path}: {source} (is switchyard-dataplane running with --api {path}?)")]
    Connect {
        /// Socket path tried.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The connection failed mid-call.
    #[error("dataplane connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The dataplane answered something this client cannot read.
    #[error("dataplane sent an unreadable response: {0}")]
    Protocol(String),
    /// The dataplane refused the request.
    #[error("dataplane refused the request: {0}")]
    Api(#[from] ApiError),
}

/// A connection to the dataplane's API socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the socket at `path`, with a generous timeout for each call.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Self::over(stream)
    }

    /// A client over an open stream to the dataplane.
    fn over(stream: UnixStream) -> Result<Self, ClientError> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Whether the dataplane still holds this connection open, asked without a request
    /// (a dataplane that stopped or restarted has closed it): the connection is read
    /// without waiting, and anything but "nothing yet" means it can no longer carry calls.
    pub fn is_open(&mut self) -> bool {
        let stream = self.reader.get_ref();
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        let idle = matches!(
            self.reader.fill_buf(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        idle && self.reader.get_ref().set_nonblocking(false).is_ok()
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, request: Request) -> Result<Reply, ClientError> {
        let envelope = RequestEnvelope {
            version: API_VERSION,
            request,
        };
        let mut line = serde_json::to_vec(&envelope)
            .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_MESSAGE_BYTES as u64 + 1)
            .read_until(b'\n', &mut answer)?;
        if read == 0 {
            return Err(ClientError::Protocol(
                "connection closed before an answer".into(),
            ));
        }
        let response: ResponseEnvelope =
            serde_json::from_slice(&answer).map_err(|e| ClientError::Protocol(format!("{e}")))?;
        match response.outcome {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Error(err) => Err(ClientError::Api(err)),
        }
    }
}

fn unexpected(request: &str, reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected answer to {request}: {reply:?}"))
}

impl Client {
    /// The dataplane's identity.
    pub fn hello(&mut self) -> Result<HelloReply, ClientError> {
        match self.call(Request::Hello)? {
            Reply::Hello(h) => Ok(h),
            other => Err(unexpected("hello", other)),
        }
    }

    /// Every port.
    pub fn ports(&mut self) -> Result<Vec<PortInfo>, ClientError> {
        match self.call(Request::ListPorts)? {
            Reply::Ports(p) => Ok(p),
            other => Err(unexpected("list_ports", other)),
        }
    }

    /// The counters.
    pub fn stats(&mut self) -> Result<Stats, ClientError> {
        match self.call(Request::Stats)? {
            Reply::Stats(s) => Ok(s),
            other => Err(unexpected("stats", other)),
        }
    }

    /// The node settings in force.
    pub fn node(&mut self) -> Result<NodeStatus, ClientError> {
        match self.call(Request::GetNode)? {
            Reply::Node(n) => Ok(*n),
            other => Err(unexpected("get_node", other)),
        }
    }

    /// The digest of the node settings in force.
    pub fn node_digest(&mut self) -> Result<Option<u64>, ClientError> {
        match self.call(Request::GetNodeDigest)? {
            Reply::NodeDigest(d) => Ok(d),
            other => Err(unexpected("get_node_digest", other)),
        }
    }

    /// Pushes node settings; returns what the dataplane made of them.
    pub fn set_node(&mut self, spec: NodeSpec) -> Result<NodeStatus, ClientError> {
        match self.call(Request::SetNode(spec))? {
            Reply::Node(n) => Ok(*n),
            other => Err(unexpected("set_node", other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_open_until_the_dataplane_closes_it_and_calls_still_work_after_the_check() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = Client::over(ours).unwrap();
        assert!(client.is_open());
        // The check leaves the connection blocking: a call waits for its answer.
        let server = std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let reply = ResponseEnvelope::from(Ok(Reply::NodeDigest(Some(7))));
            let mut answer = serde_json::to_vec(&reply).unwrap();
            answer.push(b'\n');
            // Late, so that a non-blocking read would fail instead of waiting.
            std::thread::sleep(Duration::from_millis(50));
            (&theirs).write_all(&answer).unwrap();
            theirs
        });
        assert_eq!(client.node_digest().unwrap(), Some(7));
        let theirs = server.join().unwrap();
        assert!(client.is_open());
        drop(theirs);
        assert!(!client.is_open());
    }

    #[test]
    fn a_connection_with_words_nobody_asked_for_is_not_open() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut client = Client::over(ours).unwrap();
        theirs.write_all(b"{}\n").unwrap();
        assert!(!client.is_open());
    }
}
