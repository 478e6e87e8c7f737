//! A Linux tap device: one `read` is one received Ethernet frame, one `write` sends one.
//!
//! Opened without `IFF_VNET_HDR` (no offloads: the kernel hands over complete frames with
//! complete checksums) and non-blocking. The tap may exist already (`ip tuntap add NAME mode
//! tap`, then bridged by the operator) or is created, which needs `CAP_NET_ADMIN`.
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tap name {0:?}: 1 to 15 bytes, no NUL or '/'")]
    Name(String),
    #[error("interface {0:?} exists and is not a tap device")]
    NotTap(String),
    #[error("opening /dev/net/tun")]
    Open(#[source] std::io::Error),
    #[error("attaching to tap {0:?} (it must be a tap device this user may use; creating one needs CAP_NET_ADMIN)")]
    Attach(String, #[source] std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Whether `name` can name a network interface (1 to 15 bytes, no NUL or '/', not `.`/`..`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.bytes().any(|b| b == 0 || b == b'/')
        && name != "."
        && name != ".."
}

/// Checks, without attaching, that `name` can be a tap: a valid interface name, and if an
/// interface of that name exists, it is a tun/tap device.
pub fn check(name: &str) -> Result<(), Error> {
    if !valid_name(name) {
        return Err(Error::Name(name.into()));
    }
    let dir = std::path::Path::new("/sys/class/net").join(name);
    if dir.exists() && !dir.join("tun_flags").exists() {
        return Err(Error::NotTap(name.into()));
    }
    Ok(())
}

/// Opens (or creates) tap `name`, non-blocking.
pub fn open(name: &str) -> Result<File, Error> {
    check(name)?;
    // SAFETY: a NUL-terminated path literal; the fd is owned by the File below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::Open(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(Error::Attach(name.into(), std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// One frame from a non-blocking frame descriptor: its length, or `None` if none waits.
pub fn read_frame(fd: &File, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then_some(n as usize)
}

/// Sends one frame (best effort, as a NIC: a frame the host cannot take is dropped).
pub fn write_frame(fd: &File, frame: &[u8]) -> bool {
    // SAFETY: `frame` is valid for `frame.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    n == frame.len() as isize
}

/// Whether interface `name` is running: its carrier is on and the kernel has processed that
/// (a bridge port follows the same event), so a frame written now is forwarded. A tap's
/// carrier comes on when a process attaches it, and the kernel takes the news to its
/// bridge asynchronously: a frame written in between is dropped by the bridge.
pub fn running(name: &str) -> std::io::Result<bool> {
    if !valid_name(name) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: a plain socket call; the fd is owned by the File below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS reads a name and writes the flags of an `ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let want = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    Ok(req.flags & want == want)
}

/// Waits up to `timeout` for [`running`]; whether it became so.
pub fn wait_running(name: &str, timeout: std::time::Duration) -> bool {
    let t = std::time::Instant::now();
    loop {
        if running(name).unwrap_or(false) {
            return true;
        }
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The RARP announcement a VM that moved sends for its MAC, as QEMU's live migration does:
/// broadcast, so every switch learns the MAC's new port.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // EtherType RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]); // Ethernet, IPv4, lengths
    f.extend_from_slice(&[0x00, 0x03]); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0); // minimum frame size
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a/b", "0123456789abcdef", "x\0y", ".."] {
            assert!(matches!(open(n), Err(Error::Name(_))), "{n:?}");
        }
        assert!(matches!(check("lo"), Err(Error::NotTap(_))));
        assert!(running("a/b").is_err());
    }

    #[test]
    fn loopback_is_running_and_a_missing_interface_is_an_error() {
        assert!(running("lo").unwrap());
        assert!(running("ftvm-none0").is_err());
        assert!(!wait_running(
            "ftvm-none0",
            std::time::Duration::from_millis(5)
        ));
    }

    #[test]
    fn rarp_announcement_carries_the_mac() {
        let mac = [2, 0x46, 0x54, 0x56, 0x4d, 1];
        let f = rarp_announce(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
