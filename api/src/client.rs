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
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
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
