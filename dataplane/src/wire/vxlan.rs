//! VXLAN headers (RFC 7348): 8 bytes between the outer UDP header and the inner Ethernet
//! frame.

use super::WireError;

/// Header length.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI field is valid.
pub const FLAG_VNI: u8 = 0x08;

/// A view of a VXLAN header. `new_checked` guarantees the 8 bytes are there.
#[derive(Debug)]
pub struct VxlanHeader<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> VxlanHeader<T> {
    /// Wraps `buf` after checking it holds the header.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf })
    }

    /// True when the I flag says the VNI is valid.
    pub fn has_vni(&self) -> bool {
        self.buf.as_ref()[0] & FLAG_VNI != 0
    }

    /// The 24-bit VXLAN network identifier.
    pub fn vni(&self) -> u32 {
        let b = self.buf.as_ref();
        u32::from_be_bytes([0, b[4], b[5], b[6]])
    }
}

/// The header for `vni` (its low 24 bits), I flag set, reserved fields zero.
pub fn header(vni: u32) -> [u8; HEADER_LEN] {
    let v = (vni & 0x00ff_ffff).to_be_bytes();
    [FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_the_vni() {
        let h = header(0x12_3456);
        assert_eq!(h, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let v = VxlanHeader::new_checked(&h[..]).unwrap();
        assert!(v.has_vni());
        assert_eq!(v.vni(), 0x12_3456);
        let no_flag = [0u8, 0, 0, 0, 0, 0, 1, 0];
        assert!(!VxlanHeader::new_checked(&no_flag[..]).unwrap().has_vni());
        assert_eq!(
            VxlanHeader::new_checked(&h[..7]).unwrap_err(),
            WireError::Truncated
        );
    }
}
