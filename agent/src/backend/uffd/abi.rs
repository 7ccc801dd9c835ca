//! The userfaultfd kernel ABI this module speaks: the ioctl opcodes,
//! built from `size_of` the structure each one passes (and checked
//! against the kernel's values in a test), and the layout of a fault
//! message, checked at compile time against
//! `linux_raw_sys::general::uffd_msg`.

use linux_raw_sys::general as sys;
use rustix::ioctl::{opcode, Opcode};

/// `v` as the one byte an ioctl type or number field holds; a kernel
/// constant that does not fit fails the build (these are all `const`).
const fn ioctl_byte(v: u32) -> u8 {
    assert!(v <= 0xff, "ioctl field does not fit in a byte");
    v.to_le_bytes()[0]
}

/// `UFFDIO_API`: `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub(super) const UFFDIO_API: Opcode =
    opcode::read_write::<sys::uffdio_api>(ioctl_byte(sys::UFFDIO), ioctl_byte(sys::_UFFDIO_API));
/// `UFFDIO_REGISTER`: `_IOWR(0xAA, 0x00, struct uffdio_register)`.
pub(super) const UFFDIO_REGISTER: Opcode = opcode::read_write::<sys::uffdio_register>(
    ioctl_byte(sys::UFFDIO),
    ioctl_byte(sys::_UFFDIO_REGISTER),
);
/// `UFFDIO_UNREGISTER`: `_IOR(0xAA, 0x01, struct uffdio_range)`.
pub(super) const UFFDIO_UNREGISTER: Opcode =
    opcode::read::<sys::uffdio_range>(ioctl_byte(sys::UFFDIO), ioctl_byte(sys::_UFFDIO_UNREGISTER));
/// `UFFDIO_WAKE`: `_IOR(0xAA, 0x02, struct uffdio_range)`.
pub(super) const UFFDIO_WAKE: Opcode =
    opcode::read::<sys::uffdio_range>(ioctl_byte(sys::UFFDIO), ioctl_byte(sys::_UFFDIO_WAKE));
/// `UFFDIO_COPY`: `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
pub(super) const UFFDIO_COPY: Opcode =
    opcode::read_write::<sys::uffdio_copy>(ioctl_byte(sys::UFFDIO), ioctl_byte(sys::_UFFDIO_COPY));
/// `UFFDIO_ZEROPAGE`: `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
pub(super) const UFFDIO_ZEROPAGE: Opcode = opcode::read_write::<sys::uffdio_zeropage>(
    ioctl_byte(sys::UFFDIO),
    ioctl_byte(sys::_UFFDIO_ZEROPAGE),
);

/// Size of one `struct uffd_msg`; `read(2)` on the descriptor returns whole messages.
pub(super) const MSG_LEN: usize = 32;
/// Offsets of `arg.pagefault.flags` and `arg.pagefault.address` in `struct uffd_msg`.
pub(super) const MSG_FLAGS: usize = 8;
pub(super) const MSG_ADDRESS: usize = 16;
const _: () = {
    assert!(size_of::<sys::uffd_msg>() == MSG_LEN);
    assert!(std::mem::offset_of!(sys::uffd_msg, arg) == MSG_FLAGS);
    assert!(
        std::mem::offset_of!(sys::uffd_msg__bindgen_ty_1__bindgen_ty_1, address)
            == MSG_ADDRESS - MSG_FLAGS
    );
};

/// The bit for ioctl number `nr` in `uffdio_api.ioctls` / `uffdio_register.ioctls`.
pub(super) fn bit(nr: u32) -> u64 {
    1u64 << nr
}

/// Eight bytes of a message at `at`.
pub(super) fn word(msg: &[u8; MSG_LEN], at: usize) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&msg[at..at + 8]);
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_kernel() {
        assert_eq!(UFFDIO_API as u64, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER as u64, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER as u64, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE as u64, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY as u64, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE as u64, 0xc020_aa04);
    }
}
