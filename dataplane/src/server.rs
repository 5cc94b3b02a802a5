//! The local API socket: a Unix stream socket (mode 0600) carrying one JSON request per
//! line and one JSON response per line (see the `switchyard-api` crate). Each connection
//! has its own thread; requests are carried out by [`Switch::handle`].

use crate::switch::Switch;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use switchyard_api::{parse_request, ApiError, ErrorCode, ResponseEnvelope, MAX_MESSAGE_BYTES};

/// Binds the API socket at `path`, replacing a stale one but refusing to take over a
/// socket another process is serving.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is served by another running dataplane; stop it or pass another --api path",
                    path.display()
                ),
            ));
        }
        fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections forever.
pub fn serve(listener: UnixListener, switch: Arc<Switch>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let switch = switch.clone();
        let _ = std::thread::Builder::new()
            .name("sy-api".into())
            .spawn(move || {
                let _ = serve_connection(stream, &switch);
            });
    }
}

fn serve_connection(stream: UnixStream, switch: &Switch) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_MESSAGE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(()); // client went away; nothing half-done stays behind
        }
        let too_long = line.len() > MAX_MESSAGE_BYTES;
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.iter().all(u8::is_ascii_whitespace) && !too_long {
            continue;
        }
        let result = if too_long {
            Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("request exceeds {MAX_MESSAGE_BYTES} bytes; connection closed"),
            ))
        } else {
            parse_request(text).and_then(|request| switch.handle(request))
        };
        let mut answer =
            serde_json::to_vec(&ResponseEnvelope::from(result)).map_err(io::Error::other)?;
        answer.push(b'\n');
        writer.write_all(&answer)?;
        if too_long {
            return Ok(());
        }
    }
}
