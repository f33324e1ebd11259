//! Conversions between std addresses and the kernel's raw form shared with the programs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use shunt_common::{RawAddr, is_v4_mapped};

/// IPv4 becomes IPv4-mapped IPv6, as the programs store it.
pub fn to_raw(ip: IpAddr) -> RawAddr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

/// IPv4-mapped addresses come back as IPv4: an original destination `::ffff:10.0.0.1` is
/// dialled over IPv4 like the kernel would have.
pub fn from_raw(raw: RawAddr) -> IpAddr {
    if is_v4_mapped(&raw) {
        return IpAddr::V4(Ipv4Addr::from(raw[3].to_ne_bytes()));
    }
    let mut octets = [0u8; 16];
    for (i, word) in raw.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(octets))
}

/// A v4-mapped peer as reported by a dual-stack socket is normalised to IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for ip in ["10.1.2.3", "fd00::1", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_raw(to_raw(ip)), ip);
        }
    }

    #[test]
    fn matches_kernel_layout() {
        // The kernel's user_ip4 for 10.1.2.3 is the bytes 0a 01 02 03 in memory.
        let raw = to_raw("10.1.2.3".parse().unwrap());
        assert_eq!(raw[3], u32::from_ne_bytes([10, 1, 2, 3]));
        assert_eq!(raw, shunt_common::map_v4(u32::from_ne_bytes([10, 1, 2, 3])));
    }
}
