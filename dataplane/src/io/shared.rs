//! A file mapped shared into memory and seen as atomic bytes: state that outlives the
//! process (the file lives on tmpfs under `/run/switchyard`), read and written by any
//! thread without a lock, and found again by the next process.
#![allow(unsafe_code)] // mapping a file and viewing the mapping as atomics

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::AtomicU8;

/// A shared mapping of one file, `len` bytes.
pub struct SharedBytes {
    map: memmap2::MmapMut,
}

impl SharedBytes {
    /// Maps `path` (created if missing) with exactly `len` bytes: a longer file is cut,
    /// a shorter one grown with zeros (sparse: tmpfs allocates only the pages touched).
    pub fn open(path: &Path, len: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(len as u64)?;
        // SAFETY: the file is this dataplane's own (one process per API socket, beside
        // which it lives); nothing else resizes it while mapped. Every access goes through
        // `bytes()`'s atomics, never through a plain reference.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file)? };
        Ok(Self { map })
    }

    /// Maps a new, zero-filled file at `path` in place of any earlier one (whose mappings
    /// elsewhere stay valid: they keep the old file).
    pub fn create(path: &Path, len: usize) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Self::open(path, len)
    }

    /// The mapping's bytes.
    pub fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: AtomicU8 has the size and alignment of u8; the mapping is valid for
        // `len` bytes as long as `self` lives; no `&mut` to it is ever made, so every
        // access, from any thread, is through these atomics.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU8>(), self.map.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn what_one_mapping_writes_the_next_one_reads_and_create_starts_empty() {
        let dir = std::env::temp_dir().join(format!("sy-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bytes");
        {
            let first = SharedBytes::open(&path, 4096).unwrap();
            first.bytes()[100].store(7, Ordering::Relaxed);
        }
        let again = SharedBytes::open(&path, 4096).unwrap();
        assert_eq!(again.bytes()[100].load(Ordering::Relaxed), 7);
        let fresh = SharedBytes::create(&path, 8192).unwrap();
        assert_eq!(fresh.bytes().len(), 8192);
        assert_eq!(fresh.bytes()[100].load(Ordering::Relaxed), 0);
        assert_eq!(
            again.bytes()[100].load(Ordering::Relaxed),
            7,
            "the old file stays mapped"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
