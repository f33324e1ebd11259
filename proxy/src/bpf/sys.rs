//! The `bpf(2)` commands aya does not expose publicly, map element commands on raw
//! descriptors for the connection tasks (which must not take the datapath's lock), and the
//! registration of aya-log's reader with tokio, and the socket options that name sockets and
//! namespaces as the programs see them. The `unsafe` of `bpf/` lives here only (the
//! crate denies it elsewhere).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out `union bpf_attr` prefix for `cmd`, alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned object (here: a link, which aya can pin but not hand back as an fd).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically reads and removes `key` (one syscall, no lock: the proxy's hot path).
/// `Ok(None)` when the key is absent.
pub fn map_lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    read_elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key)
}

/// Reads `key`; `Ok(None)` when absent.
pub fn map_lookup<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    read_elem(BPF_MAP_LOOKUP_ELEM, map, key)
}

/// A command that fills in the value of `key`; `Ok(None)` when the key is absent.
fn read_elem<K: aya::Pod, V: aya::Pod>(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    use std::os::fd::AsRawFd;
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(cmd, &mut attr) {
        // SAFETY: the kernel filled the value; `V: Pod` is valid for any bytes.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `key` → `value` (`BPF_ANY`). For a sockhash the value is a socket descriptor.
pub fn map_update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Removes `key`; absent is not an error.
pub fn map_delete<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// Swaps the program behind an attached link: a restarted or upgraded daemon takes over
/// interception without a moment where the hook is missing.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Registers a ring buffer's reader (aya-log's, the kernel path's events) with tokio's
/// reactor (readable interest), so a task can wait for the programs to write.
pub fn register_ring<T: std::os::fd::AsRawFd + RingOwner>(
    reader: T,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the reader owns its ring buffer's fd (`RingOwner`), which stays open and the
    // same for as long as the AsyncFd owns the reader.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE)
    }
    // The error's message is its cause's, so nothing is lost.
    .map_err(io::Error::from)
}

/// A reader that owns the descriptor it reports, for as long as it lives.
pub trait RingOwner {}

impl<T> RingOwner for aya_log::EbpfLogger<T> {}
impl RingOwner for super::KernelEvents {}

/// A `u64` socket option at `SOL_SOCKET`: `SO_COOKIE`, `SO_NETNS_COOKIE`.
pub fn getsockopt_u64(socket: BorrowedFd<'_>, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed, so open for the call; both options write one u64
    // into `value`, whose size `len` gives.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A value of `T` from the front of `bytes` (a ring buffer record, which is only 8-byte
/// aligned by the kernel's promise, not Rust's); `None` when it is too short.
pub fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `T` is plain data valid for any bytes (`Pod`), and the length is checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
